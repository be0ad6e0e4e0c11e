"""Baselines: adaptive average pooling and a seeded random subset (pre-LLM stage)."""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from ..registry import choice, integer, register
from ..stages import GridPlan, GridReducer, Method, selection_plan
from ._grid import ROUNDINGS, grid_for_keep


def pool_grid(x: torch.Tensor, h: int, w: int, r_h: int, r_w: int) -> torch.Tensor:
    """x [B, h*w, C] -> [B, r_h*r_w, C] by adaptive average pooling (PyTorch's bins, any sizes)."""
    if (r_h, r_w) == (h, w):
        return x
    g = x.unflatten(1, (h, w)).permute(0, 3, 1, 2)       # [B, C, h, w]
    y = F.adaptive_avg_pool2d(g.float() if g.dtype == torch.float16 and g.device.type == "cpu" else g, (r_h, r_w))
    return y.to(x.dtype).flatten(2).transpose(1, 2)


@lru_cache(maxsize=64)
def random_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """k of n indices, sorted ascending, from a generator seeded with ``seed`` (CPU, reproducible everywhere)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values


@lru_cache(maxsize=64)
def _indices_on(n: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    return random_indices(n, k, seed).to(device)


def select_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, n, C], idx [k] ascending -> [B, k, C] (raster order kept)."""
    return x.index_select(1, idx.to(x.device))


class PoolReducer(GridReducer):
    def __init__(self, keep: float, rounding: str):
        self.keep, self.rounding = keep, rounding

    def plan(self, h, w):
        r_h, r_w = grid_for_keep(h, w, self.keep, self.rounding)
        return GridPlan(h, w, r_h * r_w, (r_h, r_w))

    def reduce(self, x, plan):
        return pool_grid(x, plan.h, plan.w, *plan.grid)


@lru_cache(maxsize=64)
def _indices_tuple(n: int, k: int, seed: int) -> tuple[int, ...]:
    return tuple(random_indices(n, k, seed).tolist())


class RandomReducer(GridReducer):
    """A selection that depends on (h, w) and the seed only: the plan names its indices (not data-dependent)."""

    def __init__(self, keep: float, seed: int, positions: str = "contiguous"):
        self.keep, self.seed, self.positions = keep, seed, positions

    def plan(self, h, w):
        k = selection_plan(h, w, self.keep).count
        return selection_plan(h, w, self.keep, _indices_tuple(h * w, k, self.seed))

    def select(self, x, plan):
        # cached per device: no host-to-device copy per call (so the reduction can be captured in a CUDA graph)
        idx = _indices_on(plan.h * plan.w, plan.count, self.seed, x.device)
        if plan.count == plan.h * plan.w:
            return idx.expand(x.shape[0], -1), x
        return idx.expand(x.shape[0], -1), select_tokens(x, idx)


@register("pool", "Adaptive average pooling of each image grid to r_h x r_w (sqrt(keep) per axis); baseline",
          ("pre_llm",), options=dict(rounding=choice(*ROUNDINGS)))
def make_pool(keep: float, rounding: str = "nearest") -> Method:
    return Method("pool", keep, dict(rounding=rounding), pre_llm=PoolReducer(keep, rounding))


@register("random", "Seeded random subset of round(keep*N) tokens per grid, raster order kept; baseline",
          ("pre_llm",), options=dict(seed=integer(0), positions=choice("contiguous", "original")))
def make_random(keep: float, seed: int = 0, positions: str = "contiguous") -> Method:
    """``positions="original"`` (LLaVA-1.5): the kept tokens keep the position ids the full grid gave them."""
    return Method("random", keep, dict(seed=seed, positions=positions), pre_llm=RandomReducer(keep, int(seed), positions))
