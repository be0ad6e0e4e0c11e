"""Merging inside the Qwen2-VL / Qwen2.5-VL vision tower (vision-stage methods: ``tome``, ``crossget``).

Granularity: the PatchMerger concatenates m*m consecutive rows (m = spatial_merge_size = 2: a 2x2 block of patches,
Qwen's rows are block-major) into one LLM token. Merges therefore act on whole *units* of m*m rows: a unit is one
token of the merger (x viewed as [units, m*m*C]), matched on its rows' pre-rotary keys concatenated per head
([units, H, m*m*d]: unit similarity = row-by-row similarity, what the merger's concatenation sees), and averaged
unit by unit (row j of the destination with row j of the source), so the merger still sees m*m rows per unit.

Positions: every kept unit keeps the 2-D rotary rows of its *anchor*, the original unit standing there (a merged
group's destination, which the merger's ``merge(..., anchor=)`` reports); the LLM gets the anchors' original M-RoPE
positions through the Qwen adapter's selection path (the tower is described to it by :class:`TowerSelection`, a
data-dependent selection of ``count(U)`` units per frame whose kept indices the tower records).

Segments: the tower attends per frame (``cu_seqlens``: one segment per image and per temporal slice of a video);
merges happen per frame only (never across images or frames), with the method's schedule for that frame's U units
(``merger.schedule(U, depth)``: r per block, spread over every block; keep applies per frame as for pre-LLM
methods). Qwen2.5-VL's window attention: a unit belongs to the window of its anchor's original position, and after
every merge each frame's units are re-sorted by their anchors' rank in the native window order, so windows stay
contiguous and ``cu_window_seqlens`` is rebuilt from the survivors per window (an emptied window vanishes); the
full-attention blocks use the per-frame segments. Merges may therefore join units of two windows of one frame (at
any block); the merged unit then attends in its destination's window. The merger output is put back in raster order
of the anchors (Qwen2.5-VL's ``reverse_indices`` for the reduced set).

Blocks before the first merge run the model's own block (bit-identical); from the first merging block on, the block
runs here (the model's own norm / qkv / proj / mlp modules, rotary as ``apply_rotary_pos_emb_vision``, torch SDPA per
segment, whatever the model's attention implementation) so proportional attention can add log(size) to each key's
logit. A call where no frame merges (keep=1.0, tiny frames) runs the model's own tower forward.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import time

import torch
import torch.nn.functional as F

from vltok import compat
from vltok.errors import IncompatibleError
from vltok.stages import GridPlan, GridReducer

from .base import features_entry, set_instance_attr


def vision_refusal(merger) -> str | None:
    """Why the Qwen tower cannot run this vision-stage merger (None: it can)."""
    if merger.trailing:
        return ("appends a learned cross token to the vision encoder (CrossGET's cross_tokens, trained on "
                "LLaVA-1.5); the Qwen tower merges training-free only (drop cross_tokens=)")
    if merger.decide is not None or merger.after_mlp:
        return ("its vision-stage merge count depends on the image (MustDrop's window merge); the Qwen tower "
                "needs the count per frame before the model runs (M-RoPE positions)")
    if "anchor" not in inspect.signature(merger.merge).parameters:
        return "its vision-stage merger does not report each merged group's destination (merge(..., anchor=))"
    return None


class TowerSelection(GridReducer):
    """The tower's outcome as the Qwen adapter's pre-LLM code sees it: per frame of (h, w) merger units, ``count``
    units survive (a data-dependent selection, ``plan.indices`` None: the kept raster indices are recorded by the
    tower run, so ``select`` is never asked)."""

    def __init__(self, merger, depth: int):
        self.merger, self.depth = merger, depth
        self._cache: dict[int, list[int]] = {}

    def schedule(self, n_units: int) -> list[int]:
        if n_units not in self._cache:
            sch = list(self.merger.schedule(n_units, self.depth)) if n_units > 1 else []
            self._cache[n_units] = sch + [0] * (self.depth - len(sch))
        return self._cache[n_units]

    def count(self, n_units: int) -> int:
        return n_units - sum(self.schedule(n_units))

    def plan(self, h: int, w: int) -> GridPlan:
        return GridPlan(h, w, self.count(h * w), None)

    def select(self, x, plan, **side):
        raise RuntimeError("vltok: the Qwen tower merge records its kept units while the tower runs; they were "
                           "asked for before it ran (please report this)")


def tower_method(model, method):
    """The method as the Qwen adapter runs it: the vision merger kept, a :class:`TowerSelection` as ``pre_llm``."""
    reason = vision_refusal(method.vision)
    if reason:
        raise IncompatibleError(f"{method.name}: {reason}")
    depth = len(model.model.visual.blocks)
    return dataclasses.replace(method, pre_llm=TowerSelection(method.vision, depth))


class TowerRun:
    """Per-call record of the last tower call (read by the feature wrapper and tests)."""

    def __init__(self):
        self.kept = None        # per frame: LongTensor of kept unit raster indices (ascending)
        self.counts = []        # units entering each block, then leaving the last (all frames)
        self.seconds = 0.0
        self.merged = False


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_vision(q, k, cos, sin):
    """Qwen's ``apply_rotary_pos_emb_vision``: q, k [N, H, d], cos / sin [N, d]; float math, cast back."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    qf, kf = q.float(), k.float()
    return ((qf * cos) + (_rotate_half(qf) * sin)).to(q.dtype), ((kf * cos) + (_rotate_half(kf) * sin)).to(k.dtype)


def _runs(lengths: list[int]):
    """Consecutive equal lengths -> (start row, count, length) runs."""
    out, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        out.append((start, j - i, lengths[i]))
        start += (j - i) * lengths[i]
        i = j
    return out


def attend(blk, x, cos, sin, seg_lens: list[int], bias=None):
    """The attention half of a Qwen vision block with residual, per segment (rows of ``seg_lens``), with an
    optional additive key bias [N] (log size). Returns (x, pre-rotary keys [N, H, d])."""
    attn = blk.attn
    N = x.shape[0]
    H = attn.num_heads
    q, k, v = attn.qkv(blk.norm1(x)).reshape(N, 3, H, -1).permute(1, 0, 2, 3).unbind(0)
    keys = k
    q, k = rope_vision(q, k, cos, sin)
    runs = _runs(seg_lens)
    if len(runs) > 8:   # many segments of varied lengths (Qwen2.5-VL's windows after merges): one padded call
        return x + attn.proj(_padded_attention(q, k, v, seg_lens, bias, attn.scaling)), keys
    parts = []
    for start, n, L in runs:
        sl = slice(start, start + n * L)
        qs, ks, vs = (t[sl].reshape(n, L, H, -1).transpose(1, 2) for t in (q, k, v))
        mask = None if bias is None else bias[sl].view(n, 1, 1, L).to(q.dtype)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=attn.scaling)
        parts.append(o.transpose(1, 2).reshape(n * L, -1))
    out = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return x + attn.proj(out), keys


def _padded_attention(q, k, v, seg_lens: list[int], bias, scale):
    """Attention within segments as one SDPA call over [segments, max length] with padded keys masked out."""
    N, H, d = q.shape
    dev = q.device
    lens = torch.tensor(seg_lens, device=dev)
    n, L = len(seg_lens), max(seg_lens)
    seg = torch.repeat_interleave(torch.arange(n, device=dev), lens)
    off = torch.arange(N, device=dev) - (lens.cumsum(0) - lens)[seg]
    pads = []
    for t in (q, k, v):
        p = t.new_zeros(n, L, H, d)
        p[seg, off] = t
        pads.append(p.transpose(1, 2))
    mask = torch.full((n, 1, 1, L), float("-inf"), dtype=q.dtype, device=dev)
    mask[seg, 0, 0, off] = 0 if bias is None else bias.to(q.dtype)
    o = F.scaled_dot_product_attention(*pads, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)[seg, off].reshape(N, -1)


class QwenTower:
    """Wraps ``model.model.visual.forward`` (on the instance) to merge units inside the blocks."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.visual = adapter.model.model.visual
        self.merger = adapter.method.vision
        self.select = adapter.method.pre_llm
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")
        self.run = TowerRun()

    def install(self, undo):
        vis = self.visual
        orig = vis.forward

        def forward(hidden_states, grid_thw=None, **kwargs):
            if grid_thw is None:
                raise IncompatibleError("vltok's Qwen tower merge needs grid_thw")
            frames = self.frames(grid_thw)
            scheds = [self.select.schedule(U) for _, _, U in frames]
            if not any(any(s) for s in scheds):
                self.run = TowerRun()
                self.run.kept = [torch.arange(U) for _, _, U in frames]
                return orig(hidden_states, grid_thw=grid_thw, **kwargs)
            cfg = self.visual.config
            if kwargs.get("output_attentions", getattr(cfg, "output_attentions", False)):
                raise IncompatibleError(
                    "vltok's Qwen tower merge computes the ViT's attention without its weights, so output_attentions "
                    "cannot be returned while it merges; patch with schedule='post' (merging after the tower) or "
                    "unpatch for this call")
            want_hs = kwargs.get("output_hidden_states", getattr(cfg, "output_hidden_states", False))
            return self.merging_forward(hidden_states, grid_thw, frames, scheds, bool(want_hs))

        set_instance_attr(vis, "forward", forward, undo)

    def frames(self, grid_thw) -> list[tuple[int, int, int]]:
        """Per frame (temporal slice) of every item: (item, slice, units)."""
        m = self.visual.spatial_merge_size
        out = []
        for j, (t, h, w) in enumerate(grid_thw.tolist()):
            out += [(j, s, (h // m) * (w // m)) for s in range(t)]
        return out

    # -- the merging forward -----------------------------------------------------------------------------------
    def merging_forward(self, pixels, grid_thw, frames, scheds, want_hidden_states: bool = False):
        """The tower with merges. ``want_hidden_states``: also return the input of the first block and every block's
        output (the model's own layout: window order on Qwen2.5-VL), each with the rows alive after that block."""
        BaseModelOutputWithPooling = compat.transformers_attr("modeling_outputs", "BaseModelOutputWithPooling")
        get_vision_position_ids = compat.transformers_attr("vision_utils", "get_vision_position_ids")

        vis = self.visual
        m = vis.spatial_merge_size
        u = m * m
        run = self.run = TowerRun()
        run.merged = True
        x = vis.patch_embed(pixels)
        N, C = x.shape
        n_units = N // u
        pos_ids = get_vision_position_ids(grid_thw, m)
        cos_full, sin_full = vis.rotary_pos_emb(x, pos_ids)   # raster (unpermuted) order, [N, d]
        fcounts = [U for _, _, U in frames]
        frame_of = torch.repeat_interleave(torch.arange(len(frames), device=x.device),
                                           torch.tensor(fcounts, device=x.device))
        starts = [0]
        for U in fcounts[:-1]:
            starts.append(starts[-1] + U)
        frame_start = torch.tensor(starts, device=x.device)
        if self.windowed:
            get_vision_window_index = compat.transformers_attr("vision_utils", "get_vision_window_index")

            window_index, cu_win = get_vision_window_index(grid_thw, m, vis.window_size, vis.patch_size)
            window_index = window_index.to(x.device)
            cu_units = (cu_win.to(x.device) // u).long()
            wid = torch.searchsorted(cu_units, torch.arange(n_units, device=x.device), right=True) - 1
            rank = torch.empty_like(window_index)
            rank[window_index] = torch.arange(n_units, device=x.device)
            win = torch.empty_like(wid)
            win[window_index] = wid
            anchor = window_index.clone()
        else:
            rank = torch.arange(n_units, device=x.device)
            win = None
            anchor = torch.arange(n_units, device=x.device)
        x = x.view(n_units, u, C)[anchor].view(N, C)
        size = None   # per unit, once something merged
        full_attn = set(getattr(vis, "fullatt_block_indexes", None) or range(len(vis.blocks)))
        first = min(i for s in scheds for i, r in enumerate(s) if r)
        prop = bool(getattr(self.merger, "prop_attn", False))
        run.counts = [n_units]

        def rows(a):   # unit anchors -> their rows in the raster tables
            return (a[:, None] * u + torch.arange(u, device=a.device)).reshape(-1)

        def windows():   # rows per window, in order (one host read per layout change)
            return None if win is None else (torch.unique_consecutive(win[anchor], return_counts=True)[1] * u).tolist()

        cos, sin = cos_full[rows(anchor)], sin_full[rows(anchor)]
        win_seg = windows()
        hidden = [x] if want_hidden_states else None
        for i, blk in enumerate(vis.blocks):
            seg = [U * u for U in fcounts] if i in full_attn else win_seg
            if i < first:   # nothing merged yet: the model's own block
                cu = torch.tensor([0] + seg, device=x.device).cumsum(0).to(torch.int32)
                x = blk(x, cu_seqlens=cu, max_seqlen=max(seg), position_embeddings=(cos, sin))
                run.counts.append(x.shape[0] // u)
                if hidden is not None:
                    hidden.append(x)
                continue
            bias = size.repeat_interleave(u).log() if (prop and size is not None) else None
            x, keys = attend(blk, x, cos, sin, seg, bias)
            if any(s[i] for s in scheds):
                t0 = time.perf_counter()
                if size is None:
                    size = torch.ones(x.shape[0] // u, device=x.device, dtype=torch.float32)
                x, size, anchor, fcounts = self.merge_step(x, keys, size, anchor, fcounts,
                                                           [s[i] for s in scheds], rank, u)
                cos, sin = cos_full[rows(anchor)], sin_full[rows(anchor)]
                win_seg = windows()
                run.seconds += time.perf_counter() - t0
            x = x + blk.mlp(blk.norm2(x))
            run.counts.append(x.shape[0] // u)
            if hidden is not None:
                hidden.append(x)
        merged = vis.merger(x)
        order = anchor.argsort()
        kept = anchor[order]
        run.kept = list((kept - frame_start[frame_of[kept]]).split(fcounts))
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=merged[order],
                                          hidden_states=None if hidden is None else tuple(hidden))

    def merge_step(self, x, keys, size, anchor, fcounts, rs, rank, u):
        """Merge rs[f] units of every frame f (frames of equal (units, r) batched); each frame's survivors are then
        sorted by their anchors' native rank (raster, or Qwen2.5-VL's window order)."""
        N, C = x.shape
        H = keys.shape[1]
        xu = x.view(-1, u * C)
        ku = keys.reshape(-1, u, H, keys.shape[-1]).transpose(1, 2).reshape(-1, H, u * keys.shape[-1])
        starts = [0]
        for U in fcounts[:-1]:
            starts.append(starts[-1] + U)
        groups: dict[tuple[int, int], list[int]] = {}
        for f, (U, r) in enumerate(zip(fcounts, rs)):
            if r:
                groups.setdefault((U, r), []).append(f)
        new = {}
        for (U, r), fs in groups.items():
            idx = (torch.tensor([starts[f] for f in fs], device=x.device)[:, None]
                   + torch.arange(U, device=x.device))                                    # [G, U]
            pos = torch.arange(U, device=x.device).expand(len(fs), U)
            y, s, _, a = self.merger.merge(xu[idx], size[idx][..., None], pos, ku[idx], None, r, 0,
                                           anchor=anchor[idx])
            perm = rank[a].argsort(-1)
            y = y.gather(1, perm[..., None].expand(-1, -1, y.shape[-1]))
            s, a = s[..., 0].gather(1, perm), a.gather(1, perm)
            for g, f in enumerate(fs):
                new[f] = (y[g], s[g], a[g])
        xs, ss, as_ = [], [], []
        for f, U in enumerate(fcounts):
            if f in new:
                y, s, a = new[f]
            else:
                sl = slice(starts[f], starts[f] + U)
                y, s, a = xu[sl], size[sl], anchor[sl]
            xs.append(y)
            ss.append(s)
            as_.append(a)
        fcounts = [U - r for U, r in zip(fcounts, rs)]
        return torch.cat(xs).reshape(-1, C), torch.cat(ss), torch.cat(as_), fcounts


def install_tower(adapter, undo) -> QwenTower:
    tower = QwenTower(adapter)
    tower.install(undo)
    adapter._tower = tower
    return tower


def wrap_tower_features(adapter, inner, kind: str, undo: list) -> None:
    """``get_{kind}_features`` while the tower merges: the tower's output split by the reduced per-item counts;
    records the kept units (for M-RoPE positions), stats and kept_patches()."""
    name = f"get_{kind}_features"
    orig = getattr(inner, name)
    sig = inspect.signature(orig)
    grid_kw = f"{kind}_grid_thw"
    tower = adapter._tower

    @functools.wraps(orig)
    def get_features(*args, **kwargs):
        bound, pixels, as_dict, early = features_entry(sig, inner.config, adapter._ahead, kind, args, kwargs)
        if early is not None:   # encoded ahead in prepare (positions need the kept units)
            return early
        grid_thw = bound.get(grid_kw)
        extra = {k: v for k, v in bound.items() if k not in list(sig.parameters)[:2] and k != "return_dict"}
        visual = inner.visual
        out = visual(pixels.type(visual.dtype), grid_thw=grid_thw, **extra)
        run = tower.run
        sizes, kept, f = [], [], 0
        for t, h, w in adapter._frames(grid_thw):
            per = run.kept[f:f + t]
            f += t
            kept.append(list(per))
            n_out = sum(int(k.numel()) for k in per)
            sizes.append(n_out)
            adapter.record.image(t * h * w, n_out, [(t, h, w)], [(t, n_out // t)])
            adapter.record.kept("merge" if run.merged else "none", (h, w), t,
                                kept=torch.stack(per) if run.merged else None)
        out.pooler_output = torch.split(out.pooler_output, sizes)
        adapter._kept[kind] = kept
        if adapter.record.stats:
            adapter.record.stats["vision_tokens_per_layer"] = list(run.counts)
        adapter.record.seconds(run.seconds)
        return out if as_dict else out.to_tuple()

    set_instance_attr(inner, name, get_features, undo)
