"""The stage protocol that joins methods (pure tensor functions) and adapters (model families).

A method declares which stages it uses and provides one object per stage:

* ``pre_llm``  -- a :class:`GridReducer`: maps one image's visual-token grid ``x [B, h*w, C]`` (raster order)
  to ``[B, k, C]``. The output count ``k`` must be known from ``(h, w)`` alone (``plan``), so an adapter can
  shrink placeholder runs before the model runs.
* ``vision``   -- reduces tokens between encoder layers.
* ``in_llm``   -- prunes hidden states before decoder layer k during prefill.
* ``decode``   -- rewrites the KV cache after prefill.

An adapter knows where a family keeps its grids and applies the stage results; it never knows a method.
See docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

STAGES = ("vision", "pre_llm", "in_llm", "decode")


@dataclass(frozen=True)
class GridPlan:
    """What a pre-LLM reducer will make of one (h, w) grid.

    ``count`` tokens come out. ``grid`` is ``(r_h, r_w)`` when the output is itself a raster grid (resampling
    methods); ``None`` when it is a subset of the input in raster order (selection methods).
    """

    h: int
    w: int
    count: int
    grid: tuple[int, int] | None

    @property
    def identity(self) -> bool:
        return self.count == self.h * self.w and (self.grid is None or self.grid == (self.h, self.w))


class GridReducer(Protocol):
    def plan(self, h: int, w: int) -> GridPlan: ...

    def reduce(self, x: torch.Tensor, plan: GridPlan) -> torch.Tensor:
        """x: [B, h*w, C] in raster order -> [B, plan.count, C]. Must not modify x."""
        ...


@dataclass
class Method:
    """A configured method: the per-stage objects an adapter will call (None = stage unused).

    ``vision``: merges tokens between vision-encoder layers; ``pre_llm``: a GridReducer; ``in_llm``: prunes
    hidden states before chosen decoder layers at prefill; ``decode``: a KV-cache policy after prefill.
    The protocols of the last three live next to their engines (docs/architecture.md).
    """

    name: str
    keep: float
    params: dict
    vision: object | None = None
    pre_llm: GridReducer | None = None
    in_llm: object | None = None
    decode: object | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if getattr(self, s, None) is not None)

    @property
    def identity(self) -> bool:
        return self.keep >= 1.0


def kept_count(n: int, keep: float) -> int:
    """round(keep * n) tokens of n, at least one and at most n: the budget of a token-level selection or merge."""
    return max(1, min(n, round(keep * n)))


def selection_plan(h: int, w: int, keep: float) -> GridPlan:
    """The plan of a selection reducer that keeps ``kept_count`` of the h*w tokens (not a raster grid)."""
    return GridPlan(h, w, kept_count(h * w, keep), None)


def selected_indices(reducer, x: torch.Tensor, plan: GridPlan, **side) -> torch.Tensor:
    """For selection reducers (``plan.grid is None``): the kept raster indices, [B, k] ascending. ``side``: the
    side inputs the adapter supplies for the reducer's ``needs`` / ``wants`` (passed only when there are any)."""
    if not hasattr(reducer, "indices"):
        raise TypeError(f"{type(reducer).__name__} selects tokens but has no indices(x, plan) method")
    return reducer.indices(x, plan, **side)


def select(reducer, x: torch.Tensor, plan: GridPlan, **side) -> tuple[torch.Tensor, torch.Tensor]:
    """For selection reducers: (kept raster indices [B, k] ascending, the rows that stand there [B, k, C]).

    A reducer with ``select(x, plan)`` gives both (a merging reducer's rows are group means, not copies of x);
    otherwise the rows are x gathered at ``indices``. ``side``: side inputs (``cls_attention``, ``text_embeds``)."""
    if hasattr(reducer, "select"):
        return reducer.select(x, plan, **side)
    idx = selected_indices(reducer, x, plan, **side)
    return idx, x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]).to(x.device))


# -- in-LLM and decode stages ------------------------------------------------------------------------------------
# The contract between an in-LLM method (``Method.in_llm``, ``Method.decode``) and the engine that runs it
# (vltok/inllm.py). The types below are all a method sees; docs/architecture.md links here instead of restating them.

from typing import runtime_checkable  # noqa: E402  (this section is appended; the imports above belong to the top part)


@dataclass(frozen=True)
class Cut:
    """Prune before decoder ``layer`` (>= 1), scored from the q/k projections of layer ``layer - 1``.

    ``rope``: apply the model's rotary embedding to q and k before scoring (FastV, MustDrop) or not (FEATHER).
    ``query``: ``"last"`` (the last real prompt token) or ``"text"`` (every real token after the last image).
    ``softmax``: over the sample's visual keys only (``"visual"``) or over every key the query may see (``"all"``).
    """

    layer: int
    rope: bool = False
    query: str = "last"
    softmax: str = "visual"
    stage: int = 0          # index of this cut in the plan
    params: tuple = ()      # method-specific budget data handed back to select()
    scores: bool = True     # False: no attention scores (select() gets None; no q/k is kept for this cut)
    hidden: bool = False    # True: the views carry the image's current hidden rows (``view.hidden``)


@dataclass
class Merge:
    """What ``select`` / ``select_batch`` may return instead of plain indices: the survivors ``indices`` (into
    view.raster, ascending: [k], or [G, k] from select_batch) and their new hidden rows ``rows`` ([k, d] / [G, k, d],
    any float dtype; cast to the model's). Each survivor keeps its ORIGINAL column (position ids, rotary rows, mask
    rows and columns); only its hidden row at this cut is replaced (e.g. by the mean of a window it represents)."""

    indices: torch.Tensor
    rows: torch.Tensor


@dataclass
class ImageView:
    """What a method sees of one image at one cut: its grid, native count, survivors (raster indices, ascending)."""

    grid: tuple[int, int] | None
    n: int
    raster: torch.Tensor
    protected: torch.Tensor | None = None
    saliency: torch.Tensor | None = None
    hidden: torch.Tensor | None = None   # [n_cur, d] the survivors' hidden rows at this cut (``Cut.hidden`` only)


@dataclass
class BatchView:
    """What ``select_batch`` sees of one image slot at one cut, for G samples at once: ``raster`` [G, n_cur]
    (ascending per row), ``saliency`` [G, n] or None. Every row has the same grid, native count and survivor count."""

    grid: tuple[int, int] | None
    n: int
    raster: torch.Tensor
    saliency: torch.Tensor | None = None
    hidden: torch.Tensor | None = None   # [G, n_cur, d] (``Cut.hidden`` only)


@runtime_checkable
class InLLMPolicy(Protocol):
    """``Method.in_llm``: prunes (or merges) visual tokens before chosen decoder layers at prefill.

    Pure: it knows no model. The engine (vltok/inllm.py) finds the visual tokens, computes the attention scores a
    :class:`Cut` asks for, applies the survivors and decodes on the shorter KV cache. Kept tokens keep their
    ORIGINAL positions (position ids, rotary rows, mask rows and columns).

    Required: :meth:`plan` and :meth:`select`. Optional members, looked up with ``getattr`` (absent = the default):

    * ``select_batch(cut, view: BatchView, scores [G, R, n_cur] | None) -> [G, k] | Merge | None``: the same
      choice as :meth:`select`, row by row, for G samples whose image slot has the same grid (the usual batch),
      with no host sync. None declines (the engine then calls :meth:`select` sample by sample). See
      :class:`BatchedInLLMPolicy`.
    * ``validate(n_layers) -> None``: raise :class:`vltok.errors.IncompatibleError` at patch time for a budget the
      model's depth cannot reach (before any hook is installed).
    * ``needs_saliency: bool = False``: the adapter fills ``view.saliency`` with a vision-side score per token
      (LLaVA: the CLS attention of the last ViT layer); an adapter without one warns and leaves it None.
    * ``graph_safe: bool = False``: ``select_batch`` is sync-free index work (no ``.item()``, no data-dependent
      shapes), so the engine may replay the cut from a CUDA graph (``vltok.patch(..., cut_graphs=...)``).
    """

    def plan(self, n_layers: int, images: list[tuple[int, tuple[int, int] | None]]) -> list[Cut]:
        """The cuts of one call, from the first sample with images: ``images`` = per image (token count, grid or
        None). Called with ``native=[count per image before the vision stage]`` as well when a vision stage of the
        same method merged tokens first. Cuts outside ``1..n_layers-1`` are ignored; ``[]`` = nothing to prune."""
        ...

    def select(self, cut: Cut, view: ImageView, scores: torch.Tensor | None) -> torch.Tensor | Merge:
        """The survivors of one image of one sample at ``cut``: indices into ``view.raster`` (any order, duplicates
        allowed; the engine sorts them), or a :class:`Merge` (strictly ascending indices plus replacement rows).
        ``scores`` [R, n_cur] fp32: the attention of R query rows (mean over heads) to the image's current tokens
        (``cut.softmax`` says over which keys it was normalized); None when ``cut.scores`` is False. An image may keep
        0 tokens."""
        ...


@runtime_checkable
class BatchedInLLMPolicy(InLLMPolicy, Protocol):
    """An :class:`InLLMPolicy` with the batched fast path (see ``select_batch`` there)."""

    def select_batch(self, cut: Cut, view: BatchView,
                     scores: torch.Tensor | None) -> torch.Tensor | Merge | None:
        """:meth:`InLLMPolicy.select` for G samples at once: ``scores`` [G, R, n_cur] (padded query rows are zero)
        -> [G, k] ascending per row (every row the same k), a :class:`Merge` with [G, k] indices and [G, k, d] rows,
        or None to decline this cut."""
        ...


@runtime_checkable
class DecodePolicy(Protocol):
    """``Method.decode``: rewrites the KV cache after an in-LLM prefill (it needs an ``in_llm`` stage)."""

    def evict_from(self, cuts: list[int]) -> int:
        """Given the cut layers of the call (ascending), the first decoder layer whose cache keeps only the final
        survivors (the columns of the returned logits). Layer 0 always keeps its full cache (HF reads the sequence
        length from it)."""
        ...
