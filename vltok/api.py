"""Public API: patch / unpatch / patched and the patch handle with its stats."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import numbers
import threading

from . import registry
from .record import Recorder
from .stages import StageProtocolError
from .errors import (AlreadyPatchedError, IncompatibleError, InvalidKeepError, InvalidOptionError, NotPatchedError,
                     VltokError)

_ATTR = "_vltok_handle"


class _PerThread:
    """A handle attribute each thread reads as its own last call wrote it (calls from several threads at once); a
    thread that made no call reads what the latest call of any thread wrote."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        try:
            return getattr(obj._local, self.name)
        except AttributeError:
            pass
        try:
            return obj.__dict__["_last_" + self.name]
        except KeyError:
            raise AttributeError(obj._unset_message(self.name)) from None

    def __set__(self, obj, value):
        setattr(obj._local, self.name, value)
        obj.__dict__["_last_" + self.name] = value


class PatchHandle:
    """Returned by :func:`patch`. ``stats`` describes the last call that carried images (of this thread)."""

    stats = _PerThread()
    kept_positions = _PerThread()
    inllm_kept_columns = _PerThread()
    inllm_prefill_columns = _PerThread()
    inllm_dead_columns = _PerThread()
    inllm_layer_columns = _PerThread()

    def __init__(self, model, method, adapter_cls):
        self.model = model
        self.method = method
        self.family = adapter_cls.family
        self._undo: list = []
        self._local = threading.local()
        self.stats = {}
        # True: vision-stage merges also record every patch's group (a one-hot tracer, [B, N, N] memory per call)
        self.record_kept = False
        self._kept_stages: list = []   # raw records behind kept_patches() (vltok/kept.py)
        self._kept_inllm = None
        self._cut_graphs = None   # see the cut_graphs property
        # one call at a time: per-call state (placeholder rewrite, in-LLM cut state, stats) lives on the adapter /
        # engine, so concurrent calls from several threads are serialized (never mixed); see _install_guards
        self._lock = threading.RLock()
        self.recorder = Recorder(self)   # what adapters and engines write the stats through

    def _unset_message(self, name: str) -> str:
        """Why ``handle.<name>`` has no value yet, and what gives it one (the AttributeError's text)."""
        head = f"handle.{name} is not set"
        if not self.stats:
            return (f"{head}: no call with images has run through the patched model yet (call model(...) or "
                    "model.generate(...) with pixel inputs first)")
        stages = getattr(self.method, "stages", ())
        if name == "kept_positions":
            if "in_llm" in stages and not {"vision", "pre_llm"} & set(stages):   # nothing shortens the input
                return (f"{head}: '{self.method.name}' reduces inside the LLM and keeps layer 0 at full length, so "
                        "the input sequence is not rewritten; handle.inllm_kept_columns maps the returned logits' "
                        "columns to your input's")
            return f"{head}: the last call did not rewrite the input sequence (it kept every token)"
        if name.startswith("inllm_") and "in_llm" not in stages:
            return (f"{head}: '{self.method.name}' has no in-LLM stage (it reduces before the LLM); "
                    "handle.kept_positions maps the returned columns to your input's")
        return f"{head} by the last call"

    @property
    def cut_graphs(self) -> bool | None:
        """``patch(..., cut_graphs=...)``: whether the in-LLM engine may replay a cut from a CUDA graph (None: where
        it applies; False: never). Assignable (validated as at patch time), e.g. off while a profiler runs."""
        return self._cut_graphs

    @cut_graphs.setter
    def cut_graphs(self, value) -> None:
        self._cut_graphs = _check_cut_graphs(value, self.model, self.method)

    def kept_patches(self):
        """What the last call kept of each image, in the image's patch grid: a list of vltok.kept.KeptGrid (one per
        image and grid): kept raster indices (selection), every patch's group (merging; full groups need
        ``handle.record_kept = True`` during the call), the reduced grid (resampling), and per cut layer the
        surviving patches (in-LLM). ``vltok.visualize.draw_kept(image, entry)`` draws one."""
        from .kept import resolve

        return resolve(self)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def remove(self):
        if getattr(self.model, "__dict__", {}).get(_ATTR) is not self:
            return
        while self._undo:
            self._undo.pop()()
        self.model.__dict__.pop(_ATTR, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    @property
    def keep(self) -> float | None:
        """The keep this patch runs at: the requested one, or where an option fixes the budget (``keep_set_by``)
        the keep it implies; where that depends on the image (fourier ``r=``, feather ``preset="paper"``) the last
        call's achieved one (``stats["keep"]``, FLOPs-equivalent), None before the first call."""
        if self.method.keep is not None:
            return self.method.keep
        return (self.stats or {}).get("keep")

    @property
    def keep_set_by(self) -> str | None:
        """The option that fixes the budget (e.g. ``"r=(10, 10)"``), None when keep chose it."""
        return self.method.keep_set_by

    def _keep_text(self) -> str:
        k, by = self.keep, self.keep_set_by
        if by is None:
            return f"{k}"
        return f"{k:.4g} (set by {by})" if k is not None else f"set by {by}"

    def __repr__(self):
        return f"PatchHandle({self.method.name!r}, keep={self._keep_text()}, family={self.family!r})"


def _check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or math.isnan(float(keep)):
        raise InvalidKeepError(f"keep must be a number in (0, 1], the share of visual tokens to keep; got {keep!r}")
    keep = float(keep)
    if not 0.0 < keep <= 1.0:
        raise InvalidKeepError(
            f"keep={keep} is outside (0, 1]: it is the share of the model's native visual tokens to keep "
            "(e.g. keep=0.25 keeps a quarter; keep=1.0 changes nothing)"
        )
    return keep


def _check_cut_graphs(value, model, method):
    """The ``cut_graphs`` option: None (the default: the in-LLM cut of a ``graph_safe`` method is replayed from a
    CUDA graph where it can be, i.e. on CUDA, batched samples, the last token as query), False (always eager) or True
    (as None, but refused where graphs can never apply: a method without a graph-safe in-LLM stage, or a model that
    is not on a CUDA device at patch time; a model moved off CUDA later simply runs eagerly)."""
    if value is not None and not isinstance(value, bool):
        raise InvalidOptionError(f"cut_graphs must be True, False or None (the default: CUDA graphs for the in-LLM "
                                 f"cut where they apply); got {value!r}")
    if value:
        if method.in_llm is None or not getattr(method.in_llm, "graph_safe", False):
            raise IncompatibleError(f"cut_graphs=True: method {method.name!r} has no in-LLM cut that can be replayed "
                                    "from a CUDA graph (only methods marked graph_safe, e.g. fastv, feather); pass "
                                    "cut_graphs=None (the default) or False")
        p = next(iter(model.parameters()), None)
        if p is None or not p.is_cuda:
            raise IncompatibleError("cut_graphs=True replays the in-LLM cut from CUDA graphs, which needs the model on "
                                    "a CUDA device: move it with model.cuda() before patching, or pass "
                                    "cut_graphs=None (graphs only where they apply)")
    return value


DEFAULT_KEEP = 0.16   # the keep of ``vltok.patch(model, method)`` when neither keep nor an option sets the budget


def resolve_keep(name: str, keep=None, **options):
    """``(keep for the factory, FixedBudget or None)``. ``keep=None`` means "not given": the method's default
    (:data:`DEFAULT_KEEP`), or where options fix the budget themselves (the method's ``register(budget=...)``,
    e.g. fourier ``r=``, feather ``preset="paper"``) the keep they imply (None when it depends on the model or the
    image: the handle then reports the achieved one). An explicit keep those options do not agree with, keep=1.0
    included, is refused (InvalidOptionError naming both and the fix): never silently overridden. The options must
    have passed ``registry.check_options``."""
    info = registry.get(name)
    fixed = info.fixed_budget(options)
    if keep is None:
        return (DEFAULT_KEEP if fixed is None else fixed.keep), fixed
    keep = _check_keep(keep)
    if fixed is not None and not fixed.accepts(keep):
        implied = f"; keep {fixed.keep:.4g}" if fixed.keep is not None else ""
        whole = f"; keep={keep!r} would not keep every visual token" if keep >= 1.0 else ""
        raise InvalidOptionError(
            f"method {info.name!r}: keep={keep!r} conflicts with {fixed.option}, which sets the visual-token budget "
            f"itself ({fixed.implied}{implied}){whole}. Drop keep={keep!r} to let {fixed.option} decide, or {fixed.fix}")
    return keep, fixed


def build_method(name: str, keep: float | None = None, **kwargs):
    """The method ``vltok.patch`` installs: options checked (names, types, ranges), keep resolved
    (:func:`resolve_keep`), then the factory."""
    info = registry.get(name)
    if keep is not None:
        _check_keep(keep)
    sig = inspect.signature(info.factory)
    unknown = [k for k in kwargs if k not in sig.parameters]
    if unknown:
        valid = [p for p in sig.parameters if p != "keep"]
        raise InvalidOptionError(f"method {name!r} has no option {', '.join(map(repr, unknown))}; its options are: "
                         f"{', '.join(valid) or '(none)'}")
    registry.check_options(info, kwargs)   # types and ranges, from the method's declared option specs
    keep, fixed = resolve_keep(name, keep, **kwargs)
    try:
        m = info.factory(keep, **kwargs)
    except (VltokError, StageProtocolError):   # (stage objects that break the protocol: the method's bug)
        raise
    except (ValueError, TypeError, ArithmeticError, OSError) as e:   # a cross-option rule, or a checkpoint to load
        raise InvalidOptionError(f"method {name!r}: {e}") from e
    if fixed is not None:
        m.keep_set_by = fixed.option
    return m


def patch(model, method: str, keep: float | None = None, *, cut_graphs: bool | None = None,
          **kwargs) -> PatchHandle:
    """Patch ``model`` in place so it carries only ``keep`` of its visual tokens; returns the handle.

    ``keep`` not given: 0.16 (:data:`DEFAULT_KEEP`), or, where an option fixes the budget itself (fourier ``r=``,
    tokenshuffle ``window=`` / ``projector=``, feather ``preset="paper"`` / ``a=``, ...), what that option implies
    (``handle.keep``); an explicit keep such an option does not agree with is refused (:func:`resolve_keep`).

    ``model(...)`` and ``model.generate(...)`` keep working on the processor's unmodified output.
    Undo with ``vltok.unpatch(model)`` or ``handle.remove()``. ``kwargs`` are the method's options;
    ``cut_graphs`` (in-LLM methods): replay the cut from CUDA graphs, see :func:`_check_cut_graphs`.
    """

    existing = getattr(model, "__dict__", {}).get(_ATTR)
    if existing is not None:
        raise AlreadyPatchedError(
            f"this model is already patched ({existing.method.name}, keep={existing._keep_text()}); call "
            "vltok.unpatch(model) (or handle.remove()) before patching it again"
        )
    adapter_cls = registry.adapter_for(model)
    spec = (method, keep, dict(kwargs))
    m = build_method(method, keep, **kwargs)
    from .support import incompatibility   # late: python -m vltok.support must not find it imported

    reason = incompatibility(adapter_cls, m)   # the same reason as the README's support matrix
    if reason:
        raise IncompatibleError(f"method {method!r} {reason}; pick a method or options that fit (python -m "
                                "vltok.support prints which method works on which family)")
    from .support import fit_to_family

    m = fit_to_family(adapter_cls, m)   # e.g. tome on Qwen2-VL merges after the merger; MustDrop's stage 1 dropped
    cut_graphs = _check_cut_graphs(cut_graphs, model, m)
    handle = PatchHandle(model, m, adapter_cls)
    handle._cut_graphs = cut_graphs
    handle._spec, handle._adapter_cls = spec, adapter_cls
    _attach(handle)
    return handle


def _attach(handle) -> None:
    """Install the handle's method on its model (nothing left installed if it fails)."""
    model = handle.model
    adapter = handle._adapter_cls(model, handle.method, handle)
    from . import compat

    compat.check(adapter)   # the transformers internals this patch needs: a clear error now, not inside attention
    try:
        adapter.attach(handle._undo)
        _install_guards(model, handle)
    except BaseException:
        while handle._undo:
            handle._undo.pop()()
        raise
    model.__dict__[_ATTR] = handle
    handle.adapter = adapter


def _install_guards(model, handle) -> None:
    """Serialize calls (``forward`` / ``generate`` under the handle's lock, skipped while torch.compile traces), make
    ``copy.deepcopy`` give an independent patched copy and refuse pickling with a clear error."""
    from .hooks import set_instance_attr
    import torch

    for name in ("forward", "generate"):
        fn = getattr(model, name, None)
        if fn is None:
            continue

        def locked(*args, _fn=fn, **kwargs):
            if torch.compiler.is_compiling():
                return _fn(*args, **kwargs)
            with handle._lock:
                return _fn(*args, **kwargs)

        set_instance_attr(model, name, functools.wraps(fn)(locked), handle._undo)

    def deepcopy(memo):
        with handle._lock:   # copy the unpatched model, then patch the copy with the same method and options
            undo, handle._undo = handle._undo, []
            while undo:
                undo.pop()()
            model.__dict__.pop(_ATTR, None)
            try:
                clone = copy.deepcopy(model, memo)
            finally:
                _attach(handle)
            name, keep, kwargs = handle._spec
            patch(clone, name, keep, cut_graphs=handle.cut_graphs, **copy.deepcopy(kwargs, memo))
            return clone

    def reduce_ex(protocol):
        raise VltokError(
            f"a model patched by vltok ({handle.method.name}) cannot be pickled or shallow-copied (torch.save(model), "
            "pickle, copy.copy): its hooks are local functions. Save model.state_dict() or model.save_pretrained(dir) "
            "(vltok does not change the weights: patch again after loading); copy.deepcopy(model) gives an "
            "independent patched copy")

    set_instance_attr(model, "__deepcopy__", deepcopy, handle._undo)
    set_instance_attr(model, "__reduce_ex__", reduce_ex, handle._undo)


def unpatch(model) -> None:
    handle = getattr(model, "__dict__", {}).get(_ATTR)
    if handle is None:
        raise NotPatchedError("this model is not patched by vltok; nothing to unpatch")
    handle.remove()


def get_handle(model) -> PatchHandle | None:
    return getattr(model, "__dict__", {}).get(_ATTR)


@contextlib.contextmanager
def patched(model, method: str, keep: float | None = None, *, cut_graphs: bool | None = None, **kwargs):
    """``with vltok.patched(model, "pool", keep=0.25) as handle: ...`` -- unpatched again on exit."""
    handle = patch(model, method, keep, cut_graphs=cut_graphs, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
