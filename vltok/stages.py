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
