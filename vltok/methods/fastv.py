"""FastV: one in-LLM cut before layer K, scored by the last prompt token's attention with RoPE, softmax over every
key it sees; keeps the top-n visual tokens per image. The baseline FEATHER fixes (its bias toward the bottom of the
image comes from RoPE's decay). Specs: ../shared/specs/methods/feather.md §2, §6.2.
"""
from __future__ import annotations

from ..errors import IncompatibleError
from ..stages import Cut
from ..registry import boolean, choice, integer, register
from ..stages import Method, kept_count
from .feather import KEEP_MODES, query_mean, top_by_score, top_by_score_rows


class FastVPruner:
    graph_safe = True   # select_batch is sync-free index work: the engine may replay the cut from a CUDA graph
    def __init__(self, keep, K, keep_mode, rope):
        self.keep, self.K, self.keep_mode, self.rope = keep, K, keep_mode, rope

    def count(self, n, n_layers):
        if self.keep_mode == "final":
            return kept_count(n, self.keep)
        return max(1, min(n, round((self.keep * n_layers - self.K) * n / (n_layers - self.K))))

    def validate(self, n_layers):
        if not 1 <= self.K < n_layers:
            raise IncompatibleError(f"fastv: K={self.K} must lie in 1..{n_layers - 1} for this {n_layers}-layer LLM")
        if self.keep_mode == "flops" and self.keep < 1.0 and self.keep * n_layers <= self.K:
            raise IncompatibleError(
                f"fastv cannot reach keep={self.keep} (FLOPs-equivalent) with K={self.K} on {n_layers} layers: the "
                f"first {self.K} layers see every token, so the floor is {self.K / n_layers:.3f}; raise keep, lower "
                "K, or pass keep_mode='final'")

    def plan(self, n_layers, images):
        self.validate(n_layers)
        if self.keep >= 1.0 or all(self.count(n, n_layers) >= n for n, _ in images):
            return []
        return [Cut(self.K, rope=self.rope, query="last", softmax="all", stage=0, params=(n_layers,))]

    def select(self, cut, view, scores):
        return top_by_score(scores.mean(0), self.count(view.n, cut.params[0]))

    def select_batch(self, cut, view, scores):
        """select() for G samples at once: scores [G, R, n_cur] -> [G, k] ascending (no host sync)."""
        return top_by_score_rows(query_mean(scores), self.count(view.n, cut.params[0]))



@register("fastv", "FastV: in-LLM pruning before layer K by the last token's attention (with RoPE, softmax over all "
          "keys); the baseline FEATHER fixes", ("in_llm",),
          options=dict(K=integer(1), keep_mode=choice(*KEEP_MODES), rope=boolean()))
def make_fastv(keep: float, K: int = 2, keep_mode: str = "flops", rope: bool = True) -> Method:
    return Method("fastv", keep, dict(K=K, keep_mode=keep_mode, rope=rope),
                  in_llm=FastVPruner(keep, K, keep_mode, bool(rope)))
