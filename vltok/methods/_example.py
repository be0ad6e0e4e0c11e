"""TEMPLATE of a method (copy it to vltok/methods/<name>.py; docs/extending.md walks through it).

A method is pure tensor code: it never imports a model, transformers or an adapter. It may import vltok.stages (the
protocol), vltok.kernels, vltok.errors, vltok.registry and other methods (tests/test_layering.py checks it).

This one is a pre-LLM SELECTION: of each image's grid it keeps the ``round(keep * h * w)`` tokens with the largest
L2 norm, in raster order. A resampling method would implement ``reduce(x, plan)`` instead of ``select`` and return a
plan with ``grid=(r_h, r_w)`` (see vltok/methods/baselines.py, PoolReducer).
"""
from __future__ import annotations

import torch

from ..registry import choice, register
from ..stages import GridPlan, GridReducer, Method, selection_plan


def norm_select(x: torch.Tensor, k: int, order: str = "norm") -> torch.Tensor:
    """The pure function (test it alone): x [B, N, C] -> kept indices [B, k], ascending."""
    score = x.float().norm(dim=-1) if order == "norm" else -x.float().norm(dim=-1)
    return score.topk(k, dim=1).indices.sort(dim=1).values


class NormReducer(GridReducer):
    """The stage object. Declared attributes of GridReducer you may set: ``needs`` (side inputs, e.g.
    ``("cls_attention",)``, then ``select(x, plan, cls_attention=...)``), ``merges``, ``temporal``, ``projector``."""

    def __init__(self, keep: float, order: str):
        self.keep, self.order = keep, order

    def plan(self, h: int, w: int) -> GridPlan:
        # the count must follow from (h, w) alone: adapters shrink the placeholders before the model runs.
        # Which tokens survive depends on x, so the plan names no indices (data-dependent).
        return selection_plan(h, w, self.keep)

    def select(self, x: torch.Tensor, plan: GridPlan):
        idx = norm_select(x, plan.count, self.order)
        return idx, x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# one registration line (the decorator): name, one-line description, stages, and what each option accepts
@register("example", "TEMPLATE: keep the round(keep*N) tokens of largest L2 norm per grid, raster order kept",
          ("pre_llm",), options=dict(order=choice("norm", "inverse")))
def make_example(keep: float, order: str = "norm") -> Method:
    return Method("example", keep, dict(order=order), pre_llm=NormReducer(keep, order))
