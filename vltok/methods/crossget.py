"""CrossGET: complete-graph soft matching (CGSM) with importance-weighted ensembling (vision stage).

Per merging layer, between the attention residual and the MLP (shapes: B batch, N tokens, d metric width):

1. S = m m^T with m the L2-normalised head-mean keys; the diagonal and protected rows/columns are -inf.
2. Rank-compare CGSM: rank_i = position of i when tokens are sorted by their row max of S (descending, stable on
   the index); edge i -> j is allowed only when rank_j > rank_i. masked_i = max over allowed j of S_ij.
3. score_i = imp_i - masked_i; the r smallest scores are sources (stable on the index); protected tokens and tokens
   with no allowed edge are never sources.
4. Each source's destination = argmax_j S_ij over non-source, non-protected j (first index on ties).
5. Ensemble in size space: w = 2 softmax([imp_src, imp_dst]); u = x*size; u_dst += w0 u_src + (w1 - 1) u_dst;
   size_dst += size_src; the sources are dropped; x = u / size. Destinations keep their original order.

No N x N index scatter: the rank mask is one comparison ``rank[None, :] > rank[:, None]`` (vltok.kernels.cgsm).

Importance (training-free guidance, no extra token): ``"cls_attn"`` (default) = the head-mean attention the CLS
query pays each key in this layer (one query row, computed from the hooked q/k, with the proportional bias);
``"cls_query_cos"`` = cos(k_j, q_CLS) on the full width; ``"none"`` = 0. Encoders without CLS use ``"none"``.
The budget and the multi-round rule are ToMe's (vltok/methods/tome.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register
from ..stages import Method
from .tome import round_sizes, spread_schedule

IMPORTANCES = ("cls_attn", "cls_query_cos", "none")
ENSEMBLES = ("importance", "size")


def cgsm_match(metric: torch.Tensor, imp: torch.Tensor, r: int, n_protected: int, impl: str = "auto"):
    """metric [B, N, d] (normalised), imp [B, N] -> (src [B, r], dst [B, r], is_src [B, N]).

    Steps 1-4 above, from vltok.kernels.cgsm (torch reference, or the Triton kernel on CUDA that never stores S;
    mutual nearest neighbours get one row max so fp rounding of S_ij vs S_ji cannot split their tie).
    Every sample gets exactly r sources; r must be at most (N - n_protected) // 2.
    """
    from vltok.kernels.cgsm import cgsm_match as match

    B, N, _ = metric.shape
    if r > (N - n_protected) // 2:
        raise ValueError(f"cgsm_match: r={r} exceeds half of the {N - n_protected} unprotected tokens")
    protected = (torch.arange(N, device=metric.device) < n_protected).expand(B, N)
    src, dst, _ = match(metric, imp, r, protected, impl)
    is_src = torch.zeros(B, N, dtype=torch.bool, device=metric.device).scatter_(1, src, True)
    return src, dst, is_src


def cgsm_merge(x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, imp: torch.Tensor, src, dst, is_src,
               ensemble: str = "importance"):
    """Merge sources into destinations (step 5 above). Returns (x [B, N-r, C], size, pos). Inputs not modified."""
    B, N, C = x.shape
    r = src.shape[1]
    wdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if ensemble == "importance":
        w = 2 * torch.softmax(torch.stack([imp.gather(1, src), imp.gather(1, dst)], -1).to(wdt), -1)
    else:
        w = torch.ones(B, r, 2, device=x.device)
    u = x.float() * size if x.dtype in (torch.float16, torch.bfloat16) else x * size
    u_src = u.gather(1, src[..., None].expand(-1, -1, C))
    u_dst = u.gather(1, dst[..., None].expand(-1, -1, C))
    delta = w[..., :1].to(u.dtype) * u_src + (w[..., 1:].to(u.dtype) - 1) * u_dst
    u = u.scatter_add(1, dst[..., None].expand(-1, -1, C), delta)
    size = size.scatter_add(1, dst[..., None], size.gather(1, src[..., None]))
    pos = pos.scatter_reduce(1, dst, pos.gather(1, src), reduce="amin")
    is_dst = torch.zeros_like(is_src).scatter_(1, dst, True)
    out = torch.where(is_dst[..., None], (u / size).to(x.dtype), x)     # untouched tokens stay bit-exact
    keep = ~is_src
    return out[keep].view(B, N - r, C), size[keep].view(B, N - r, 1), pos[keep].view(B, N - r)


def importance(kind: str, keys: torch.Tensor, query: torch.Tensor | None, size: torch.Tensor) -> torch.Tensor:
    """keys [B, N, H, d], query [B, H, d] (the CLS query) -> imp [B, N] (fp32)."""
    B, N = keys.shape[:2]
    if kind == "none" or query is None:
        return torch.zeros(B, N, device=keys.device)
    if kind == "cls_query_cos":
        return F.cosine_similarity(keys.flatten(2).float(), query.flatten(1).float()[:, None], dim=-1)
    d = keys.shape[-1]
    logits = torch.einsum("bhd,bnhd->bhn", query.float(), keys.float()) * d ** -0.5
    logits = logits + size.float().log().transpose(1, 2)                     # proportional attention
    return logits.softmax(-1).mean(1)


class CrossGetMerger:
    def __init__(self, keep: float, importance: str, ensemble: str, prop_attn: bool):
        self.keep, self.importance, self.ensemble, self.prop_attn = keep, importance, ensemble, prop_attn
        self.needs_query = importance != "none"

    def schedule(self, n_patches: int, n_layers: int) -> list[int]:
        return spread_schedule(n_patches, self.keep, n_layers)

    def merge(self, x, size, pos, keys, query, r, n_protected):
        kind = self.importance if n_protected > 0 else "none"
        C = x.shape[-1]
        kmean = keys.float().mean(2)
        imp = importance(kind, keys, query, size)
        rounds = round_sizes(x.shape[1], n_protected, r)
        if len(rounds) == 1:
            src, dst, is_src = cgsm_match(F.normalize(kmean, dim=-1), imp, r, n_protected)
            return cgsm_merge(x, size, pos, imp, src, dst, is_src, self.ensemble)
        # several rounds in one layer: keys and importances of merged tokens are carried along
        both = torch.cat([x.float(), kmean, imp[..., None]], -1)
        for step in rounds:
            imp_t = both[..., -1]
            src, dst, is_src = cgsm_match(F.normalize(both[..., C:-1], dim=-1), imp_t, step, n_protected)
            both, size, pos = cgsm_merge(both, size, pos, imp_t, src, dst, is_src, self.ensemble)
        return both[..., :C].to(x.dtype), size, pos


@register("crossget", "CrossGET: complete-graph soft matching inside the vision encoder, CLS-attention guidance, "
          "importance-weighted merges, proportional attention; round(keep*N) tokens leave the encoder", ("vision",))
def make_crossget(keep: float, importance: str = "cls_attn", ensemble: str = "importance",
                  prop_attn: bool = True) -> Method:
    if importance not in IMPORTANCES:
        raise ValueError(f"crossget: importance must be one of {IMPORTANCES}, got {importance!r}")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"crossget: ensemble must be one of {ENSEMBLES}, got {ensemble!r}")
    params = dict(importance=importance, ensemble=ensemble, prop_attn=prop_attn)
    return Method("crossget", keep, params, vision=CrossGetMerger(keep, importance, ensemble, prop_attn))
