"""Triton availability: kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (how CI tests them).

triton is imported on first use (the first ``usable`` check on tensors a kernel could take, or the first launch):
``import vltok`` never imports it (about 0.5 s, also on machines without a GPU)."""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def have_triton() -> bool:
    """Whether triton imports (the `kernels` extra); imports it the first time."""
    try:
        import triton  # noqa: F401
        import triton.language as tl  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def __getattr__(name):   # HAVE_TRITON, read lazily (kept for callers of the former module constant)
    if name == "HAVE_TRITON":
        return have_triton()
    raise AttributeError(name)


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(*tensors) -> bool:
    """True when a Triton kernel can run on these tensors (CUDA, or the interpreter on CPU)."""
    if os.environ.get("VLTOK_DISABLE_TRITON") == "1":
        return False
    if not (all(t.is_cuda for t in tensors) or (interpret() and all(t.device.type == "cpu" for t in tensors))):
        return False
    return have_triton()


def lazy_definer(module_globals: dict, define):
    """A decorator for a kernel module's launch functions: the module's Triton kernels are defined by ``define()``
    (which imports triton and binds ``tl`` in the module) on the first call of any of them."""
    def deco(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if "tl" not in module_globals:
                define()
            return fn(*args, **kwargs)
        return run
    return deco
