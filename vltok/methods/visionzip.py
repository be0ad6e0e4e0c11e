"""VisionZip (Yang et al., CVPR'25, arXiv 2412.04467): dominant tokens by the vision tower's CLS attention, the rest
merged into a few contextual tokens. Pre-LLM, training-free.

Checked against the authors' code (dvlab-research/VisionZip, ``CLIPVisionTower_VisionZip.forward``, the
``visionzip/clip_encoder.py`` of the pip package; read through the code search, no copy):

1. dominant: the ``dominant`` patches with the highest CLS-query attention of the layer whose output feeds the
   projector (LLaVA: ``hidden_states[-2]`` with ``attentions[-2]``), summed over heads (= the mean's ranking). The
   authors also keep the CLS token; vltok's LLaVA grid holds the patch tokens only (``vision_feature_select_strategy
   ="default"`` drops CLS), so all ``count`` output tokens come from the patches here.
2. contextual: the N' = N - dominant other tokens (raster order); ``contextual`` targets at stride N' // contextual
   among them (indices 0, s, 2s, ..., the first ``contextual``); every other token goes to the target of highest
   cosine similarity (argmax, ties to the first target) of the L2-normalised metric; a contextual token is the
   target's row PLUS the mean of the rows assigned to it (the authors' ``target_hidden + aggregated_hidden``;
   ``merge="mean"`` takes the plain mean of the group, target included, instead).
3. output order: the dominant tokens in raster order, then the contextual ones in target order (``order="paper"``);
   ``order="raster"`` puts each contextual token at its target's raster place.

The authors' metric is the key projection of that layer (mean over heads). vltok's reducer sees the features the
projector receives (the layer's output), so the similarity is computed on those features (``metric`` argument of
:func:`visionzip`; the reducer passes the features). Split: the paper's 54 + 10 of 64 (108 + 20, 162 + 30):
``contextual = round(count * 10 / 64)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IncompatibleError
from ..registry import choice, real, register
from ..stages import GridPlan, GridReducer, Method, selection_plan

ORDERS = ("paper", "raster")
MERGES = ("paper", "mean")
CONTEXTUAL_SHARE = 10 / 64   # the paper's 54 dominant + 10 contextual of 64 (LLaVA-1.5)


def split_budget(count: int, share: float = CONTEXTUAL_SHARE) -> tuple[int, int]:
    """(dominant, contextual) of ``count`` output tokens: contextual = round(count * share), at least one dominant."""
    c = min(max(int(round(count * share)), 0), count - 1)
    return count - c, c


def _top_stable(score: torch.Tensor, k: int) -> torch.Tensor:
    """[B, N] -> [B, k] the k highest (ties to the lower index), ascending."""
    return score.argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values


def visionzip(x: torch.Tensor, cls_attention: torch.Tensor, dominant: int, contextual: int,
              metric: torch.Tensor | None = None, merge: str = "paper", order: str = "paper"):
    """x [B, N, C], cls_attention [B, N] -> (indices [B, d + c], rows [B, d + c, C]).

    ``indices``: each output token's raster index (a dominant token's own; a contextual token's target's); rows in
    ``order`` (see the module doc); ``metric`` [B, N, C'] (default x) is what the similarity is computed on."""
    if merge not in MERGES or order not in ORDERS:
        raise ValueError(f"visionzip: merge must be one of {MERGES}, order one of {ORDERS}")
    B, N, C = x.shape
    if cls_attention.shape != (B, N):
        raise ValueError(f"visionzip: cls_attention has shape {tuple(cls_attention.shape)}, expected {(B, N)}")
    if not (1 <= dominant and 0 <= contextual and dominant + contextual <= N):
        raise ValueError(f"visionzip: dominant={dominant} + contextual={contextual} must fit {N} tokens")
    dom = _top_stable(cls_attention.float(), dominant)                             # [B, d] ascending
    if contextual == 0:
        return dom, x.gather(1, dom[..., None].expand(-1, -1, C))
    is_dom = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, dom, True)
    rest = is_dom.to(torch.int8).argsort(dim=1, stable=True)[:, :N - dominant]    # [B, N'] non-dominant, ascending
    n_rest = N - dominant
    step = max(1, n_rest // contextual)
    t_pos = torch.arange(0, n_rest, step, device=x.device)[:contextual]           # targets among the rest
    is_t = torch.zeros(n_rest, dtype=torch.bool, device=x.device).index_fill_(0, t_pos, True)
    o_pos = is_t.to(torch.int8).argsort(stable=True)[:n_rest - t_pos.numel()]    # the others (no host sync)
    m = x if metric is None else metric
    mr = F.normalize(m.float().gather(1, rest[..., None].expand(-1, -1, m.shape[-1])), dim=-1)
    xr = x.float().gather(1, rest[..., None].expand(-1, -1, C))
    sim = mr[:, o_pos] @ mr[:, t_pos].transpose(1, 2)                             # [B, N'-c, c]
    assign = torch.zeros_like(sim).scatter_(2, sim.argmax(dim=2, keepdim=True), 1.0)   # [B, N'-c, c] one-hot
    sums = assign.transpose(1, 2) @ xr[:, o_pos]                                  # [B, c, C]
    counts = assign.sum(1)[..., None]
    target = xr[:, t_pos]
    if merge == "paper":
        ctx = target + sums / counts.clamp(min=1)
    else:
        ctx = (target + sums) / (counts + 1)
    ctx_idx = rest[:, t_pos]
    idx = torch.cat([dom, ctx_idx], 1)
    rows = torch.cat([x.gather(1, dom[..., None].expand(-1, -1, C)), ctx.to(x.dtype)], 1)
    if order == "raster":
        o = idx.argsort(dim=1)
        idx, rows = idx.gather(1, o), rows.gather(1, o[..., None].expand(-1, -1, C))
    return idx, rows


class VisionZipReducer(GridReducer):
    """Pre-LLM stage object (a selection whose contextual rows are merges): ``plan`` / ``select``."""

    needs = ("cls_attention",)

    def __init__(self, keep: float, contextual_share: float, merge: str, order: str):
        self.keep, self.share, self.merge, self.order = keep, contextual_share, merge, order

    def plan(self, h: int, w: int) -> GridPlan:
        return selection_plan(h, w, self.keep)

    def select(self, x, plan, cls_attention=None, **side):
        if plan.count == x.shape[1]:
            return torch.arange(plan.count, device=x.device).expand(x.shape[0], -1), x
        if cls_attention is None:
            raise IncompatibleError("visionzip needs the vision tower's CLS attention (side input cls_attention); "
                                    "this model's adapter did not supply it")
        d, c = split_budget(plan.count, self.share)
        return visionzip(x, cls_attention.to(x.device), d, c, merge=self.merge, order=self.order)


@register("visionzip", "VisionZip: dominant tokens by the vision tower's CLS attention + contextual tokens merged "
          "by similarity (paper split 54+10 of 64); needs a CLS token (LLaVA-1.5)", ("pre_llm",),
          options=dict(contextual_share=real(0.0, 1.0, hi_open=True), merge=choice(*MERGES), order=choice(*ORDERS)))
def make_visionzip(keep: float, contextual_share: float = CONTEXTUAL_SHARE, merge: str = "paper",
                   order: str = "paper") -> Method:
    return Method("visionzip", keep, dict(contextual_share=contextual_share, merge=merge, order=order),
                  pre_llm=VisionZipReducer(keep, float(contextual_share), merge, order))
