"""Every transformers internal vltok relies on, in one place.

vltok hooks inside Hugging Face models (decoder-layer kwargs, the KV cache, LLaVA-NeXT's anyres helpers, Qwen's
``get_rope_index``), so a transformers release that renames one of them would break it deep inside attention.
Everything of that kind goes through this module, and :func:`check` (called by ``vltok.patch`` before anything is
installed) verifies that what the patched model needs is there; when it is not, it raises
:class:`TransformersCompatError` naming the installed transformers version and the supported range. The next rename
is a change here only.

Known renames handled here:
* 5.24 renamed ``past_key_values`` to ``cache`` in the decoder models' and layers' signatures (the old name is
  still accepted by the top-level models and mapped to ``cache``): :data:`CACHE_KWARGS`, :func:`get_cache`.
* 5.x moved ``no_init_weights`` from ``transformers.modeling_utils`` to ``transformers.initialization``.
* Video families (5.17 vs 5.23): Video-LLaVA's forward took its images as ``pixel_values_images`` (5.23:
  ``pixel_values``, the old name deprecated), :func:`video_llava_image_kwarg`; ``get_video_features`` of
  LLaVA-NeXT-Video returned one [frames, tokens, D] tensor per video in a tuple (5.23: one [videos, tokens, D]
  tensor) and LLaVA-OneVision's left the video's closing newline to the forward (5.23: appended inside),
  :func:`video_placeholder_features`.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import warnings

from .errors import VltokError

SUPPORTED = ">=5.17,<5.26"        # keep in step with pyproject's transformers bound and constraints.txt
MIN_VERSION = (5, 17)
MAX_EXCLUSIVE = (5, 26)
TESTED = ("5.17.0", "5.23.0", "5.25.0")   # the full suite passed on each (oldest, the GPU image's, newest)
CACHE_KWARGS = ("cache", "past_key_values")   # decoder model / layer keyword of the KV cache, newest name first


class TransformersCompatError(VltokError):
    """The installed transformers lacks (or changed) an internal vltok relies on."""


def version() -> str:
    import transformers

    return transformers.__version__


def _parse(v: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else None


def fail(what: str) -> TransformersCompatError:
    """The error for a missing / changed internal: names the installed version and the supported range."""
    return TransformersCompatError(
        f"vltok cannot work with the installed transformers {version()}: {what}. vltok supports transformers "
        f"{SUPPORTED} (tested: {', '.join(TESTED)}); install one of those (pip install 'transformers{SUPPORTED}') "
        "or a vltok release that supports this transformers")


# -- the KV cache ---------------------------------------------------------------------------------------------------
def get_cache(kwargs: dict):
    """The KV cache among a decoder model's / layer's call kwargs (``cache`` from 5.24 on, ``past_key_values``
    before), or None."""
    c = kwargs.get("cache")
    return c if c is not None else kwargs.get("past_key_values")


def cache_kwarg(fn) -> str:
    """Which keyword ``fn`` (a decoder model's or layer's forward) takes the KV cache by."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise fail(f"{getattr(fn, '__qualname__', fn)} takes the KV cache by none of {', '.join(CACHE_KWARGS)}")


@functools.lru_cache(maxsize=None)
def cache_classes():
    """(DynamicCache, DynamicLayer): the default cache and its per-layer store (``.keys`` / ``.values``)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError as e:
        raise fail(f"transformers.cache_utils has no DynamicCache / DynamicLayer ({e})") from None
    return DynamicCache, DynamicLayer


def _check_cache_api() -> None:
    DynamicCache, DynamicLayer = cache_classes()
    cache = DynamicCache()
    if not isinstance(getattr(cache, "layers", None), list) or not callable(getattr(cache, "get_seq_length", None)):
        raise fail("DynamicCache has no .layers list / get_seq_length()")
    layer = DynamicLayer()
    if not (hasattr(layer, "keys") and hasattr(layer, "values")):
        raise fail("DynamicLayer has no .keys / .values")


# -- model-family helpers -------------------------------------------------------------------------------------------
def _family_fn(family: str, name: str):
    mod = f"transformers.models.{family}.modeling_{family}"
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise fail(f"{mod}.{name} is missing ({e})") from None


def transformers_attr(module: str, name: str):
    """``transformers.<module>.<name>`` (e.g. ``vision_utils``, ``get_vision_position_ids``: the Qwen tower merge),
    or a TransformersCompatError naming what this transformers version lacks."""
    mod = f"transformers.{module}"
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise fail(f"{mod}.{name} is missing ({e})") from None


def anyres_helpers(family: str = "llava_next"):
    """(get_anyres_image_grid_shape, unpad_image) of LLaVA-NeXT (or ``llava_onevision``)."""
    return _family_fn(family, "get_anyres_image_grid_shape"), _family_fn(family, "unpad_image")


def image_size_to_num_patches(family: str = "llava_next"):
    return _family_fn(family, "image_size_to_num_patches")


def qwen_smart_resize():
    """Qwen2-VL's image processor rule: (height, width, factor, min_pixels, max_pixels) -> (h, w) (vltok.resize)."""
    mod = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
    try:
        return getattr(importlib.import_module(mod), "smart_resize")
    except (ImportError, AttributeError) as e:
        raise fail(f"{mod}.smart_resize is missing ({e})") from None


def llava_next_video_processor_class():
    """LLaVA-NeXT-Video's video processor class (needs torchvision; the import error propagates to the caller)."""
    import transformers

    cls = getattr(transformers, "LlavaNextVideoVideoProcessor", None)
    if cls is not None:
        return cls
    mod = importlib.import_module("transformers.models.llava_next_video.video_processing_llava_next_video")
    return mod.LlavaNextVideoVideoProcessor


def video_llava_image_kwarg(model) -> str:
    """The keyword Video-LLaVA's forward takes its images by: ``pixel_values`` (5.23 on; ``pixel_values_images``
    still accepted there, deprecated) or ``pixel_values_images`` (5.17)."""
    return "pixel_values" if "pixel_values" in _params(type(model).forward) else "pixel_values_images"


def _newline_in_get_video_features(inner) -> bool:
    """Whether LLaVA-OneVision's ``get_video_features`` appends the video's closing ``image_newline`` itself (5.23)
    rather than leaving it to the forward (5.17)."""
    try:
        src = inspect.getsource(type(inner).get_video_features)
    except (OSError, TypeError) as e:
        raise fail(f"the source of {type(inner).__qualname__}.get_video_features cannot be read ({e})") from None
    return "image_newline" in src


def video_placeholder_features(inner, pixel_values_videos, **kwargs) -> list:
    """Per video, the [tokens, D] features the forward of ``inner`` (the inner model of LLaVA-NeXT-Video,
    LLaVA-OneVision or Video-LLaVA) places at that video's placeholder tokens, the same on every supported
    transformers: ``get_video_features(...).pooler_output`` reshaped per video; a tuple per video (LLaVA-NeXT-Video
    5.17) is flattened, and LLaVA-OneVision's closing newline is appended where the installed version leaves it to
    the forward."""
    import torch

    videos = pixel_values_videos.shape[0]
    out = inner.get_video_features(pixel_values_videos, **kwargs).pooler_output
    if isinstance(out, (tuple, list)):   # LLaVA-NeXT-Video 5.17: torch.split per video, [frames, tokens, D] each
        if len(out) != videos:
            raise fail(f"get_video_features gave {len(out)} per-video tensors for {videos} videos")
        return [f.reshape(-1, f.shape[-1]) for f in out]
    feats = list(out.reshape(videos, -1, out.shape[-1]))
    newline = getattr(inner, "image_newline", None)
    if newline is not None and hasattr(inner, "apply_pooling") and not _newline_in_get_video_features(inner):
        feats = [torch.cat([f, newline[None].to(f.device, f.dtype)]) for f in feats]   # OneVision 5.17
    return feats


def no_init_weights():
    """The context manager that skips weight initialisation while a model is built."""
    try:
        from transformers.initialization import no_init_weights as f
    except ImportError:  # older 5.x
        try:
            from transformers.modeling_utils import no_init_weights as f
        except ImportError as e:
            raise fail(f"no_init_weights is missing ({e})") from None
    return f()


def clip_image_processor_class():
    """CLIP's image processor; the PIL one (no torchvision needed) where it exists."""
    import transformers

    for name in ("CLIPImageProcessorPil", "CLIPImageProcessor"):
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise fail("neither CLIPImageProcessorPil nor CLIPImageProcessor exists")


def tokenizer_of(processor):
    """A processor's tokenizer (a bare tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


def rotary_embedding(lm):
    """The LLM's rotary module (``lm.rotary_emb(x, position_ids) -> (cos, sin)``), or None."""
    return getattr(lm, "rotary_emb", None)


ROPE_INDEX_PARAMS = ("input_ids", "mm_token_type_ids", "image_grid_thw", "video_grid_thw", "attention_mask")


# -- the patch-time check -------------------------------------------------------------------------------------------
def _params(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


_warned: set = set()


def check_version() -> None:
    """Warn once when the installed transformers is outside the tested range (the checks below still decide)."""
    v = version()
    p = _parse(v)
    if p is None:
        raise fail("its version string cannot be read")
    if not MIN_VERSION <= p < MAX_EXCLUSIVE and v not in _warned:
        _warned.add(v)
        warnings.warn(f"vltok was tested with transformers {SUPPORTED} ({', '.join(TESTED)}); the installed "
                      f"{v} is outside that range: vltok checked the internals it uses and found them, but results "
                      "are untested", stacklevel=3)


def check(adapter) -> None:
    """Everything ``adapter`` (a patch about to be attached) needs of transformers; raises
    :class:`TransformersCompatError` before anything is installed. Non-HF models (timm, open_clip) are not checked."""
    if not type(adapter.model).__module__.startswith("transformers."):
        return
    check_version()
    method = adapter.method
    stages = getattr(adapter, "stages", ())
    family = getattr(adapter, "family", "")
    if method.in_llm is not None and "in_llm" in stages:
        lm = adapter.language_model()
        cache_kwarg(type(lm).forward)
        for layer in {type(x) for x in adapter.decoder_layers()}:
            p = _params(layer.forward)
            cache_kwarg(layer.forward)
            missing = [n for n in ("hidden_states", "attention_mask", "position_ids", "position_embeddings")
                       if n not in p]
            if missing:
                raise fail(f"{layer.__qualname__}.forward has no {', '.join(missing)} argument")
        attn = adapter.attention(adapter.decoder_layers()[0])
        missing = [n for n in ("q_proj", "k_proj", "head_dim", "scaling", "config") if not hasattr(attn, n)]
        if missing:
            raise fail(f"{type(attn).__qualname__} has no {', '.join(missing)}")
        _check_cache_api()
    if family in ("llava_next", "llava_next_video"):
        anyres_helpers("llava_next")
    elif family == "llava_onevision":
        anyres_helpers("llava_onevision")
    if family in ("qwen2_vl", "qwen2_5_vl") and method.pre_llm is not None:
        p = _params(type(adapter.model.model).get_rope_index)
        missing = [n for n in ROPE_INDEX_PARAMS if n not in p]
        if missing:
            raise fail(f"{type(adapter.model.model).__qualname__}.get_rope_index has no "
                       f"{', '.join(missing)} argument")
