"""LLaVA-Mini, training-free: level 0 ``mode="pool"`` (pre-LLM stage) and level 1 ``mode="early_fusion"`` (in-LLM).

LLaVA-Mini compresses the grid with learned queries and fuses vision into the text with pre-fusion layers; this
module provides the compression-only analogue that works on stock weights: adaptive average pooling of the
h x w grid to an h' x w' grid whose product is the closest to keep*h*w among grids within 1.5x of the input's
aspect ratio (``budget="nearest"``, ties to the squarer grid), or the largest product not above it
(``budget="at_most"``). On 24x24: keep 0.25 -> 12x12, 0.16 -> 9x10 (90 tokens), 0.111 -> 8x8, 0.0278 -> 4x4.

The pooling runs where the adapter reduces grids (LLaVA-1.5: before the projector).

``mode="early_fusion"`` uses the LLM's own first K decoder layers as LLaVA-Mini's pre-fusion (spec §4.2): layers
0..K-1 see every visual token, so the text absorbs the image there; before layer K the visual rows of each image
shrink to k (in-LLM engine, vltok/inllm.py: survivors keep their original positions, layers >= K hold shorter KV
caches, decode runs on them). ``reduce``:

* ``"pool"`` (default): 2-D adaptive average pooling of the image's hidden states at layer K (fp32 window means)
  to the h' x w' grid ``pooled_grid`` picks for k/N; each pooled token takes the column (position id, rotary row,
  mask row/column) of its window's centre token (row (r0+r1-1)//2, column (c0+c1-1)//2 of the window's bounds
  [r0, r1) x [c0, c1)); tokens without a grid pool as one row;
* ``"attn"``: the top-k tokens by the attention they receive at layer K-1 from the text rows after the image
  (RoPE, softmax over every key: the model's attention probabilities, mean over heads, summed over the text
  rows; from hooked q/k, never output_attentions);
* ``"drop"``: k = 0, every visual row leaves at layer K (the "fused text only" regime).

keep -> k is FLOPs-equivalent like FastV (spec §6): k = round((keep*L - K) * N / (L - K)) per grid of N tokens,
at least 1, so keep must exceed K/L (a clear error otherwise). K defaults to 2 for keep >= 0.25, 3 below. For
``"drop"`` keep picks K instead: K = floor(keep*L) (keep = K/L when nothing survives); an explicit K fixes the
budget itself (K/L), so keep is then left out (:func:`llavamini_budget`). keep=1.0 cuts nothing (bit-identical logits).
``mode="trained"`` (``weights=`` a checkpoint from ``vltok train llavamini`` or a MiniModule): the learned C x C
compressor + pre-fusion layers of vltok/methods/llavamini_trained.py (LLaVA-1.5 family only).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..errors import IncompatibleError
from ..stages import Cut, Merge
from ..registry import FixedBudget, choice, file_or, integer, optional, register
from ..stages import GridPlan, GridReducer, Method
from .baselines import pool_grid
from ._checkpoint import checkpoint_meta
from .feather import top_by_score, top_by_score_rows

BUDGETS = ("nearest", "at_most")
MODES = ("pool", "early_fusion")
REDUCES = ("pool", "attn", "drop")


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


def window_centres(h: int, w: int, r_h: int, r_w: int) -> torch.Tensor:
    """Raster index (in the h x w grid) of the centre token of each r_h x r_w adaptive-pooling window, pooled raster
    order: window i spans rows [floor(i*h/r_h), ceil((i+1)*h/r_h)) (PyTorch's bins), its centre row is
    (start + end - 1) // 2; the same for columns. Strictly ascending when r_h <= h and r_w <= w."""
    def centres(n, r):
        return [(i * n // r + -(-(i + 1) * n // r) - 1) // 2 for i in range(r)]

    return torch.tensor([y * w + x for y in centres(h, r_h) for x in centres(w, r_w)], dtype=torch.long)


@lru_cache(maxsize=64)
def _centres_on(h, w, r_h, r_w, device):
    """window_centres on the device, built once per grid (no host-to-device copy per call)."""
    return window_centres(h, w, r_h, r_w).to(device)


class EarlyFusion:
    """The in-LLM stage of ``mode="early_fusion"`` (module docstring)."""

    def __init__(self, keep: float, K: int | None, reduce: str, budget: str):
        self.keep, self.K_arg, self.reduce, self.budget = keep, K, reduce, budget

    def depth(self, n_layers: int) -> int:
        if self.K_arg is not None:
            return self.K_arg
        if self.reduce == "drop":   # (keep is None only with K given: llavamini_budget)
            return math.floor(self.keep * n_layers + 1e-9)
        return 2 if self.keep >= 0.25 else 3

    def count(self, n: int, n_layers: int) -> int:
        if self.reduce == "drop":
            return 0
        K = self.depth(n_layers)
        return max(1, min(n, round((self.keep * n_layers - K) * n / (n_layers - K))))

    def pooled(self, n: int, grid, n_layers: int):
        """(h, w, h', w') of the pooling at the cut: the grid (one row when None) and pooled_grid's for k/N."""
        k = self.count(n, n_layers)
        if grid is None:
            return 1, n, 1, k
        h, w = grid
        return (h, w, h, w) if k >= n else (h, w, *pooled_grid(h, w, k / n, self.budget))

    def validate(self, n_layers: int) -> None:
        if self.keep is not None and self.keep >= 1.0:
            return
        K = self.depth(n_layers)
        if not 1 <= K < n_layers:
            if self.reduce == "drop" and self.K_arg is None:
                raise IncompatibleError(
                    f"llavamini early_fusion reduce='drop': keep={self.keep} gives K=floor(keep*L)={K} fused layers "
                    f"on this {n_layers}-layer LLM; it needs 1..{n_layers - 1}: raise keep to at least "
                    f"{1 / n_layers:.3f} or pass K")
            raise IncompatibleError(f"llavamini early_fusion: K={K} must lie in 1..{n_layers - 1} for this "
                                    f"{n_layers}-layer LLM")
        if self.reduce == "drop":
            if self.keep is not None and self.keep * n_layers < K - 1e-9:
                raise IncompatibleError(
                    f"llavamini early_fusion reduce='drop' with K={K} on {n_layers} layers costs keep={K / n_layers:.3f}"
                    f" (FLOPs-equivalent), above the requested keep={self.keep}: lower K or raise keep")
        elif self.keep * n_layers <= K:
            raise IncompatibleError(
                f"llavamini early_fusion cannot reach keep={self.keep} (FLOPs-equivalent) with K={K} on {n_layers} "
                f"layers: the first {K} layers see every visual token, so the floor is {K / n_layers:.3f}; raise keep, "
                "lower K, or use mode='pool'")

    def plan(self, n_layers, images, native=None):
        self.validate(n_layers)
        if (self.keep is not None and self.keep >= 1.0) or all(self.count(n, n_layers) >= n for n, _ in images):
            return []
        return [Cut(self.depth(n_layers), rope=True, query="text", softmax="all", stage=0, params=(n_layers,),
                    scores=self.reduce == "attn", hidden=self.reduce == "pool")]

    def select(self, cut, view, scores):
        L = cut.params[0]
        if self.reduce == "drop":
            return torch.zeros(0, dtype=torch.long, device=view.raster.device)
        if self.reduce == "attn":
            return top_by_score(scores.sum(0), self.count(view.n, L))
        return self._pool(view, L, batched=False)

    def select_batch(self, cut, view, scores):
        """select() for G samples with the same grid: -> [G, k] ascending, or a Merge (no host sync)."""
        L = cut.params[0]
        G = view.raster.shape[0]
        if self.reduce == "drop":
            return torch.zeros(G, 0, dtype=torch.long, device=view.raster.device)
        if self.reduce == "attn":
            return top_by_score_rows(scores.sum(1), self.count(view.n, L))
        return self._pool(view, L, batched=True)

    def _pool(self, view, n_layers, batched):
        if view.raster.shape[-1] != view.n:
            raise IncompatibleError("llavamini early_fusion reduce='pool' pools a full grid; an earlier cut removed "
                                    "some of its tokens")
        h, w, r_h, r_w = self.pooled(view.n, view.grid, n_layers)
        x = view.hidden if batched else view.hidden[None]
        rows = pool_grid(x.float(), h, w, r_h, r_w)          # window means in fp32 (cast to the model's dtype later)
        idx = _centres_on(h, w, r_h, r_w, view.raster.device)
        if batched:
            return Merge(idx.expand(x.shape[0], -1), rows)
        return Merge(idx, rows[0])


class MiniPoolReducer(GridReducer):
    def __init__(self, keep: float, budget: str):
        self.keep, self.budget = keep, budget

    def plan(self, h, w):
        r_h, r_w = pooled_grid(h, w, self.keep, self.budget) if self.keep < 1.0 else (h, w)
        return GridPlan(h, w, r_h * r_w, (r_h, r_w))

    def reduce(self, x, plan):
        return pool_grid(x, plan.h, plan.w, *plan.grid)


def _mini_module():
    from .llavamini_trained import MiniModule

    return (MiniModule,)


def _weights_c_grid(weights):
    """(C, grid or None) of trained LLaVA-Mini weights (a MiniModule or a checkpoint path); None when unreadable (the
    factory then says why)."""
    try:
        if isinstance(weights, _mini_module()):
            return weights.c, weights.grid
        meta = checkpoint_meta(weights)
        if meta.get("method") != "llavamini":
            return None
        return int(meta["c"]), tuple(meta["grid"]) if meta.get("grid") else None
    except Exception:
        return None


def llavamini_budget(options: dict) -> FixedBudget | None:
    """Options that fix the budget: trained ``weights=`` (their C x C compressor; keep=1.0 stays the unpatched model,
    as in every mode) and ``mode="early_fusion", reduce="drop", K=k`` (k fused layers, then no visual row: a
    FLOPs-equivalent keep of k/L)."""
    mode = options.get("mode", "pool")
    if mode == "trained" and options.get("weights") is not None:
        cg = _weights_c_grid(options["weights"])
        if cg is None:
            return None
        from .llavamini_trained import compressor_size

        c, grid = cg
        n = grid[0] * grid[1] if grid else None
        where = f" of its {grid[0]}x{grid[1]} training grid" if grid else ""
        return FixedBudget("weights=...", f"a {c}x{c} compressor: {c * c} tokens per image{where}",
                           "pass weights trained for that keep (vltok train llavamini --keep K)",
                           keep=c * c / n if n else None,
                           accepts=lambda k: k >= 1.0 or (n is not None and compressor_size(k, n) == c))
    if mode == "early_fusion" and options.get("reduce") == "drop" and options.get("K") is not None:
        K = options["K"]
        return FixedBudget(f"reduce='drop', K={K!r}", f"{K} fused layers, then no visual row: a FLOPs-equivalent keep "
                           f"of {K}/L on an L-layer LLM", "drop K=... to let keep choose it (K = floor(keep*L))")
    return None


@register("llavamini", "LLaVA-Mini training-free: mode='pool' pools each grid to ~keep*N tokens before the LLM "
          "(aspect-preserving grid); mode='early_fusion' lets the first K LLM layers see every token, then pools "
          "(reduce='pool') / top-k by text attention ('attn') / drops ('drop') the visual rows; the learned "
          "compressor + pre-fusion: mode='trained', weights=...", ("pre_llm",),
          variants=(("mode=early_fusion", dict(mode="early_fusion")),),
          options=dict(mode=choice(*MODES, "trained"), budget=choice(*BUDGETS), K=optional(integer(1)),
                       reduce=choice(*REDUCES), weights=optional(file_or(_mini_module, "a MiniModule"))),
          budget=llavamini_budget)
def make_llavamini(keep: float | None, mode: str = "pool", budget: str = "nearest", K: int | None = None,
                   reduce: str = "pool", weights=None) -> Method:
    if mode == "trained":   # learned compressor + pre-fusion: vltok/methods/llavamini_trained.py
        from .llavamini_trained import trained_reducer

        if weights is None:
            raise ValueError("llavamini: mode='trained' needs weights= (a checkpoint from `vltok train llavamini` or "
                             "a MiniModule)")
        if keep is not None and keep >= 1.0:   # keep=1.0 reproduces the unpatched model in every mode
            return Method("llavamini", keep, dict(mode=mode, trained=True), pre_llm=MiniPoolReducer(keep, budget))
        r = trained_reducer(keep, weights)
        return Method("llavamini", keep, dict(mode=mode, trained=True, C=r.module.c), pre_llm=r)
    if weights is not None:
        raise ValueError("llavamini: weights apply to mode='trained' only")
    if mode not in MODES:
        raise ValueError(f"llavamini: mode must be one of {MODES} or 'trained', got {mode!r}")
    if budget not in BUDGETS:
        raise ValueError(f"llavamini: budget must be one of {BUDGETS}, got {budget!r}")
    if mode == "early_fusion":
        if reduce not in REDUCES:
            raise ValueError(f"llavamini: reduce must be one of {REDUCES}, got {reduce!r}")
        if K is not None and (isinstance(K, bool) or not isinstance(K, int) or K < 1):
            raise ValueError(f"llavamini: K must be a positive integer (the first layer on the reduced sequence), "
                             f"got {K!r}")
        return Method("llavamini", keep, dict(mode=mode, budget=budget, K=K, reduce=reduce),
                      in_llm=EarlyFusion(keep, K, reduce, budget))
    if K is not None or reduce != "pool":
        raise ValueError("llavamini: K and reduce apply to mode='early_fusion' only")
    return Method("llavamini", keep, dict(mode=mode, budget=budget), pre_llm=MiniPoolReducer(keep, budget))
