"""ToMe: bipartite soft matching inside the vision encoder (vision stage; the baseline of CrossGET).

Per merging layer, between the attention residual and the MLP: the head-mean keys are L2-normalised; tokens are
split alternately into A (even positions) and B (odd positions); every A token picks its most similar B token; the
r A tokens with the best matches merge into their partners by a size-weighted mean. Token sizes are carried across
layers for proportional attention (the encoder adds log(size_j) to every key's logit; vltok/vision.py).

Protected leading tokens (CLS, registers) are never sources nor destinations. Output order is the raster order
of each group's smallest original index (``order="raster"``, vltok's default) or ToMe's ``[unmerged A (ascending),
B]`` (``order="tome"``, the paper's). The default is raster because a VLM's projector and LLM read the tokens in
order: on the reference VLM (H100, 756 questions) ToMe's own order scores 38.0 / 33.2 % at keep 0.5 / 0.16, raster
63.6 / 46.7 % (eval/results/quality-h100.md, rows ``tome-tomeorder`` and ``tome``).

The budget: N_out = round(keep * N_patches) tokens leave the last layer whose output the model uses; the
R = N_patches - N_out merges are spread over those layers as evenly as possible (larger r first). A layer whose r
exceeds ToMe's cap (half the unprotected tokens) merges in several rounds, so the count is always exact and known
before the model runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import boolean, choice, register
from ..stages import Method, VisionMerger, kept_count

ORDERS = ("tome", "raster")


def spread_schedule(n_patches: int, keep: float, n_layers: int, late: bool = False, early: bool = False) -> list[int]:
    """r per layer: R = n_patches - round(keep * n_patches) merges over ``n_layers`` layers, larger values first.
    ``late``: only the second half of the layers merge (from layer n_layers // 2; early features stay intact).
    ``early``: only the first quarter of the layers merge (layers 0 .. max(1, n_layers // 4) - 1): the later
    layers run on the reduced count (speed; e.g. the 32-block Qwen2-VL tower, whose cost is most of the prefill)."""
    if n_layers < 1:
        raise ValueError("a vision-stage schedule needs at least one merging layer")
    n_out = kept_count(n_patches, keep)
    total = n_patches - n_out
    start = n_layers // 2 if late else 0
    stop = max(1, n_layers // 4) if early else n_layers
    base, extra = divmod(total, stop - start)
    return [0] * start + [base + (1 if i < extra else 0) for i in range(stop - start)] + [0] * (n_layers - stop)


SCHEDULES = ("auto", "constant", "late", "early", "post")


def round_sizes(n_tokens: int, n_protected: int, r: int) -> list[int]:
    """Split one layer's r into rounds of at most half the unprotected tokens each (ToMe's cap)."""
    rounds = []
    t = n_tokens
    while r > 0:
        cap = (t - n_protected) // 2
        if cap < 1:
            raise ValueError(f"cannot merge {r} more tokens out of {t - n_protected} unprotected ones")
        step = min(r, cap)
        rounds.append(step)
        r -= step
        t -= step
    return rounds


def head_mean_metric(keys: torch.Tensor) -> torch.Tensor:
    """keys [B, N, H, d] -> the L2-normalised head-mean keys [B, N, d] (fp32)."""
    return F.normalize(keys.float().mean(2), dim=-1)


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, metric: torch.Tensor, r: int,
                    n_protected: int, order: str = "tome", anchor: torch.Tensor | None = None):
    """One ToMe round. x [B, N, C], size [B, N, 1], pos [B, N] (smallest original index of each group),
    metric [B, N, d] normalised. Returns (x, size, pos) with N - r tokens. Inputs are not modified.
    ``anchor`` [B, N] (optional): a value per token that each output token takes from the token standing there
    (the destination of a merged group, itself otherwise); then (x, size, pos, anchor) is returned."""
    B, N, C = x.shape
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)             # [B, Na, Nb]: A = even, B = odd
    if n_protected:   # protected tokens are positions < n_protected: the first ceil(p/2) of A, floor(p/2) of B
        scores[:, :(n_protected + 1) // 2] = float("-inf")
        scores[:, :, :n_protected // 2] = float("-inf")
    best, best_b = scores.max(-1)                                              # [B, Na]
    edge = best.argsort(dim=-1, descending=True, stable=True)
    src = edge[:, :r]                                                          # A positions that merge
    unm = edge[:, r:].sort(dim=-1).values                                      # A positions that stay
    dst = best_b.gather(1, src)                                                # their B partners

    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    pa, pb = pos[:, ::2], pos[:, 1::2]
    gsrc, gdst = src[..., None], dst[..., None]
    s_src = sa.gather(1, gsrc)
    u_src = xa.gather(1, gsrc.expand(-1, -1, C)) * s_src                      # size space (fp32 for half inputs)
    ub = (xb * sb).scatter_add_(1, gdst.expand(-1, -1, C), u_src)
    sb = sb.scatter_add(1, gdst, s_src)
    pb = pb.scatter_reduce(1, dst, pa.gather(1, src), reduce="amin")
    touched = torch.zeros(B, xb.shape[1], 1, dtype=torch.bool, device=x.device).scatter_(1, gdst, True)
    xb = torch.where(touched, (ub / sb).to(x.dtype), xb)                      # untouched tokens stay bit-exact
    gunm = unm[..., None]
    x_out = torch.cat([xa.gather(1, gunm.expand(-1, -1, C)), xb], 1)
    s_out = torch.cat([sa.gather(1, gunm), sb], 1)
    p_out = torch.cat([pa.gather(1, unm), pb], 1)
    a_out = None if anchor is None else torch.cat([anchor[:, ::2].gather(1, unm), anchor[:, 1::2]], 1)
    if order == "raster":
        perm = p_out.argsort(dim=-1, stable=True)
        x_out = x_out.gather(1, perm[..., None].expand(-1, -1, C))
        s_out, p_out = s_out.gather(1, perm[..., None]), p_out.gather(1, perm)
        a_out = None if a_out is None else a_out.gather(1, perm)
    return (x_out, s_out, p_out) if anchor is None else (x_out, s_out, p_out, a_out)


class TomeMerger(VisionMerger):
    """Vision-stage object (vltok/vision.py protocol): ``schedule`` and ``merge``."""

    needs_query = False

    def __init__(self, keep: float, order: str, prop_attn: bool, late: bool = False, post=None, early: bool = False):
        self.keep, self.order, self.prop_attn, self.late, self.early = keep, order, prop_attn, late, early
        self.post = post   # schedule="auto": the pre-LLM reducer that stands in where the family has no vision stage

    def schedule(self, n_patches: int, n_layers: int) -> list[int]:
        return spread_schedule(n_patches, self.keep, n_layers, self.late, self.early)

    def merge(self, x, size, pos, keys, query, r, n_protected, extra=None, anchor=None):
        """``extra`` [B, N, E] (optional): channels merged alongside x with the same weights, never matched on
        (vltok.vision's group tracer); then (x, size, pos, extra) is returned. ``anchor`` [B, N] (optional): a
        value each output token takes from the token standing there (a merged group's destination; the Qwen
        tower keeps that unit's rotary position); then (x, size, pos, anchor) is returned (not with ``extra``)."""
        if extra is not None:   # x is only averaged (the matching reads the keys): carry extra as more channels
            if anchor is not None:
                raise ValueError("merge: pass extra or anchor, not both")
            C = x.shape[-1]
            y, size, pos = self.merge(torch.cat([x.float(), extra.float()], -1), size, pos, keys, query, r,
                                      n_protected)
            return y[..., :C].to(x.dtype), size, pos, y[..., C:]
        kmean = keys.float().mean(2)
        rounds = round_sizes(x.shape[1], n_protected, r)
        if len(rounds) == 1:
            return bipartite_merge(x, size, pos, F.normalize(kmean, dim=-1), r, n_protected, self.order, anchor)
        # several rounds in one layer: the merged tokens' keys are the size-weighted means of their members' keys
        C = x.shape[-1]
        both = torch.cat([x.float(), kmean], -1)
        for step in rounds:
            out = bipartite_merge(both, size, pos, F.normalize(both[..., C:], dim=-1), step, n_protected,
                                  self.order, anchor)
            both, size, pos = out[:3]
            anchor = out[3] if anchor is not None else None
        y = both[..., :C].to(x.dtype)
        return (y, size, pos) if anchor is None else (y, size, pos, anchor)


@register("tome", "ToMe: bipartite soft matching inside the vision encoder, size-weighted merges, proportional "
          "attention; round(keep*N) tokens leave the encoder (schedule='post': merged after the encoder instead, "
          "where the family has no vision stage)", ("vision",), variants=(("schedule=post", {"schedule": "post"}),),
          options=dict(order=choice(*ORDERS), prop_attn=boolean(), schedule=choice(*SCHEDULES)))
def make_tome(keep: float, order: str = "raster", prop_attn: bool = True, schedule: str = "auto") -> Method:
    from .postmerge import PostMergeReducer

    post = PostMergeReducer(keep, "bipartite")
    if schedule == "post":
        return Method("tome", keep, dict(schedule="post"), pre_llm=post)
    return Method("tome", keep, dict(order=order, prop_attn=prop_attn, schedule=schedule),
                  vision=TomeMerger(keep, order, prop_attn, schedule == "late", post if schedule == "auto" else None,
                                    schedule == "early"))
