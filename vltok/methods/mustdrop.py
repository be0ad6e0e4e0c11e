"""MustDrop: multi-stage dropping of visual tokens (specs: ../shared/specs/methods/mustdrop.md).

* stage 1, vision encoder (``"vision"`` in ``stages``, on by default where the family has a vision stage; on families
  without one, LLaVA-NeXT / Qwen2-VL, it is dropped with a warning and stages 2-3 run): after
  the full layer 0 of the ViT, the patch grid is tiled into non-overlapping ``window`` x ``window`` windows (stride
  ``window``; border rows / columns of a grid that is not a multiple of the window belong to no window). A window's
  score is the mean pairwise cosine similarity of its tokens (self-pairs excluded, fp32). Windows scoring
  >= ``window_thr`` merge into their bottom-right token (size-weighted mean; the merged token keeps that token's
  raster position, sizes are carried for proportional attention in the later ViT layers, vltok/vision.py). Windows
  that hold a guarded token are never merged: the top ``key_rate`` of the patches by the merge layer's CLS attention
  (computed from hooked q/k rows, ``vision_guard=False`` turns this off; the reference has no guard).
  Count rule: r_w = the minimum over the call's images of the number of passing windows (the reference's
  batch-uniform rule), every image merges its own top-r_w windows, so every image leaves the encoder with the same
  N_v = N - (window**2 - 1) * r_w tokens. The adapter learns r_w before the model runs by probing the encoder up to
  layer 0 (one extra layer-0 pass, ~1/L of the ViT) so that the placeholder runs can shrink first.
  ``vision_windows=k`` fixes r_w = k instead (LightCompress's fixed budget; no probe, batch-independent).
  The LLM then sees N_v tokens in raster order of their (destination) positions; stage 2's key set is the
  reference's: the CLS attention of the last ViT layer, over the N_v merged tokens.
* stage 2, prefill ("dual-attention filtering"): after each pruning layer P (default [2, 6, 10, 14] scaled to the
  depth) the text tokens after the image score the visual tokens from layer P's attention (RoPE, softmax over every
  key they see, mean over heads): global share_j = sum over text rows, peak_j = max over text rows. A token is a drop
  candidate when both are low. The key set (top ``key_rate`` of the vision tower's CLS attention) is never dropped.
  ``mode="budget"`` (default) ranks by max(share_j / (g * sum share), peak_j / i) and keeps a count fixed by a
  geometric schedule solved for ``keep``; ``mode="reference"`` applies the raw thresholds (data-dependent counts,
  batch 1 or equal counts only).
* stage 3, decode: after prefill every layer from the first pruning layer on keeps only the final survivors in its
  KV cache (the code's "output-aware cache policy").
* budget: ``keep`` stays relative to the native count N; the stage-2 schedule is solved with the first layers
  seeing N_v (so merges in stage 1 leave more tokens for the later stages).

Pure tensor functions; the engine (vltok.inllm) computes the attention rows and applies the cuts; the vision-stage
plumbing (vltok/vision.py) runs the window merge inside the encoder.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import IncompatibleError
from ..stages import Cut
from ..registry import FixedBudget, boolean, choice, integer, number, optional, real, register, seq_of
from ..stages import Method, VisionMerger
from .crossget import importance
from .feather import top_by_score, top_by_score_rows

KEEP_MODES = ("flops", "layer_avg", "final")
MODES = ("budget", "reference")
REFERENCE_LAYERS = (2, 6, 10, 14)   # of 32


def pruning_layers_for(n_layers: int, layers=None) -> tuple[int, ...]:
    """The layers AFTER which MustDrop prunes (criterion layers); default [2, 6, 10, 14] scaled as round(l*L/32)."""
    if layers is None:
        layers = sorted({max(0, math.floor(l * n_layers / 32 + 0.5)) for l in REFERENCE_LAYERS})
    layers = tuple(sorted(set(int(l) for l in layers)))
    if not layers or layers[0] < 0 or layers[-1] >= n_layers - 1:
        raise IncompatibleError(f"mustdrop: pruning layers {layers} must lie in 0..{n_layers - 2} for this "
                                f"{n_layers}-layer LLM (pruning happens after the layer, before the next one)")
    return layers


def dual_scores(rows: torch.Tensor):
    """rows [R text queries, n visual] -> (share [n], peak [n])."""
    return rows.sum(0), rows.max(0).values


def reference_keep(share, peak, global_thr, individual_thr, protected):
    """The reference rule: drop j iff share_j < global_thr * sum(share) AND peak_j < individual_thr; the protected
    (key set) tokens are always kept. Returns kept local indices, ascending."""
    drop = (share < global_thr * share.sum()) & (peak < individual_thr)
    if protected is not None:
        drop &= ~protected
    return (~drop).nonzero().flatten()


def budget_keep(share, peak, n, thr, protected):
    """Keep exactly n (or the protected set if larger): protected first, then the best by
    s_j = max(share_j / (g * sum share), peak_j / i) with (g, i) = thr."""
    g, i = thr
    s = torch.maximum(share / (g * share.sum().clamp_min(1e-30)), peak / i)
    prot = protected if protected is not None else torch.zeros_like(s, dtype=torch.bool)
    fill = top_by_score(s, n - int(prot.sum()), (~prot).nonzero().flatten())
    return torch.cat([prot.nonzero().flatten(), fill]).sort().values


def stage_counts(n: int, rho: float, n_stages: int, n_key: int) -> list[int]:
    """Geometric schedule n_i = N * rho**i (i = 1..), floored at the key-set size and at 1, never growing."""
    out, prev = [], n
    for i in range(1, n_stages + 1):
        c = min(prev, max(n_key, 1, round(n * rho ** i)))
        out.append(c)
        prev = c
    return out


def mustdrop_keep_eq(n_layers, crit_layers, counts, n, keep_mode, native=None):
    """Keep in the chosen convention for stage counts ``counts`` (one per pruning layer) of an image that enters
    the LLM with n tokens; ``native`` (default n) is its count before stage 1, the denominator of keep."""
    native = n if native is None else native
    if keep_mode == "final":
        return counts[-1] / native
    bounds = list(crit_layers) + [n_layers - 1]
    if keep_mode == "flops":        # each layer counted with its input: layer P+1 is the first to see n_i
        total = (crit_layers[0] + 1) * n + sum((bounds[j + 1] - bounds[j]) * counts[j] for j in range(len(counts)))
    else:                           # "layer_avg": the pruning layer counts its post-drop number (reference)
        total = crit_layers[0] * n + sum((bounds[j + 1] - bounds[j]) * counts[j] for j in range(len(counts))) \
            + counts[-1]
    return total / (n_layers * native)


@lru_cache(maxsize=256)
def solve_mustdrop(keep, n_layers, n, crit_layers, key_rate, keep_mode, native=None):
    """(rho, effective key_rate): the largest rho whose schedule meets keep; scales key_rate down (with a warning)
    when the key-set floor makes keep unreachable. ``n`` tokens enter the LLM, ``native`` (default n) before
    stage 1."""
    n_key = math.ceil(key_rate * n) if key_rate > 0 else 0
    f = lambda rho, k: mustdrop_keep_eq(n_layers, crit_layers, stage_counts(n, rho, len(crit_layers), k), n,
                                        keep_mode, native)
    if f(0.0, n_key) > keep:
        lo_key = 0
        for k in range(n_key, -1, -1):
            if f(0.0, k) <= keep:
                lo_key = k
                break
        else:
            raise IncompatibleError(
                f"mustdrop cannot reach keep={keep} ({keep_mode}) on a {n_layers}-layer LLM with pruning layers "
                f"{list(crit_layers)}: the layers up to the first one see every token (floor "
                f"{f(0.0, 0):.3f}); raise keep or pass earlier pruning_layers")
        warnings.warn(f"mustdrop: keep={keep} is below the key-set floor ({n_key} key tokens never dropped); "
                      f"key_rate scaled from {key_rate} to {lo_key / n:.4f} ({lo_key} tokens) to fit the budget",
                      stacklevel=2)
        n_key = lo_key
        key_rate = lo_key / n
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid, n_key) <= keep else (lo, mid)
    return lo, key_rate


def key_set(saliency: torch.Tensor | None, n: int, key_rate: float) -> torch.Tensor | None:
    """Raster indices of the top ceil(key_rate * n) tokens by vision saliency (CLS attention), ties to lower index."""
    if saliency is None or key_rate <= 0:
        return None
    return top_by_score(saliency, math.ceil(key_rate * n - 1e-9))


# -- stage 1: window merge in the vision encoder (pure tensor functions) ------------------------------------------
def window_groups(h: int, w: int, win: int = 3, device=None) -> torch.Tensor:
    """[n_win, win*win] raster indices of the complete win x win windows (stride win) of an h x w grid. Windows in
    raster order, members in raster order, so the last member is the bottom-right token (the destination). Rows /
    columns past the last complete window belong to no window."""
    base = (torch.arange(win, device=device)[:, None] * w + torch.arange(win, device=device)[None, :]).flatten()
    origins = (torch.arange(h // win, device=device)[:, None] * (win * w)
               + torch.arange(w // win, device=device)[None, :] * win).flatten()
    return origins[:, None] + base[None, :]


def window_scores(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """x [B, N, C] patch tokens (raster order), groups [n_win, k] -> [B, n_win] mean pairwise cosine similarity of
    each window's k tokens, the k*(k-1) ordered pairs without self-pairs (fp32, or fp64 for fp64 input)."""
    t = F.normalize(x if x.dtype == torch.float64 else x.float(), dim=-1)[:, groups]   # [B, n_win, k, C]
    gram = t @ t.transpose(-1, -2)
    k = groups.shape[1]
    return (gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)) / (k * (k - 1))


def pick_windows(scores: torch.Tensor, blocked: torch.Tensor | None, thr: float | None = None,
                 r_w: int | None = None) -> torch.Tensor:
    """Windows to merge, [B, r_w] ascending. ``blocked`` [B, n_win]: windows holding a guarded token, never taken.

    Threshold rule (``r_w=None``): r_w = the minimum over the batch of the number of unblocked windows scoring
    >= thr. Every sample then takes its own top-r_w unblocked windows by score (ties to the lower window index)."""
    ok = torch.ones_like(scores, dtype=torch.bool) if blocked is None else ~blocked
    if r_w is None:
        r_w = int(((scores >= thr) & ok).sum(1).min()) if scores.numel() else 0
    if r_w > int(ok.sum(1).min()):
        raise IncompatibleError(f"mustdrop: cannot merge {r_w} windows: an image has only {int(ok.sum(1).min())} "
                                "windows without a guarded (key) token; lower vision_windows or key_rate")
    s = scores.masked_fill(~ok, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    return order[:, :r_w].sort(dim=1).values


def window_merge(x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, groups: torch.Tensor, sel: torch.Tensor,
                 offset: int = 0):
    """Merge each selected window into its last (bottom-right) member: size-weighted mean, summed size, smallest
    ``pos`` of the group; the other members are removed, every remaining token keeps its relative order and
    untouched tokens stay bit-exact. x [B, N, C], size [B, N, 1], pos [B, N], groups [n_win, k] (patch indices,
    shifted by ``offset`` leading protected tokens), sel [B, r_w] -> (x, size, pos) with N - (k-1)*r_w tokens.
    Inputs are not modified."""
    B, N, C = x.shape
    r_w, k = sel.shape[1], groups.shape[1]
    if r_w == 0:
        return x, size, pos
    g = groups.to(x.device)[sel] + offset                                       # [B, r_w, k]
    flat = g.flatten(1)
    u = x.float() * size if x.dtype in (torch.float16, torch.bfloat16) else x * size
    u_sum = u.gather(1, flat[..., None].expand(-1, -1, C)).view(B, r_w, k, C).sum(2)
    s_sum = size.gather(1, flat[..., None]).view(B, r_w, k).sum(2)
    p_min = pos.gather(1, flat).view(B, r_w, k).min(2).values
    dst = g[..., -1]
    out = x.scatter(1, dst[..., None].expand(-1, -1, C), (u_sum / s_sum[..., None]).to(x.dtype))
    size_o = size.scatter(1, dst[..., None], s_sum[..., None])
    pos_o = pos.scatter(1, dst, p_min)
    keep = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter(1, g[..., :-1].flatten(1), False)
    n = N - (k - 1) * r_w
    return out[keep].view(B, n, C), size_o[keep].view(B, n, 1), pos_o[keep].view(B, n)


def guard_mask(keys: torch.Tensor, query: torch.Tensor | None, size: torch.Tensor | None, n_protected: int,
               rate: float) -> torch.Tensor | None:
    """[B, N_patches] True for the top ceil(rate * N_patches) patches by the CLS query's head-mean attention (from
    the layer's hooked q/k, proportional bias included; ties to the lower index); None without a CLS query."""
    if query is None or rate <= 0:
        return None
    B, N = keys.shape[:2]
    size = torch.ones(B, N, 1, device=keys.device) if size is None else size
    imp = importance("cls_attn", keys, query, size)[:, n_protected:]
    n_key = math.ceil(rate * imp.shape[1] - 1e-9)
    top = torch.sort(imp, dim=1, descending=True, stable=True).indices[:, :n_key]
    return torch.zeros_like(imp, dtype=torch.bool).scatter(1, top, True)


class MustDropMerger(VisionMerger):
    """Stage 1 as a vision-stage object (vltok/vision.py protocol): merges after the full ``merge_layer`` (0)."""

    after_mlp = True
    merge_layer = 0
    optional = True   # families without a vision stage run stages 2-3 only (vltok.support notes it)

    def __init__(self, window: int, thr: float, windows: int | None, guard_rate: float, prop_attn: bool):
        self.window, self.thr, self.windows, self.guard_rate, self.prop_attn = window, thr, windows, guard_rate, \
            prop_attn
        self.needs_query = guard_rate > 0
        if windows is None:
            self.decide = self._decide   # data-dependent count: the plumbing probes it per call

    def _side(self, n_patches: int) -> int:
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise IncompatibleError(f"mustdrop's window merge needs a square patch grid; got {n_patches} patches")
        return side

    def schedule(self, n_patches: int, n_layers: int):
        """[tokens removed after layer 0], or None when the count depends on the image (threshold mode)."""
        if self.windows is None:
            return None
        side = self._side(n_patches)
        n_win = (side // self.window) ** 2
        n_guard = math.ceil(self.guard_rate * n_patches - 1e-9) if self.guard_rate > 0 else 0
        if self.windows > n_win - n_guard:
            raise IncompatibleError(f"mustdrop: vision_windows={self.windows} exceeds the {n_win} windows of a "
                                    f"{side}x{side} grid minus the {n_guard} that may hold a guarded token")
        return [(self.window ** 2 - 1) * self.windows]

    def _windows(self, x, size, keys, query, n_protected):
        side = self._side(x.shape[1] - n_protected)
        groups = window_groups(side, side, self.window, x.device)
        scores = window_scores(x[:, n_protected:], groups)
        guard = guard_mask(keys, query, size, n_protected, self.guard_rate)
        blocked = guard[:, groups].any(-1) if guard is not None else None
        return groups, scores, blocked

    def _decide(self, x, size, keys, query, n_protected):
        _, scores, blocked = self._windows(x, size, keys, query, n_protected)
        return (self.window ** 2 - 1) * pick_windows(scores, blocked, thr=self.thr).shape[1]

    def merge(self, x, size, pos, keys, query, r, n_protected, extra=None):
        """``extra`` [B, N, E] (optional): channels merged alongside x, not scored (vltok.vision's group tracer);
        then (x, size, pos, extra) is returned."""
        groups, scores, blocked = self._windows(x, size, keys, query, n_protected)
        sel = pick_windows(scores, blocked, r_w=r // (self.window ** 2 - 1))
        if extra is None:
            return window_merge(x, size, pos, groups, sel, n_protected)
        C = x.shape[-1]
        y, size, pos = window_merge(torch.cat([x.float(), extra.float()], -1), size, pos, groups, sel, n_protected)
        return y[..., :C].to(x.dtype), size, pos, y[..., C:]


class MustDropPruner:
    def __init__(self, keep, mode, keep_mode, key_rate, pruning_layers, thr):
        self.keep, self.mode, self.keep_mode = keep, mode, keep_mode
        self.key_rate, self.layers, self.thr = key_rate, pruning_layers, thr
        self.needs_saliency = key_rate > 0

    def validate(self, n_layers):
        pruning_layers_for(n_layers, self.layers)

    def plan(self, n_layers, images, native=None):
        """``native``: per image, its token count before stage 1 (the engine passes it when a vision stage ran)."""
        if self.keep is not None and self.keep >= 1.0:
            return []
        crit = pruning_layers_for(n_layers, self.layers)
        rho, key_rate = 1.0, self.key_rate
        if self.mode == "budget":
            n = sum(n for n, _ in images)
            rho, key_rate = solve_mustdrop(self.keep, n_layers, n, crit, self.key_rate, self.keep_mode,
                                           sum(native) if native is not None else None)
        return [Cut(p + 1, rope=True, query="text", softmax="all", stage=i, params=(rho, key_rate, len(crit)))
                for i, p in enumerate(crit)]

    def select(self, cut, view, scores):
        rho, key_rate, n_stages = cut.params
        share, peak = dual_scores(scores)
        keys = key_set(view.saliency, view.n, key_rate)
        prot = torch.isin(view.raster, keys.to(view.raster.device)) if keys is not None else None
        if self.mode == "reference":
            return reference_keep(share, peak, self.thr[0], self.thr[1], prot)
        n_key = int(prot.sum()) if prot is not None else 0
        n = stage_counts(view.n, rho, n_stages, math.ceil(key_rate * view.n - 1e-9) if keys is not None else 0)
        return budget_keep(share, peak, max(n[cut.stage], n_key), self.thr, prot)

    def select_batch(self, cut, view, scores):
        """select() for G samples at once (vltok.inllm.BatchView), budget mode: scores [G, R, n_cur] (padded query
        rows are zero) -> [G, k] ascending, no host sync. The reference rule's counts depend on the data: None (the
        engine then goes sample by sample)."""
        if self.mode != "budget":
            return None
        rho, key_rate, n_stages = cut.params
        share, peak = scores.sum(1), scores.amax(1)
        # the key set is never dropped, so all of its ceil(key_rate * n) tokens are among the survivors
        n_key = math.ceil(key_rate * view.n - 1e-9) if view.saliency is not None and key_rate > 0 else 0
        n = max(stage_counts(view.n, rho, n_stages, n_key)[cut.stage], n_key)
        g, i = self.thr
        s = torch.maximum(share / (g * share.sum(1, keepdim=True).clamp_min(1e-30)), peak / i)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        if n_key:   # protected first (stable: the rest stays in score order, ties to the lower index)
            keys = top_by_score_rows(view.saliency, n_key)
            prot = torch.zeros_like(view.saliency, dtype=torch.bool).scatter_(1, keys, True).gather(1, view.raster)
            first = torch.sort(prot.gather(1, order).to(torch.uint8), dim=1, descending=True, stable=True).indices
            order = order.gather(1, first)
        return order[:, :n].sort(dim=1).values


class MustDropDecode:
    """Stage 3: after prefill, layers from the first pruning layer on keep only the final survivors' K/V."""

    def evict_from(self, cuts):
        return cuts[0] - 1


def mustdrop_budget(options: dict) -> FixedBudget | None:
    """``mode="reference"``: the raw thresholds decide how many tokens each image keeps (a data-dependent count)."""
    if options.get("mode") != "reference":
        return None
    thr = options.get("thr", (0.001, 0.001))
    return FixedBudget("mode='reference'", f"a count per image by the raw thresholds thr={tuple(thr)!r}, data-dependent: "
                       "the handle reports it after each call", "use mode='budget' (the default) to let keep set the "
                       "count")


@register("mustdrop", "MustDrop: 3x3 window merge of near-duplicate patches after ViT layer 0 (where the family has "
          "a vision stage) + text-to-vision dual-attention dropping at several LLM layers (CLS-attention key set "
          "never dropped) + decode-time KV eviction to the final survivors", ("vision", "in_llm", "decode"),
          options=dict(mode=choice(*MODES), keep_mode=choice(*KEEP_MODES),
                       stages=seq_of(choice("vision", "prefill", "decode"), extra=lambda v: "prefill" in v,
                                     accepts="a list / tuple of stages from 'vision', 'prefill', 'decode' that "
                                             "includes 'prefill'"),
                       key_rate=real(0, 1, hi_open=True), pruning_layers=optional(seq_of(integer(0))),
                       thr=seq_of(real(0, math.inf, lo_open=True), n=2), window=integer(2),
                       window_thr=number(), vision_windows=optional(integer(0)), vision_guard=boolean(),
                       prop_attn=boolean()), budget=mustdrop_budget)
def make_mustdrop(keep: float | None, mode: str = "budget", keep_mode: str = "flops",
                  stages=("vision", "prefill", "decode"), key_rate: float = 0.08, pruning_layers=None,
                  thr=(0.001, 0.001), window: int = 3, window_thr: float = 0.8, vision_windows: int | None = None,
                  vision_guard: bool = True, prop_attn: bool = True) -> Method:
    stages = tuple(stages)
    params = dict(mode=mode, keep_mode=keep_mode, stages=stages, key_rate=key_rate, pruning_layers=pruning_layers,
                  thr=tuple(thr), window=window, window_thr=window_thr, vision_windows=vision_windows,
                  vision_guard=vision_guard, prop_attn=prop_attn)
    pl = tuple(pruning_layers) if pruning_layers is not None else None
    vision = None
    if "vision" in stages and (keep is None or keep < 1.0):
        vision = MustDropMerger(window, float(window_thr), vision_windows,
                                float(key_rate) if vision_guard else 0.0, prop_attn)
    return Method("mustdrop", keep, params, vision=vision,
                  in_llm=MustDropPruner(keep, mode, keep_mode, float(key_rate), pl, tuple(float(t) for t in thr)),
                  decode=MustDropDecode() if "decode" in stages else None)
