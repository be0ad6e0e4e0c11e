"""FIXTURE (tests/test_extending.py; not registered for users): a VisionZip-like method written by copying
vltok/methods/_example.py -- dominant tokens only: of each grid, the ``round(keep * h * w)`` tokens the vision
tower's CLS attends to most (side input ``cls_attention``), in raster order. (VisionZip also merges the rest into
contextual tokens; the fixture shows the side-input path, not the paper.)"""
from __future__ import annotations

import torch

from vltok.registry import register
from vltok.stages import GridPlan, GridReducer, Method, selection_plan


def dominant(cls_attention: torch.Tensor, k: int) -> torch.Tensor:
    """cls_attention [B, N] -> kept indices [B, k], ascending."""
    return cls_attention.topk(k, dim=1).indices.sort(dim=1).values


class DominantReducer(GridReducer):
    needs = ("cls_attention",)

    def __init__(self, keep: float):
        self.keep = keep

    def plan(self, h: int, w: int) -> GridPlan:
        # the count must follow from (h, w) alone: adapters shrink the placeholders before the model runs.
        # Which tokens survive depends on x, so the plan names no indices (data-dependent).
        return selection_plan(h, w, self.keep)

    def select(self, x: torch.Tensor, plan: GridPlan, cls_attention: torch.Tensor):
        idx = dominant(cls_attention.to(x.device), plan.count)
        return idx, x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


# one registration line (the decorator): name, one-line description, stages, and what each option accepts
@register("visionzip_fixture", "FIXTURE: VisionZip-like dominant tokens by CLS attention", ("pre_llm",))
def make_visionzip_fixture(keep: float) -> Method:
    return Method("visionzip_fixture", keep, {}, pre_llm=DominantReducer(keep))
