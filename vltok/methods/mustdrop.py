"""MustDrop: multi-stage dropping of visual tokens (specs: ../shared/specs/methods/mustdrop.md).

* stage 2, prefill ("dual-attention filtering"): after each pruning layer P (default [2, 6, 10, 14] scaled to the
  depth) the text tokens after the image score the visual tokens from layer P's attention (RoPE, softmax over every
  key they see, mean over heads): global share_j = sum over text rows, peak_j = max over text rows. A token is a drop
  candidate when both are low. The key set (top ``key_rate`` of the vision tower's CLS attention) is never dropped.
  ``mode="budget"`` (default) ranks by max(share_j / (g * sum share), peak_j / i) and keeps a count fixed by a
  geometric schedule solved for ``keep``; ``mode="reference"`` applies the raw thresholds (data-dependent counts,
  batch 1 or equal counts only).
* stage 3, decode: after prefill every layer from the first pruning layer on keeps only the final survivors in its
  KV cache (the code's "output-aware cache policy").
* stage 1 (3x3 window merge in the vision encoder) is not implemented here (see ``stages``).

Pure tensor functions; the engine (vltok.inllm) computes the attention rows and applies the cuts.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch

from ..errors import IncompatibleError
from ..inllm import Cut
from ..registry import register
from ..stages import Method
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


def mustdrop_keep_eq(n_layers, crit_layers, counts, n, keep_mode):
    """Keep in the chosen convention for stage counts ``counts`` (one per pruning layer) of an n-token image."""
    if keep_mode == "final":
        return counts[-1] / n
    bounds = list(crit_layers) + [n_layers - 1]
    if keep_mode == "flops":        # each layer counted with its input: layer P+1 is the first to see n_i
        total = (crit_layers[0] + 1) * n + sum((bounds[j + 1] - bounds[j]) * counts[j] for j in range(len(counts)))
    else:                           # "layer_avg": the pruning layer counts its post-drop number (reference)
        total = crit_layers[0] * n + sum((bounds[j + 1] - bounds[j]) * counts[j] for j in range(len(counts))) \
            + counts[-1]
    return total / (n_layers * n)


@lru_cache(maxsize=256)
def solve_mustdrop(keep, n_layers, n, crit_layers, key_rate, keep_mode):
    """(rho, effective key_rate): the largest rho whose schedule meets keep; scales key_rate down (with a warning)
    when the key-set floor makes keep unreachable."""
    n_key = math.ceil(key_rate * n) if key_rate > 0 else 0
    f = lambda rho, k: mustdrop_keep_eq(n_layers, crit_layers, stage_counts(n, rho, len(crit_layers), k), n,
                                        keep_mode)
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


class MustDropPruner:
    def __init__(self, keep, mode, keep_mode, key_rate, pruning_layers, thr):
        self.keep, self.mode, self.keep_mode = keep, mode, keep_mode
        self.key_rate, self.layers, self.thr = key_rate, pruning_layers, thr
        self.needs_saliency = key_rate > 0

    def validate(self, n_layers):
        pruning_layers_for(n_layers, self.layers)

    def plan(self, n_layers, images):
        if self.keep >= 1.0:
            return []
        crit = pruning_layers_for(n_layers, self.layers)
        rho, key_rate = 1.0, self.key_rate
        if self.mode == "budget":
            n = sum(n for n, _ in images)
            rho, key_rate = solve_mustdrop(self.keep, n_layers, n, crit, self.key_rate, self.keep_mode)
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


@register("mustdrop", "MustDrop: text-to-vision dual-attention dropping at several LLM layers (CLS-attention key set "
          "never dropped) + decode-time KV eviction to the final survivors", ("in_llm", "decode"))
def make_mustdrop(keep: float, mode: str = "budget", keep_mode: str = "flops", stages=("prefill", "decode"),
                  key_rate: float = 0.08, pruning_layers=None, thr=(0.001, 0.001)) -> Method:
    if mode not in MODES:
        raise ValueError(f"mustdrop: mode must be one of {MODES}, got {mode!r}")
    if keep_mode not in KEEP_MODES:
        raise ValueError(f"mustdrop: keep_mode must be one of {KEEP_MODES}, got {keep_mode!r}")
    stages = tuple(stages)
    if "vision" in stages:
        raise IncompatibleError("mustdrop: the vision stage (3x3 window merge in the encoder) is not implemented yet; "
                                "use stages=('prefill', 'decode') or a subset")
    if not stages or any(s not in ("prefill", "decode") for s in stages) or "prefill" not in stages:
        raise ValueError(f"mustdrop: stages must include 'prefill' and may add 'decode', got {stages!r}")
    if not 0.0 <= key_rate < 1.0:
        raise ValueError(f"mustdrop: key_rate must lie in [0, 1), got {key_rate!r}")
    if len(tuple(thr)) != 2 or min(thr) <= 0:
        raise ValueError(f"mustdrop: thr must be (global_thr, individual_thr) > 0, got {thr!r}")
    params = dict(mode=mode, keep_mode=keep_mode, stages=stages, key_rate=key_rate, pruning_layers=pruning_layers,
                  thr=tuple(thr))
    pl = tuple(pruning_layers) if pruning_layers is not None else None
    return Method("mustdrop", keep, params,
                  in_llm=MustDropPruner(keep, mode, keep_mode, float(key_rate), pl, tuple(float(t) for t in thr)),
                  decode=MustDropDecode() if "decode" in stages else None)
