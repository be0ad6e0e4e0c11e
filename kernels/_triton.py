"""Triton availability: kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (how CI tests them)."""
from __future__ import annotations

import os

import torch

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


def jit(fn):
    """``triton.jit`` with no argument specialised on its value or alignment (every non-constexpr parameter in
    ``do_not_specialize`` and ``do_not_specialize_on_alignment``): one compiled kernel then serves every call with
    the same dtypes, integer widths and compile-time constants, which is what :func:`launch` relies on."""
    import inspect

    names = [n for n, p in inspect.signature(fn).parameters.items() if "constexpr" not in str(p.annotation)]
    return triton.jit(do_not_specialize=names, do_not_specialize_on_alignment=names)(fn)


_INT32 = (-2 ** 31, 2 ** 31)


def launch(kernel, grid, *args, num_warps: int = 4, **constexprs):
    """``kernel[grid](*args, num_warps=..., **constexprs)`` for a kernel made by :func:`jit`, with triton's per-call
    argument binding done once per (tensor dtypes, integer widths, constexprs, num_warps): later launches call the
    compiled kernel's launcher directly, as triton's own ``run`` ends up doing. On a slow host that binding is most
    of a small kernel's launch cost (~70-170 us per launch measured inside a 7B forward on the lent H100's host,
    eval/results/README.md). ``args`` are the kernel's non-constexpr parameters in order; the constexprs follow
    them in the signature. Under TRITON_INTERPRET=1 every launch goes through triton."""
    key = (torch.cuda.current_device() if torch.cuda.is_available() else -1,
           tuple(a.dtype if isinstance(a, torch.Tensor) else (type(a), type(a) is int and _INT32[0] <= a < _INT32[1])
                 for a in args), tuple(constexprs.items()), num_warps)
    cache = kernel.__dict__.setdefault("_vltok_launch", {})
    entry = cache.get(key)
    if entry is None or interpret():
        compiled = kernel[grid](*args, num_warps=num_warps, **constexprs)
        run = getattr(compiled, "run", None)
        if run is not None and hasattr(compiled, "packed_metadata") and not interpret():
            names = kernel.arg_names[len(args):]
            if sorted(names) == sorted(constexprs):   # the constexprs close the signature: the direct call's tail
                cache[key] = (compiled, tuple(names))
        return
    compiled, names = entry
    g = tuple(grid) + (1, 1)
    stream = torch.cuda.current_stream().cuda_stream
    compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, None, None, None, *args,
                 *(constexprs[n] for n in names))
