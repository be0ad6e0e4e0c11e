"""Triton availability: kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (how CI tests them)."""
from __future__ import annotations

import os

try:  # triton is optional (the `kernels` extra)
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(*tensors) -> bool:
    """True when a Triton kernel can run on these tensors (CUDA, or the interpreter on CPU)."""
    if not HAVE_TRITON or os.environ.get("VLTOK_DISABLE_TRITON") == "1":
        return False
    return all(t.is_cuda for t in tensors) or (interpret() and all(t.device.type == "cpu" for t in tensors))
