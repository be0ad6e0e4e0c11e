"""Argument helpers shared by the ``vltok`` commands (``eval``, ``video run``, ``demo``), so that they take the same
spellings and check a method the same way, before any model is loaded:

* :func:`check_method`: the method name, ``keep`` and the method's options, through the checks ``vltok.patch`` itself
  runs (``vltok.api.build_method``: the registry's name lookup, keep in (0, 1], each option's declared type / range),
  and, when the model's class is known without loading it, whether vltok's adapter for that family runs the method
  (``vltok.support.incompatibility``, the reason ``vltok.patch`` would give).
* :func:`dtype`: ``--dtype`` takes ``float32 / bfloat16 / float16`` and ``fp32 / bf16 / fp16`` everywhere.
* :func:`key_value`: ``--arg`` / ``--method-arg KEY=VALUE`` (the value parsed as JSON when it can be).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .api import DEFAULT_KEEP, build_method  # DEFAULT_KEEP: what --keep is when a command gets --method alone

NONE = "none"            # --method none: the full (unpatched) model

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
DTYPE_HELP = "float32 / bfloat16 / float16 (or fp32 / bf16 / fp16)"

# the model classes of vltok's reference VLMs (vltok.reference / vltok.reference_video), known without loading them
REFERENCE_CLASSES = {"vltok-ref": "LlavaForConditionalGeneration", "reference": "LlavaForConditionalGeneration",
                     "vltok-ref-video": "LlavaNextVideoForConditionalGeneration",
                     "reference-video": "LlavaNextVideoForConditionalGeneration"}


def dtype(text: str) -> str:
    """argparse ``type=``: the torch name of a --dtype spelling."""
    key = str(text).strip().lower()
    if key not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}: use {DTYPE_HELP}")
    return DTYPES[key]


def key_value(text: str):
    """argparse ``type=``: ``KEY=VALUE`` -> (key, value), the value parsed as JSON when possible (else a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def is_none(method) -> bool:
    """No method: not given, or ``none`` (any case)."""
    return method is None or (isinstance(method, str) and method.strip().lower() == NONE)


def model_class(model) -> str | None:
    """The class name a ``--model`` value will load as, read without loading it: a reference VLM's name, or the
    ``architectures`` entry of a checkpoint folder's config.json; None when it cannot be told (then the model's own
    check runs after loading)."""
    if model is None:
        return REFERENCE_CLASSES["vltok-ref"]
    if isinstance(model, (tuple, list)) and model:
        return type(model[0]).__name__
    name = str(model)
    if name in REFERENCE_CLASSES:
        return REFERENCE_CLASSES[name]
    cfg = Path(name) / "config.json"
    try:
        arch = json.loads(cfg.read_text()).get("architectures") or [None]
    except (OSError, ValueError, AttributeError):
        return None
    return arch[0] if isinstance(arch[0], str) else None


def check_method(method: str, keep=DEFAULT_KEEP, options: dict | None = None, model_cls: str | None = None):
    """Raise vltok's own error (UnknownMethodError, InvalidKeepError, InvalidOptionError, IncompatibleError) for a
    method / keep / options combination that ``vltok.patch`` would refuse, without a model; returns the method's
    registered name. ``model_cls``: the class name of the model it will patch (see :func:`model_class`), checked
    against the support matrix when vltok has an adapter for it."""
    from . import registry
    from .errors import IncompatibleError

    built = build_method(method, keep, **(options or {}))
    adapter = registry.adapter_classes().get(model_cls) if model_cls else None
    if adapter is not None:
        from .support import incompatibility

        reason = incompatibility(adapter, built)
        if reason:
            raise IncompatibleError(f"method {method!r} {reason}; pick a method or options that fit (python -m "
                                    "vltok.support prints which method works on which family)")
    return registry.get(method).name
