"""FEATHER: in-LLM pruning of visual tokens scored by the attention of the last prompt token.

FEATHER (cuts before K1 and K2): the RoPE-free criterion (raw q_proj / k_proj outputs), softmax over the visual keys
only; stage 1 keeps a uniform stride grid plus the best-scored tokens, stage 2 the best share ``s2`` of the
survivors by score alone. FastV (vltok/methods/fastv.py) is the one-cut baseline with RoPE. Specs: ../shared/specs/methods/feather.md. Pure tensor functions; the engine
(vltok.inllm) computes the scores and applies the cuts.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..errors import IncompatibleError
from ..registry import FixedBudget, choice, int_pair, integer, optional, real, register
from ..stages import Method
from ..stages import Cut

KEEP_MODES = ("flops", "final")
A_MIN = 0.2   # below this stage-1 attention share the plan is mostly grid: move the layers earlier (spec §6.1)


def uniform_grid(grid: tuple[int, int] | None, n: int, stride: int, device=None) -> torch.Tensor:
    """Raster indices of the [::stride, ::stride] sub-grid of an (h, w) grid (1-D stride**2 without a grid)."""
    if grid is None:
        return torch.arange(0, n, stride * stride, device=device)
    h, w = grid
    rows, cols = torch.arange(0, h, stride, device=device), torch.arange(0, w, stride, device=device)
    return (rows[:, None] * w + cols[None, :]).flatten()


def top_by_score(scores: torch.Tensor, k: int, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The k best indices by score (ties to the lower index), ascending. ``candidates`` restricts the choice."""
    idx = torch.arange(scores.numel(), device=scores.device) if candidates is None else candidates
    order = torch.sort(scores[idx], descending=True, stable=True).indices
    return idx[order[:max(k, 0)]].sort().values


def top_by_score_rows(scores: torch.Tensor, k: int, force: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`top_by_score` for every row of scores [G, n] at once -> [G, k] ascending (ties to the lower index);
    ``force`` [n] bool: indices taken before any score. One Triton rank + compaction on CUDA
    (vltok.kernels.select.topk_rows), torch sorts elsewhere."""
    from vltok.kernels.select import topk_rows

    return topk_rows(scores, k, force)


def query_mean(scores: torch.Tensor) -> torch.Tensor:
    """scores [G, R, n] -> [G, n], the mean over the query rows (a view when there is one row: no launch)."""
    return scores[:, 0] if scores.shape[1] == 1 else scores.mean(1)


@lru_cache(maxsize=64)
def _grid_mask(grid, n: int, stride: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(uniform_grid indices, [n] bool mask of them) on ``device``, cached: built once per grid, not per cut.
    Callers must not modify them."""
    u = uniform_grid(grid, n, stride, device)
    return u, torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, u, True)


def feather_stage1(scores: torch.Tensor, raster: torch.Tensor, grid, n: int, n1: int, stride: int) -> torch.Tensor:
    """Exact-count stage 1: the uniform grid U, then the best non-grid tokens up to n1. Returns local indices."""
    on_grid = torch.isin(raster, uniform_grid(grid, n, stride).to(raster.device))
    u = on_grid.nonzero().flatten()
    if u.numel() >= n1:
        return u[:n1]
    rest = top_by_score(scores, n1 - u.numel(), (~on_grid).nonzero().flatten())
    return torch.cat([u, rest]).sort().values


def feather_stage1_union(scores: torch.Tensor, raster: torch.Tensor, grid, n: int, a: float,
                         stride: int) -> torch.Tensor:
    """The paper's stage 1 (FEATHER, prismatic-vlms llama2_models.py FastVLlamaModel, predefined mask
    ``no_rope_s=3``): the top-floor(a·N) tokens by score over ALL visual tokens, united with the uniform stride grid
    U. The size varies per image (N=576, a=0.3, stride 3: 172 + 64 - overlap). At least one token. Local indices,
    ascending."""
    on_grid = torch.isin(raster, uniform_grid(grid, n, stride).to(raster.device))
    top = top_by_score(scores, max(1, math.floor(a * raster.numel() + 1e-9)))
    on_grid[top] = True
    return on_grid.nonzero().flatten()


def stage1_count(n: int, n_grid: int, a: float) -> int:
    return max(1, min(n, round(a * n + n_grid - a * n_grid)))


def stage2_count(n1: int, s2: float) -> int:
    return max(1, min(n1, math.floor(s2 * n1 + 1e-9)))


def feather_keep_eq(n_layers, k1, k2, images, a, s2, stride) -> tuple[float, float]:
    """(FLOPs-equivalent keep, final keep) of a plan over images [(n, grid)] (README glossary)."""
    N = sum(n for n, _ in images)
    n1 = [stage1_count(n, min(n, uniform_grid(g, n, stride).numel()), a) for n, g in images]
    n2 = [stage2_count(m, s2) for m in n1]
    eq = (k1 * N + (k2 - k1) * sum(n1) + (n_layers - k2) * sum(n2)) / (n_layers * N)
    return eq, sum(n2) / N


def layer_pairs(n_layers: int) -> list[tuple[int, int]]:
    """(L/4, L/2) -> (3L/32, L/4) -> (2L/32, 3L/16), each at least (1, 2) and K2 < L."""
    out = []
    for f1, f2 in ((8, 16), (3, 8), (2, 6)):
        k1 = max(1, round(n_layers * f1 / 32))
        k2 = max(k1 + 1, round(n_layers * f2 / 32))
        if k2 < n_layers and (k1, k2) not in out:
            out.append((k1, k2))
    return out


@lru_cache(maxsize=256)
def solve_feather(keep, n_layers, images, layers, a, s2, stride, keep_mode):
    """Plan (K1, K2, a, s2) for ``keep`` (spec §6.1): per layer pair, bisection on a with s2 = a² (unless given)."""
    pairs = [tuple(layers)] if layers is not None else layer_pairs(n_layers)
    if not pairs:
        raise IncompatibleError(f"feather needs at least 3 decoder layers to place two cuts; this LLM has {n_layers}")
    if a is not None:
        return (*pairs[0], a, a * a if s2 is None else s2)
    which = 0 if keep_mode == "flops" else 1
    best = None
    for k1, k2 in pairs:
        f = lambda x: feather_keep_eq(n_layers, k1, k2, images, x, x * x if s2 is None else s2, stride)[which]
        if f(0.0) > keep:
            continue
        lo, hi = 0.0, 1.0
        if f(1.0) <= keep:
            lo = 1.0
        else:
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if f(mid) <= keep else (lo, mid)
        best = (k1, k2, lo, lo * lo if s2 is None else s2)
        if lo >= A_MIN:
            break
    if best is None:
        floor = min(feather_keep_eq(n_layers, k1, k2, images, 0.0, 0.0 if s2 is None else s2, stride)[which]
                    for k1, k2 in pairs)
        raise IncompatibleError(f"feather cannot reach keep={keep} ({keep_mode}) on a {n_layers}-layer LLM: the "
                                f"lowest reachable is {floor:.3f} (layers before the first cut see every token); "
                                "raise keep, pass earlier layers=(k1, k2), or use a pre-LLM method")
    return best


class FeatherPruner:
    graph_safe = True   # select_batch is sync-free index work: the engine may replay the cut from a CUDA graph
    def __init__(self, keep, layers, a, s2, stride, keep_mode, preset, stage1="count"):
        self.keep, self.layers, self.a, self.s2 = keep, layers, a, s2
        self.stride, self.keep_mode, self.preset, self.stage1 = stride, keep_mode, preset, stage1

    def validate(self, n_layers):
        """At patch time: the two prune layers must exist (a layer past the last one would never prune)."""
        if self.layers is not None and self.layers[1] >= n_layers:
            raise IncompatibleError(f"feather: layers={self.layers} must lie in 1..{n_layers - 1} for this "
                                    f"{n_layers}-layer LLM (it prunes before layer k1 and before layer k2)")

    def plan(self, n_layers, images):
        if self.keep is not None and self.keep >= 1.0 and self.preset is None:
            return []
        if self.preset == "paper":
            k1, k2 = self.layers or (max(1, n_layers // 4), max(2, n_layers // 2))
            a, s2 = PAPER["a"], PAPER["s2"]
        else:
            k1, k2, a, s2 = solve_feather(self.keep, n_layers, tuple(images), self.layers, self.a, self.s2,
                                          self.stride, self.keep_mode)
        if a >= 1.0 and s2 >= 1.0:
            return []
        return [Cut(k1, rope=False, query="last", softmax="visual", stage=0, params=(a, s2)),
                Cut(k2, rope=False, query="last", softmax="visual", stage=1, params=(a, s2))]

    def select(self, cut, view, scores):
        s = scores.mean(0)
        a, s2 = cut.params
        if cut.stage == 0 and self.stage1 == "union":
            return feather_stage1_union(s, view.raster, view.grid, view.n, a, self.stride)
        if cut.stage == 0:
            on_grid = uniform_grid(view.grid, view.n, self.stride).to(view.raster.device)
            n_grid = int(torch.isin(view.raster, on_grid).sum())
            return feather_stage1(s, view.raster, view.grid, view.n, stage1_count(view.n, n_grid, a), self.stride)
        return top_by_score(s, stage2_count(view.raster.numel(), s2))

    def select_batch(self, cut, view, scores):
        """select() for G samples with the same grid at once (vltok.inllm.BatchView): scores [G, R, n_cur] ->
        [G, k] ascending, the same indices as select() row by row, with no host sync."""
        s = query_mean(scores)
        a, s2 = cut.params
        if cut.stage == 1:
            return top_by_score_rows(s, stage2_count(view.raster.shape[1], s2))
        if view.raster.shape[1] != view.n or self.stage1 == "union":
            return None   # stage 1 runs on the full raster, with one count; anything else goes per sample
        # the grid, ascending (= local indices here), made on the device once (a host-to-device copy would sync)
        u, on_grid = _grid_mask(view.grid, view.n, self.stride, s.device)
        n1 = stage1_count(view.n, u.numel(), a)
        if u.numel() >= n1:
            return u[:n1].expand(s.shape[0], -1)
        return top_by_score_rows(s, n1, force=on_grid)   # the whole grid first, then the best others up to n1


PAPER = dict(a=0.3, s2=0.09)   # preset="paper": the paper's shares, cuts before layers L/4 and L/2


def feather_budget(options: dict) -> FixedBudget | None:
    """``preset="paper"`` (the paper's a, s2 and layers) and ``a=`` (the stage-1 share; s2 = a² unless given) fix the
    plan, so the budget (a FLOPs-equivalent keep that depends on the LLM's depth and the image grid) is theirs."""
    if options.get("preset") == "paper":
        return FixedBudget("preset='paper'", "the paper's plan: a=0.3, s2=0.09, cuts before layers L/4 and L/2 (or "
                           "layers=), a FLOPs-equivalent keep of about 0.35 on 576 tokens",
                           "drop preset='paper' to let keep choose the plan (a and s2 solved for keep)")
    if options.get("a") is not None:
        a, s2 = options["a"], options.get("s2")
        option = f"a={a!r}" + (f", s2={s2!r}" if s2 is not None else "")
        return FixedBudget(option, f"the stage-1 share a={a!r} and the stage-2 share s2="
                           f"{s2 if s2 is not None else 'a²'}, a FLOPs-equivalent keep that depends on the LLM's depth",
                           "drop a=... to let keep choose it (the solver picks a, with s2 = a² unless given)")
    return None


@register("feather", "FEATHER: in-LLM two-stage pruning, RoPE-free last-token criterion + uniform grid (stage 1), "
          "criterion only (stage 2)", ("in_llm",),
          options=dict(layers=optional(int_pair(1, ordered=True)), a=optional(real(0, 1)), s2=optional(real(0, 1)),
                       stride=integer(1), keep_mode=choice(*KEEP_MODES), preset=choice(None, "paper"),
                       stage1=choice(None, "union", "count")), budget=feather_budget)
def make_feather(keep: float | None, layers=None, a=None, s2=None, stride: int = 3, keep_mode: str = "flops",
                 preset=None, stage1=None) -> Method:
    """``stage1``: ``"union"`` (the paper's set: top-floor(a·N) of all visual tokens ∪ the stride grid, a size that
    varies per image; the default with ``preset="paper"``) or ``"count"`` (the grid, then the best off-grid tokens up
    to n1 = round(a·N + |U| - a·|U|), the same count for every image, so the keep solver's FLOPs are met exactly and
    batches stay on the batched / graph-replayed path; the default otherwise)."""
    if preset == "paper" and (a is not None or s2 is not None):
        raise ValueError(f"feather: preset='paper' fixes a={PAPER['a']}, s2={PAPER['s2']}; drop "
                         f"{'a' if a is not None else 's2'}=... or the preset")
    if stage1 is None:
        stage1 = "union" if preset == "paper" else "count"
    if layers is not None:
        layers = tuple(int(x) for x in layers)
    params = dict(layers=layers, a=a, s2=s2, stride=stride, keep_mode=keep_mode, preset=preset, stage1=stage1)
    return Method("feather", keep, params,
                  in_llm=FeatherPruner(keep, layers, a, s2, stride, keep_mode, preset, stage1))
