"""What a patched model kept of each image, in the image's own patch grid: ``handle.kept_patches()``.

The adapters and the in-LLM engine record, per call, what each stage did to every grid (raw tensors, cheap); this
module turns those records into one :class:`KeptGrid` per (image, grid) on request, so scripts and the demo draw
the same pictures (``vltok.visualize.draw_kept``).

* selection (``random``, ``tome`` / ``crossget`` with ``schedule="post"`` report each group's first patch and,
  for the post merge, the groups): the kept raster indices;
* merging inside the vision encoder (``tome``, ``crossget``, MustDrop's stage 1): every patch's group (the LLM-input
  token it was merged into) when ``handle.record_kept`` was True during the call (a one-hot tracer rides through
  the merges; off by default because it costs memory), else each group's first patch only;
* resampling (``fourier``, ``pool``, ``tokenshuffle``, ``llavamini``): the reduced grid (r_h, r_w) laid over the
  image;
* in-LLM (``fastv``, ``feather``, ``mustdrop``, ``llavamini`` early fusion): per cut layer, the patches whose tokens
  enter that layer.

Recorded by the LLaVA-1.5 adapter (every stage) and, for every family, by the in-LLM engine; other families'
pre-LLM and vision stages are not recorded yet (``kept_patches()`` then says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import VltokError

KINDS = ("none", "select", "merge", "resample", "in_llm")


@dataclass
class KeptGrid:
    """One grid of one image (LLaVA-1.5: one per image; LLaVA-NeXT: base tile and high-res map).

    ``image``: index of the image in the call (sample-major, as in ``pixel_values``). ``grid``: (h, w) patches.
    ``kind``: the stage that first reduced it (one of ``KINDS``). ``kept``: raster indices of the patches whose own
    token reaches the LLM (all for ``none`` / ``in_llm``; each group's first patch for ``merge``; empty for
    ``resample``). ``groups``: per patch (h*w), the index of the LLM-input token it went into, -1 = dropped (None for
    ``resample``, and for ``merge`` when the groups were not tracked). ``out_grid``: the reduced (r_h, r_w) of a
    resampling method. ``cuts``: in-LLM stages, decoder layer -> raster indices of the patches still present
    entering it (a merged token counts as its group's first patch). ``tokens``: tokens entering the LLM."""

    image: int
    grid: tuple[int, int]
    kind: str
    kept: list[int]
    groups: list[int] | None = None
    out_grid: tuple[int, int] | None = None
    cuts: dict[int, list[int]] = field(default_factory=dict)
    tokens: int = 0

    @property
    def final(self) -> list[int]:
        """Raster indices of the patches whose token survives every stage (after the last cut)."""
        if self.cuts:
            return self.cuts[max(self.cuts)]
        return list(self.kept)

    def to_dict(self) -> dict:
        return {"image": self.image, "grid": list(self.grid), "kind": self.kind, "kept": list(self.kept),
                "groups": None if self.groups is None else list(self.groups),
                "out_grid": None if self.out_grid is None else list(self.out_grid),
                "cuts": {int(k): list(v) for k, v in self.cuts.items()}, "tokens": int(self.tokens)}


def _list(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def stage_entries(records: list[dict]) -> list[KeptGrid]:
    """Pre-LLM / vision records (one per batched reduction of one grid shape) -> one KeptGrid per image."""
    out = []
    for rec in records:
        h, w = rec["grid"]
        n = h * w
        for b in range(rec["batch"]):
            kind = rec["kind"]
            if kind == "none":
                out.append(KeptGrid(len(out), (h, w), "none", list(range(n)), list(range(n)), tokens=n))
            elif kind == "resample":
                r_h, r_w = rec["out_grid"]
                out.append(KeptGrid(len(out), (h, w), "resample", [], None, (r_h, r_w), tokens=r_h * r_w))
            else:
                kept = _list(rec["kept"][b])
                groups = rec.get("groups")
                if groups is not None:
                    groups = _list(groups[b])
                elif kind == "select":
                    groups = [-1] * n
                    for i, p in enumerate(kept):
                        groups[p] = i
                out.append(KeptGrid(len(out), (h, w), kind, kept, groups, tokens=len(kept)))
    return out


def inllm_entries(layout, cuts, layer_cols, dead_cols, before: list[KeptGrid] | None) -> list[KeptGrid]:
    """The in-LLM engine's record: ``layout`` (per sample, vltok.inllm.VisualImage list), the cut layers, the kept
    prefill columns per layer [B, S_l] and the masked filler columns per layer. ``before``: what an earlier stage of
    the same call recorded per image (a vision merge: the LLM's visual tokens are its groups' first patches)."""
    out, flat = [], 0
    for b, imgs in enumerate(layout):
        first_image = flat
        for im in imgs:
            pos = im.positions.reshape(-1).cpu()
            j = first_image + im.image
            prev = before[j] if before is not None and j < len(before) else None
            if im.grid is not None:
                grid, index = tuple(im.grid), list(range(pos.numel()))
            elif prev is not None and len(prev.kept) == pos.numel():
                grid, index = prev.grid, prev.kept
            else:   # tokens without a layout: indices into the run
                grid, index = (1, pos.numel()), list(range(pos.numel()))
            per_cut = {}
            for layer in cuts:
                cols = layer_cols.get(layer)
                if cols is None:
                    continue
                cols = cols[b].cpu()
                dead = dead_cols.get(layer) if dead_cols else None
                if dead is not None:
                    cols = cols[~dead[b].cpu()]
                alive = torch.isin(pos, cols).nonzero().flatten().tolist()
                per_cut[int(layer)] = [index[i] for i in alive]
            if prev is not None and prev.grid == grid:
                entry = KeptGrid(j, grid, prev.kind, prev.kept, prev.groups, prev.out_grid, per_cut, prev.tokens)
            else:
                n = pos.numel()
                entry = KeptGrid(j, grid, "in_llm", list(index), list(range(n)) if im.grid is not None else None,
                                 cuts=per_cut, tokens=n)
            out.append(entry)
        flat = first_image + (max(im.image for im in imgs) + 1 if imgs else 0)
    return out


def resolve(handle) -> list[KeptGrid]:
    """``handle.kept_patches()``: the last call's records as KeptGrid entries (image order, grid order)."""
    stages = getattr(handle, "_kept_stages", None) or []
    inllm = getattr(handle, "_kept_inllm", None)
    if not stages and inllm is None:
        if not handle.stats:
            raise VltokError("kept_patches(): no call with images has run on this patched model yet; call the model "
                             "(forward or generate) with images first")
        raise VltokError(f"kept_patches(): vltok's {handle.family} adapter does not record the kept patches of "
                         f"{handle.method.name}'s {', '.join(handle.method.stages)} stage(s) (recorded: every stage "
                         "on LLaVA-1.5, in-LLM stages on every family)")
    before = stage_entries(stages) if stages else None
    if inllm is None:
        return before
    return inllm_entries(*inllm, before)
