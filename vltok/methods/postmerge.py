"""Merging after the vision encoder (``schedule="post"`` of ``tome`` and ``crossget``): a pre-LLM reducer.

Where merging inside the encoder breaks the model's own layout -- LLaVA-NeXT packs each crop into 24 x 24 tiles,
unpads them and appends newline tokens; Qwen2-VL groups 2 x 2 patches in its PatchMerger and rotates each patch by
its own (h, w) -- the merge runs on one image's final visual grid instead (LLaVA: the projector's output; NeXT: the
base tile and the unpadded map, newline tokens untouched; Qwen: the merger's output, per frame).

One image x [B, N, C] (raster order) loses R = N - round(keep * N) tokens in rounds of at most half the tokens
(ToMe's cap; keep 0.16 of 576: 288, 144, 52). Each round matches on the L2-normalised current features (no keys
exist here) with the method's matcher -- ToMe's bipartite matching or CrossGET's complete-graph soft matching
(no CLS here, so no importance: the ensemble is the size-weighted mean) -- and merges by the size-weighted mean;
sizes carry over between rounds, so the final rows are the exact means of their groups.

Output: the kept tokens in the raster order of their groups' smallest original index, and those indices. A
merged token stands at its earliest member's place: the adapters give it that token's position (Qwen's (t, h, w);
in-LLM layouts), the same rule ToMe's ``order="raster"`` uses. (The spec says "the destination's" position;
over several rounds the destination of the last round need not be the earliest member -- a measured quality
difference was not looked for.)

The reducer is a selection reducer (``plan.grid is None``) whose rows are not copies of the input: ``select``
returns both (a merging selection, ``merges = True``). It is data-dependent (its plan names no indices): which
indices survive is known only from the features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..stages import GridPlan, GridReducer, selection_plan
from .crossget import cgsm_match, cgsm_merge
from .tome import bipartite_merge, round_sizes

MATCHERS = ("bipartite", "cgsm")


def post_merge(x: torch.Tensor, n_out: int, matcher: str = "cgsm", groups: bool = False):
    """x [B, N, C] -> (indices [B, n_out] ascending: each group's smallest original index, rows [B, n_out, C]).

    x is not modified; the rows are x's dtype (means taken in fp32 for half inputs). ``groups=True`` also returns
    [B, N]: the output row each input token went into (a one-hot tracer merged alongside, never matched on)."""
    if matcher not in MATCHERS:
        raise ValueError(f"post_merge: matcher must be one of {MATCHERS}, got {matcher!r}")
    B, N, C = x.shape
    if not 1 <= n_out <= N:
        raise ValueError(f"post_merge: n_out={n_out} must be in [1, {N}]")
    y = x if x.dtype == torch.float64 else x.float()
    if groups:
        y = torch.cat([y, torch.eye(N, device=x.device, dtype=y.dtype).expand(B, N, N)], -1)
    size = torch.ones(B, N, 1, device=x.device, dtype=y.dtype)
    pos = torch.arange(N, device=x.device).expand(B, N)
    for step in round_sizes(N, 0, N - n_out):
        metric = F.normalize(y[..., :C], dim=-1)
        if matcher == "bipartite":
            y, size, pos = bipartite_merge(y, size, pos, metric, step, 0, "raster")
            continue
        zero = torch.zeros(B, y.shape[1], device=x.device)
        src, dst, is_src = cgsm_match(metric, zero, step, 0)
        y, size, pos = cgsm_merge(y, size, pos, zero, src, dst, is_src, "size")
        order = pos.argsort(dim=-1, stable=True)   # destinations keep their order; a group's earliest member
        y = y.gather(1, order[..., None].expand(-1, -1, y.shape[-1]))   # may come before an earlier destination
        size, pos = size.gather(1, order[..., None]), pos.gather(1, order)
    if groups:
        return pos, y[..., :C].to(x.dtype), y[..., C:].argmax(1)
    return pos, y.to(x.dtype)


class PostMergeReducer(GridReducer):
    """Pre-LLM stage object: a merging selection (data-dependent: its plan names no indices)."""

    merges = True

    def __init__(self, keep: float, matcher: str):
        self.keep, self.matcher = keep, matcher

    def plan(self, h: int, w: int) -> GridPlan:
        return selection_plan(h, w, self.keep)

    def select(self, x, plan, groups: bool = False):
        """(indices, rows[, groups [B, N]: the output row each input token went into -- vltok.kept's record])."""
        if plan.count == x.shape[1]:
            idx = torch.arange(plan.count, device=x.device).expand(x.shape[0], -1)
            return (idx, x, idx) if groups else (idx, x)
        return post_merge(x, plan.count, self.matcher, groups=groups)
