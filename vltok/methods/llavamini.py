"""LLaVA-Mini, training-free level 0 (pre-LLM stage): pool each image grid to about keep*N tokens.

LLaVA-Mini compresses the grid with learned queries and fuses vision into the text with pre-fusion layers; this
module provides the compression-only analogue that works on stock weights: adaptive average pooling of the
h x w grid to an h' x w' grid whose product is the closest to keep*h*w among grids within 1.5x of the input's
aspect ratio (``budget="nearest"``, ties to the squarer grid), or the largest product not above it
(``budget="at_most"``). On 24x24: keep 0.25 -> 12x12, 0.16 -> 9x10 (90 tokens), 0.111 -> 8x8, 0.0278 -> 4x4.

The pooling runs where the adapter reduces grids (LLaVA-1.5: before the projector).
Not provided here: the early-fusion mode (first K LLM layers on all tokens) and the trained compressor +
pre-fusion adapter (see the issue tracker).
"""
from __future__ import annotations

import math

from ..registry import register
from ..stages import GridPlan, Method
from .baselines import pool_grid

BUDGETS = ("nearest", "at_most")
MODES = ("pool",)


def pooled_grid(h: int, w: int, keep: float, budget: str = "nearest") -> tuple[int, int]:
    target = keep * h * w
    best, best_key = (1, 1), None
    for r_h in range(1, h + 1):
        for r_w in {max(1, min(w, math.floor(target / r_h))), max(1, min(w, math.ceil(target / r_h)))}:
            n = r_h * r_w
            if budget == "at_most" and n > max(target, 1):
                continue
            skew = abs(math.log((r_h / r_w) / (h / w)))
            if skew > math.log(1.5) + 1e-9:
                continue
            key = (abs(n - target) if budget == "nearest" else -n, skew, r_h)
            if best_key is None or key < best_key:
                best, best_key = (r_h, r_w), key
    return best


class MiniPoolReducer:
    def __init__(self, keep: float, budget: str):
        self.keep, self.budget = keep, budget

    def plan(self, h, w):
        r_h, r_w = pooled_grid(h, w, self.keep, self.budget) if self.keep < 1.0 else (h, w)
        return GridPlan(h, w, r_h * r_w, (r_h, r_w))

    def reduce(self, x, plan):
        return pool_grid(x, plan.h, plan.w, *plan.grid)


@register("llavamini", "LLaVA-Mini training-free level 0: pool each grid to ~keep*N tokens (aspect-preserving "
          "grid); the learned compressor / early fusion are not provided yet", ("pre_llm",))
def make_llavamini(keep: float, mode: str = "pool", budget: str = "nearest") -> Method:
    if mode not in MODES:
        raise ValueError(f"llavamini: mode must be one of {MODES} (early_fusion and trained are not implemented "
                         f"yet), got {mode!r}")
    if budget not in BUDGETS:
        raise ValueError(f"llavamini: budget must be one of {BUDGETS}, got {budget!r}")
    return Method("llavamini", keep, dict(mode=mode, budget=budget), pre_llm=MiniPoolReducer(keep, budget))
