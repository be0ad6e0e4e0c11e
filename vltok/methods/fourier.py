"""Fourier-VLM: 2-D DCT low-pass resampling of a visual-token grid (pre-LLM stage).

Y = (B_{h->r_h} (x) B_{w->r_w}) X, with B_{N->r} = C_r^T [I_r 0] C_N and C_N the orthonormal DCT-II matrix:
a DCT, a crop to the lowest r_h x r_w frequencies, and an inverse DCT of size r. It is one fixed linear map on
the token axis, applied as one GEMM with a cached basis (dense) or as two small GEMMs (separable, big grids).

``gain="resize"`` (default, training-free) scales by sqrt(r_h r_w / (h w)) so a constant grid stays constant;
``gain="paper"`` keeps the official op's amplification sqrt(h w / (r_h r_w)) for the authors' fine-tuned checkpoints.
"""
from __future__ import annotations

import warnings

import torch

from ..registry import FixedBudget, boolean, choice, int_pair, optional, register
from ..stages import GridPlan, GridReducer, Method
from ._grid import ROUNDINGS, grid_for_keep


def triton_dct_lowpass(*args, **kwargs):
    from vltok.kernels.dct import dct_lowpass as kernel

    return kernel(*args, **kwargs)

from ..kernels.dct_basis import (DENSE_MAX_TOKENS, GAINS, IMPLS, band_resample_matrix,  # noqa: F401
                                 check_args as _check, dct_matrix, dense_basis as _dense_basis,
                                 gain_factor as _gain, separable_basis as _separable_basis)


def dct_lowpass(x: torch.Tensor, h: int, w: int, r_h: int, r_w: int, gain: str = "resize",
                impl: str = "auto", precise: bool = False) -> torch.Tensor:
    """x [B, h*w, C] (raster) -> [B, r_h*r_w, C]. Pure function; x is not modified.

    The basis is cached per (h, w, r_h, r_w, gain, dtype, device). Low-precision inputs use a basis in the
    input dtype (GEMMs accumulate in fp32); ``precise=True`` computes in fp32 and casts back. ``impl``:
    ``dense`` (one torch GEMM), ``separable`` (two small GEMMs, for big grids), ``triton`` (vltok.kernels.dct),
    ``auto`` (dense up to 4096 tokens, else separable). ``auto`` does not pick Triton: on an H100 the cuBLAS GEMM
    was as fast or faster at every size measured (eval/results/kernels-h100.md).
    """
    _check(x, h, w, r_h, r_w, impl)
    if (r_h, r_w) == (h, w) and gain == "resize":
        return x
    if impl == "triton":
        return triton_dct_lowpass(x, h, w, r_h, r_w, gain=gain, precise=precise)
    out_dtype = x.dtype
    work = torch.float32 if (precise or x.dtype not in (torch.float16, torch.bfloat16)) else x.dtype
    if x.dtype == torch.float64:
        work = torch.float64
    xw = x.to(work)
    if impl == "dense" or (impl == "auto" and h * w <= DENSE_MAX_TOKENS):
        y = torch.matmul(_dense_basis(h, w, r_h, r_w, gain, work, x.device), xw)
    else:
        bh, bw = _separable_basis(h, w, r_h, r_w, gain, work, x.device)
        g = xw.unflatten(1, (h, w))                       # [B, h, w, C]
        g = torch.einsum("ph,bhwc->bpwc", bh, g)          # [B, r_h, w, C]
        g = torch.einsum("qw,bpwc->bpqc", bw, g)          # [B, r_h, r_w, C]
        y = g.flatten(1, 2)
    return y.to(out_dtype)


class FourierReducer(GridReducer):
    def __init__(self, keep: float, r: int | tuple[int, int] | None, gain: str, rounding: str, impl: str,
                 precise: bool):
        self.keep, self.r, self.gain, self.rounding, self.impl, self.precise = keep, r, gain, rounding, impl, precise

    def plan(self, h: int, w: int) -> GridPlan:
        if self.r is not None:
            r_h, r_w = (self.r, self.r) if isinstance(self.r, int) else tuple(self.r)
            if r_h >= h and r_w >= w:
                warnings.warn(f"fourier: r={self.r!r} is not smaller than this {h}x{w} grid, so it keeps all its "
                              f"{h * w} tokens (no reduction); pass a smaller r, or keep= instead of r", stacklevel=2)
            r_h, r_w = min(r_h, h), min(r_w, w)
        else:
            r_h, r_w = grid_for_keep(h, w, self.keep, self.rounding)
        return GridPlan(h, w, r_h * r_w, (r_h, r_w))

    def reduce(self, x: torch.Tensor, plan: GridPlan) -> torch.Tensor:
        return dct_lowpass(x, plan.h, plan.w, *plan.grid, gain=self.gain, impl=self.impl, precise=self.precise)


def fourier_budget(options: dict) -> FixedBudget | None:
    """``r=`` fixes every image's output grid, so the keep it gives depends on the image's grid: it takes no keep."""
    r = options.get("r")
    if r is None:
        return None
    r_h, r_w = (r, r) if isinstance(r, int) else tuple(r)
    eg = f", e.g. {r_h * r_w / 576:.3g} of 24x24" if r_h * r_w < 576 else ""
    return FixedBudget(f"r={r!r}", f"the output grid of every image at {r_h}x{r_w}: keep = {r_h * r_w}/(h*w) of an "
                       f"h x w grid{eg}", "drop r=... to let keep choose the grid")


@register("fourier", "Fourier-VLM: 2-D DCT low-pass resampling of each image grid to r_h x r_w (sqrt(keep) per axis)",
          ("pre_llm",), options=dict(r=optional(int_pair(1)), gain=choice(*GAINS), rounding=choice(*ROUNDINGS),
                                     impl=choice(*IMPLS), precise=boolean()), budget=fourier_budget)
def make_fourier(keep: float | None, r=None, gain: str = "resize", rounding: str = "nearest", impl: str = "auto",
                 precise: bool = False) -> Method:
    if keep is None and r is None:
        raise ValueError("fourier needs keep or r (the output grid)")
    params = dict(r=r, gain=gain, rounding=rounding, impl=impl, precise=precise)
    return Method("fourier", keep, params, pre_llm=FourierReducer(keep, r, gain, rounding, impl, precise))
