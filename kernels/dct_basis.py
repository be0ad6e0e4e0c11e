"""The DCT low-pass basis of Fourier-VLM (vltok.methods.fourier): shared by the torch path there and the Triton path
(vltok.kernels.dct). Pure torch; imports nothing of vltok.

Y = (B_{h->r_h} (x) B_{w->r_w}) X, with B_{N->r} = C_r^T [I_r 0] C_N and C_N the orthonormal DCT-II matrix."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

GAINS = ("resize", "paper")
IMPLS = ("auto", "dense", "separable", "triton")
DENSE_MAX_TOKENS = 4096


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix C[k, m] = a_k cos(pi (2m+1) k / 2n)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    m = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def band_resample_matrix(n: int, r: int, dtype=torch.float64) -> torch.Tensor:
    """B_{n->r} = C_r^T [I_r 0] C_n, shape [r, n]: DCT, keep r lowest frequencies, inverse DCT of size r."""
    if r == n:
        return torch.eye(n, dtype=dtype)
    return (dct_matrix(r).T @ dct_matrix(n)[:r]).to(dtype)


def gain_factor(h: int, w: int, r_h: int, r_w: int, gain: str) -> float:
    if gain == "resize":
        return math.sqrt((r_h * r_w) / (h * w))
    if gain == "paper":
        return 1.0
    raise ValueError(f"gain must be one of {GAINS}, got {gain!r}")


@lru_cache(maxsize=64)
def dense_basis(h, w, r_h, r_w, gain, dtype, device) -> torch.Tensor:
    m = torch.kron(band_resample_matrix(h, r_h), band_resample_matrix(w, r_w)) * gain_factor(h, w, r_h, r_w, gain)
    return m.to(dtype=dtype, device=device)


@lru_cache(maxsize=64)
def separable_basis(h, w, r_h, r_w, gain, dtype, device):
    g = gain_factor(h, w, r_h, r_w, gain)
    bh = band_resample_matrix(h, r_h) * g
    bw = band_resample_matrix(w, r_w)
    return bh.to(dtype=dtype, device=device), bw.to(dtype=dtype, device=device)


def check_args(x, h, w, r_h, r_w, impl):
    if x.dim() != 3 or x.shape[1] != h * w:
        raise ValueError(f"dct_lowpass expects x of shape [B, {h}*{w}, C], got {tuple(x.shape)}")
    if not (1 <= r_h <= h and 1 <= r_w <= w):
        raise ValueError(f"output grid ({r_h}, {r_w}) must lie within 1..({h}, {w})")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
