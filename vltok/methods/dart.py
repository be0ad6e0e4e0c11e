"""DART (Wen et al., EMNLP'25, arXiv 2502.11494): "duplication matters more" -- pick a few pivot tokens, then keep
the tokens least similar (cosine) to the pivots. Training-free, needs no attention scores.

Checked against the authors' LLaVA code (ZichenWen1/DART, ``get_retained_image_token`` and ``DART_K_norm`` in the
LLaVA ``modeling_llama``; read through the code search, no copy). Their rule, before decoder layer K = 2:

* pivots: the ``pivot_image_token = 4`` image tokens and ``pivot_text_token = 4`` text tokens (after the image) of
  largest L1 norm of layer K-1's key states;
* for each pivot in turn, the TOKEN_TOPK = budget // 8 image tokens of LOWEST cosine similarity to it (on layer
  K-1's output after the final RMSNorm) are kept and leave the candidate pool; the image pivots are kept, the text
  pivots are not.

What vltok does (pure functions, no model):

* :func:`dart_select` is that rule on any token rows: ``pivots`` image pivots by L1 norm of ``norm_of`` rows
  (default the rows themselves), optional extra pivot rows (the text pivots), the pivots visited in order (image
  pivots by ascending index, then the extra ones; the authors iterate a Python set, whose order is an accident of
  hashing), and the per-pivot counts spread so the total is exactly the budget (the authors' floor keeps
  4 + 8 * (budget // 8), e.g. 132 for 128).
* ``dart`` (pre-LLM): on the features the LLM will receive (LLaVA-1.5: the projector's OUTPUT, the adapter reduces
  after the projector for this method; other families: their reduced grid). Pivot norm = L1 norm of those
  features (no keys exist before the LLM). Text pivots: the ``text_pivots`` of largest L1 norm among the LLM input
  embeddings of the prompt (side input ``text_embeds``) where the adapter gives them, none elsewhere.
* ``dart_llm`` (in-LLM, the paper's setting): a cut before layer K (default 2) on the image's hidden rows at that
  cut (layer K-1's output). The engine hands a method the image's hidden rows only: the pivot norm is the L1 norm
  of those hidden rows (not of the key states), the similarity is on the rows without the final RMSNorm, and there
  are no text pivots (the image pivots take their share: ``pivots`` default 8 = 4 + 4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IncompatibleError
from ..registry import choice, integer, register
from ..stages import Cut, GridPlan, GridReducer, Method, selection_plan
from .fastv import FastVPruner
from .feather import KEEP_MODES

POSITIONS = ("contiguous", "original")


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` counts differing by at most one, the larger ones first."""
    q, r = divmod(max(total, 0), parts)
    return [q + (1 if i < r else 0) for i in range(parts)]


def dart_select(x: torch.Tensor, k: int, pivots: int, extra: torch.Tensor | None = None,
                norm_of: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, N, C] -> kept indices [B, k] ascending.

    ``pivots`` rows of largest L1 norm of ``norm_of`` (default x; ties to the lower index) are kept; then each
    pivot in turn (image pivots by ascending index, then the rows of ``extra`` [B, P, C] in order) keeps the
    not-yet-kept rows of lowest cosine similarity to it (ties to the lower index), ``spread(k - pivots, all
    pivots)`` of them. No host sync (fixed shapes)."""
    B, N, C = x.shape
    if not 1 <= k <= N:
        raise ValueError(f"dart: k={k} must be in [1, {N}]")
    n_img = min(pivots, k)
    score = (x if norm_of is None else norm_of).float().abs().sum(-1)
    piv = score.argsort(dim=1, descending=True, stable=True)[:, :n_img].sort(dim=1).values   # [B, n_img]
    taken = torch.zeros(B, N, dtype=torch.bool, device=x.device).scatter_(1, piv, True)
    xn = F.normalize(x.float(), dim=-1)
    rows = [xn.gather(1, piv[:, i:i + 1, None].expand(-1, -1, C))[:, 0] for i in range(n_img)]
    if extra is not None and extra.shape[1]:
        en = F.normalize(extra.float().to(x.device), dim=-1)
        rows += [en[:, i] for i in range(en.shape[1])]
    for row, per in zip(rows, spread(k - n_img, len(rows))):
        if per == 0:
            continue
        sim = (xn @ row[..., None])[..., 0].masked_fill(taken, float("inf"))
        pick = sim.argsort(dim=1, stable=True)[:, :per]
        taken.scatter_(1, pick, True)
    return taken.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values


def text_pivot_rows(text_embeds, n: int, C: int):
    """The ``n`` rows of largest L1 norm of each sample's text embeddings (list of [T_i, C]) -> [B, n', C] with
    n' = min(n, min_i T_i), in ascending position order; None when there are none or the width differs."""
    if not n or text_embeds is None or not len(text_embeds):
        return None
    if any(t.shape[-1] != C for t in text_embeds):
        return None
    n = min([n] + [t.shape[0] for t in text_embeds])
    if n == 0:
        return None
    out = []
    for t in text_embeds:
        i = t.float().abs().sum(-1).argsort(descending=True, stable=True)[:n].sort().values
        out.append(t[i])
    return torch.stack(out)


class DartReducer(GridReducer):
    """Pre-LLM DART: selection on the features the LLM receives (``after_projector``: LLaVA-1.5 reduces the
    projector's output for this reducer; a per-token projector makes that the same as projecting the kept rows)."""

    wants = ("text_embeds",)     # used where the adapter gives it; no text pivots elsewhere
    after_projector = True

    def __init__(self, keep: float, pivots: int, text_pivots: int, positions: str):
        self.keep, self.pivots, self.text_pivots, self.positions = keep, pivots, text_pivots, positions

    def plan(self, h: int, w: int) -> GridPlan:
        return selection_plan(h, w, self.keep)

    def select(self, x, plan, text_embeds=None, **side):
        if plan.count == x.shape[1]:
            return torch.arange(plan.count, device=x.device).expand(x.shape[0], -1), x
        extra = None
        if text_embeds is not None and len(text_embeds) == x.shape[0]:
            extra = text_pivot_rows(text_embeds, self.text_pivots, x.shape[-1])
        idx = dart_select(x, plan.count, self.pivots, extra)
        return idx, x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class DartPruner:
    """In-LLM DART: one cut before layer K on the image's hidden rows (no attention scores: FlashAttention-safe).
    Budget per image as FastV's (``keep_mode``)."""

    graph_safe = False

    def __init__(self, keep: float, K: int, pivots: int, keep_mode: str):
        self.keep, self.K, self.pivots, self.keep_mode = keep, K, pivots, keep_mode
        self._budget = FastVPruner(keep, K, keep_mode, False)   # the same count / validate rules as FastV

    def count(self, n, n_layers):
        return self._budget.count(n, n_layers)

    def validate(self, n_layers):
        try:
            self._budget.validate(n_layers)
        except IncompatibleError as e:
            raise IncompatibleError(str(e).replace("fastv", "dart_llm")) from None

    def plan(self, n_layers, images):
        self.validate(n_layers)
        if self.keep >= 1.0 or all(self.count(n, n_layers) >= n for n, _ in images):
            return []
        return [Cut(self.K, stage=0, params=(n_layers,), scores=False, hidden=True)]

    def select(self, cut, view, scores):
        k = min(self.count(view.n, cut.params[0]), view.hidden.shape[0])
        return dart_select(view.hidden[None], k, self.pivots)[0]

    def select_batch(self, cut, view, scores):
        k = min(self.count(view.n, cut.params[0]), view.hidden.shape[1])
        return dart_select(view.hidden, k, self.pivots)


@register("dart", "DART (pre-LLM): pivot tokens by L1 norm (+ text pivots from the prompt where the model gives "
          "them), then the tokens least similar to the pivots; on the features the LLM receives", ("pre_llm",),
          options=dict(pivots=integer(1), text_pivots=integer(0), positions=choice(*POSITIONS)))
def make_dart(keep: float, pivots: int = 4, text_pivots: int = 4, positions: str = "contiguous") -> Method:
    return Method("dart", keep, dict(pivots=pivots, text_pivots=text_pivots, positions=positions),
                  pre_llm=DartReducer(keep, int(pivots), int(text_pivots), positions))


@register("dart_llm", "DART (in-LLM, the paper's setting): before layer K (2), pivots by L1 norm of the hidden "
          "rows, keep the image tokens least similar to them; no attention scores", ("in_llm",),
          options=dict(K=integer(1), pivots=integer(1), keep_mode=choice(*KEEP_MODES)))
def make_dart_llm(keep: float, K: int = 2, pivots: int = 8, keep_mode: str = "flops") -> Method:
    return Method("dart_llm", keep, dict(K=K, pivots=pivots, keep_mode=keep_mode),
                  in_llm=DartPruner(keep, int(K), int(pivots), keep_mode))
