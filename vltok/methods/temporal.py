"""Temporal token reduction for videos: ``evs`` (pruning of static tokens) and ``tmerge`` (merging across time
before space). Pure tensor functions over one video's features ``x [T, h, w, d]`` (frames in time order, each an
h x w raster grid); they know no model.

``evs`` -- Efficient Video Sampling (as in vLLM's EVS for Qwen2.5-VL / Nemotron video): a token is redundant when it
nearly equals the token at the same position in the previous frame. Dissimilarity = 1 - cosine (``metric="cosine"``)
or the L2 distance (``metric="l2"``) to that token; the first frame has infinite dissimilarity (kept whole). With a
budget (``count``), the ``count`` most dissimilar tokens of the whole video are kept (stable: ties go to the earlier
token) -- i.e. the threshold is the one that meets ``keep``; with ``threshold`` instead, every token whose similarity
to its predecessor is below it (cosine) / whose distance is above it (l2) is kept (data-dependent count; pure
function only, see below). Kept tokens are copies, in time-major raster order.

``tmerge`` -- temporal merge: first across time, at a fixed position: the pairs (frame t, frame t-1) of the same
position are ranked by cosine similarity of the ORIGINAL features (stable, ties to the earlier pair) and the most
similar ones are merged until the budget is met or every position is one run; a run of merged frames becomes one
token, the mean of its members, standing at its first frame's place. Only when the budget is below one token per
position (keep < 1 / T) are the remaining runs (then one per position, each the mean over all frames) merged in
space, by CrossGET's complete-graph soft matching on their normalised features (vltok.methods.postmerge), again as
group means.

Budgets: ``video_count(T, h, w)`` is known from the shapes alone (the adapters shrink placeholder runs before the
model runs) and is a multiple of T: ``T * round(keep * h * w)`` -- the same total as a per-frame method at the same
``keep``, distributed over the frames by the data. EVS never keeps less than the first frame (vLLM's rule): its
count is at least ``T * ceil(h * w / T)``.

Images and one-frame videos: there is no time axis, so both methods pass them through unchanged (``plan(h, w)`` is
the identity); ``vltok.patch`` refuses them on families without video (the support matrix says so).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import Opt, choice, register
from ..stages import GridPlan, GridReducer, Method, kept_count

METRICS = ("cosine", "l2")


def _check(x: torch.Tensor) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"temporal methods take one video's features [frames, h, w, d]; got shape {tuple(x.shape)}")
    return tuple(x.shape)


def evs_dissimilarity(x: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """[T, h, w, d] -> [T, h*w] fp32: 1 - cos (or L2 distance) to the same position in the previous frame; +inf on
    frame 0."""
    if metric not in METRICS:
        raise ValueError(f"evs: metric must be one of {METRICS}, got {metric!r}")
    T, h, w, d = _check(x)
    y = x.reshape(T, h * w, d)
    y = y if y.dtype == torch.float64 else y.float()
    out = torch.full((T, h * w), float("inf"), device=x.device, dtype=y.dtype)
    if T > 1:
        if metric == "cosine":
            out[1:] = 1 - F.cosine_similarity(y[1:], y[:-1], dim=-1, eps=1e-8)
        else:
            out[1:] = (y[1:] - y[:-1]).norm(dim=-1)
    return out


def evs_select(x: torch.Tensor, count: int | None = None, threshold: float | None = None,
               metric: str = "cosine") -> torch.Tensor:
    """Kept token indices into the flattened video (t * h*w + i), ascending. Exactly one of ``count`` (keep the
    ``count`` most dissimilar tokens, frame 0 first; count >= h*w) or ``threshold`` (keep frame 0 and every token with
    cosine similarity < threshold, or L2 distance > threshold, to its predecessor)."""
    T, h, w, d = _check(x)
    dis = evs_dissimilarity(x, metric).flatten()
    if (count is None) == (threshold is None):
        raise ValueError("evs_select: pass exactly one of count= or threshold=")
    if threshold is not None:
        keep = dis > (1 - threshold if metric == "cosine" else threshold)
        return keep.nonzero().flatten()
    if not h * w <= count <= T * h * w:
        raise ValueError(f"evs_select: count={count} must be in [{h * w} (the first frame), {T * h * w}]")
    order = torch.sort(-dis, stable=True).indices
    return order[:count].sort().values


def evs(x: torch.Tensor, count: int, metric: str = "cosine") -> tuple[torch.Tensor, torch.Tensor]:
    """[T, h, w, d] -> (kept flat indices [count] ascending, their rows [count, d])."""
    idx = evs_select(x, count=count, metric=metric)
    return idx, x.reshape(-1, x.shape[-1]).index_select(0, idx)


def tmerge(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, h, w, d] -> (flat index of each group's first member [count] ascending, group means [count, d])."""
    T, h, w, d = _check(x)
    n = h * w
    if not 1 <= count <= T * n:
        raise ValueError(f"tmerge: count={count} must be in [1, {T * n}]")
    y = x.reshape(T, n, d)
    yf = y.float() if y.dtype != torch.float64 else y
    r = T * n - count
    r_t = min(r, (T - 1) * n)
    merged = torch.zeros(T, n, dtype=torch.bool, device=x.device)   # merged[t, i]: frame t joins frame t-1's run
    if r_t:
        sim = F.cosine_similarity(yf[1:], yf[:-1], dim=-1, eps=1e-8).flatten()     # pair (t, t-1) at (t-1)*n + i
        top = torch.sort(-sim, stable=True).indices[:r_t]
        merged[1:].view(-1)[top] = True
    # run id of every token: the index of its run's first frame; runs are summed in fp32 / fp64
    start = torch.arange(T, device=x.device)[:, None].expand(T, n).clone()
    start[merged] = 0
    start = torch.cummax(start, dim=0).values                                        # first frame of each run
    flat_rep = (start * n + torch.arange(n, device=x.device)).flatten()              # representative per token
    reps = (~merged).flatten().nonzero().flatten()                                   # ascending: run starts
    slot = torch.full((T * n,), -1, dtype=torch.long, device=x.device)
    slot[reps] = torch.arange(reps.numel(), device=x.device)
    sums = torch.zeros(reps.numel(), d, dtype=yf.dtype, device=x.device).index_add_(0, slot[flat_rep],
                                                                                      yf.reshape(-1, d))
    sizes = torch.bincount(slot[flat_rep], minlength=reps.numel()).to(yf.dtype)
    means = sums / sizes[:, None]
    if r > r_t:   # below one token per position: every run spans all frames; merge them in space
        from .postmerge import post_merge

        pos, rows = post_merge(means[None], count, "cgsm")
        return pos[0], rows[0].to(x.dtype)
    return reps, means.to(x.dtype)


class TemporalReducer(GridReducer):
    """Pre-LLM stage object for video families: ``video_count(T, h, w)`` and ``reduce_video(x [T, h, w, d]) ->
    (flat indices ascending, rows)``; ``plan(h, w)`` (images) is the identity (a selection of every token; which
    tokens of a video survive depends on the features, so the plan names no indices)."""

    temporal = True

    def __init__(self, name: str, keep: float, metric: str = "cosine"):
        self.name, self.keep, self.metric = name, keep, metric

    def plan(self, h: int, w: int) -> GridPlan:
        return GridPlan(h, w, h * w, None)

    def select(self, x, plan):
        return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1), x

    def video_count(self, t: int, h: int, w: int) -> int:
        if t <= 1:
            return t * h * w
        per = kept_count(h * w, self.keep)
        if self.name == "evs":
            per = max(per, math.ceil(h * w / t))
        return t * per

    def reduce_video(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T, h, w, d = _check(x)
        count = self.video_count(T, h, w)
        if count == T * h * w:
            return torch.arange(count, device=x.device), x.reshape(-1, d)
        if self.name == "evs":
            return evs(x, count, self.metric)
        return tmerge(x, count)


_IMAGES = ("Images and one-frame videos pass through unchanged (no time axis); families without video refuse it")


@register("evs", "Efficient Video Sampling: per video, keep the tokens least similar to the same position in the "
          "previous frame (first frame whole; budget T*round(keep*h*w)); videos only", ("pre_llm",),
          options=dict(metric=choice(*METRICS), threshold=Opt(
              "None (a fixed threshold keeps a data-dependent count of tokens, which vltok cannot announce to the "
              "placeholders before the model runs; use vltok.methods.temporal.evs_select(x, threshold=...) as a "
              "function, or set keep)", lambda v: v is None)))
def make_evs(keep: float, metric: str = "cosine", threshold: float | None = None) -> Method:
    if metric not in METRICS:
        raise ValueError(f"evs: metric must be one of {METRICS}, got {metric!r}")
    if threshold is not None:
        raise ValueError("evs: threshold= gives a data-dependent token count, which vltok cannot announce to the "
                         "model's placeholders before it runs; use keep= (the threshold that meets the budget), or "
                         "call vltok.methods.temporal.evs_select(x, threshold=...) on features directly")
    return Method("evs", keep, dict(metric=metric), pre_llm=TemporalReducer("evs", keep, metric))


@register("tmerge", "Temporal merge: per position, merge runs of similar consecutive frames (mean) before merging in "
          "space; budget T*round(keep*h*w); videos only", ("pre_llm",))
def make_tmerge(keep: float) -> Method:
    return Method("tmerge", keep, {}, pre_llm=TemporalReducer("tmerge", keep))
