"""Qwen2-VL (Qwen2VLForConditionalGeneration) and Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), images and videos.

Where the grids are: ``get_image_features`` / ``get_video_features`` of the inner model return one tensor per
image / video of t * (h/m) * (w/m) tokens (m = spatial_merge_size = 2), after the PatchMerger. Each temporal slice
is an (h/m) x (w/m) raster grid (Qwen2.5-VL's window attention permutes tokens inside the ViT and restores raster
order after the merger, so the features we see are raster-ordered for both). The reduction wraps those two
methods on the instance and reduces every temporal slice (frame) separately: ``keep`` applies per frame.

M-RoPE: ``get_rope_index`` is wrapped on the instance (the caller's ``image_grid_thw`` is never modified):
* resampling methods (plan.grid = (r_h, r_w)): the 3-D positions are computed on a compressed COPY of the grid,
  (t, m*r_h, m*r_w), i.e. compact positions of the new grid (what Fourier-VLM's Qwen checkpoints expect);
* selection methods (plan.grid is None): the positions are computed on the unpruned sequence (each shrunk run is
  expanded back to its native length) and the kept tokens keep their original (t, h, w); ``rope_deltas`` becomes
  the original delta plus the number of removed tokens, so decoding continues after the unpruned length.
The ViT itself always sees the native grid.
Caller-supplied 3-D ``position_ids`` ([3, B, S], or [4, B, S] with the text row first) are shrunk in ``prepare``:
selection methods keep the caller's values on the kept tokens (each kept visual token carries the positions of the
token it was selected from); resampling methods recompute them on the compressed grid copy, which is only defined
when they are the model's own positions (anything else is refused with the fix named).
"""
from __future__ import annotations

import functools
import inspect
import time

import torch

from vltok.errors import IncompatibleError
from .base import PlaceholderAdapter, apply_grid, features_entry, set_instance_attr

MODALITIES = (("image", 1, "image_grid_thw"), ("video", 2, "video_grid_thw"))


class Qwen2VLAdapter(PlaceholderAdapter):
    family = "qwen2_vl"
    pixel_keys = ("pixel_values", "pixel_values_videos")
    runs_temporal = True   # temporal methods (evs, tmerge) reduce each video's temporal slices together
    stages = ("vision", "pre_llm", "in_llm", "decode")   # vision: merges of whole 2x2 units (adapters/qwen_tower.py)
    sites = ("llm", "decoder_layers", "placeholder_runs")   # (the pre-LLM reduction runs after the merger / projector)

    def __init__(self, model, method, handle):
        if method.vision is not None:   # the tower merge, described to the code below as a data-dependent selection
            from .qwen_tower import tower_method

            method = tower_method(model, method)
        super().__init__(model, method, handle)

    @staticmethod
    def vision_refusal(merger):
        from .qwen_tower import vision_refusal

        return vision_refusal(merger)

    def _merge(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def image_token_id(self):
        return self.model.config.image_token_id

    def _frames(self, grid_thw) -> list[tuple[int, int, int]]:
        m = self._merge()
        return [(int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist()]

    def _counts(self, grid_thw) -> tuple[list[int], list[int]]:
        native, new = [], []
        for t, h, w in self._frames(grid_thw):
            native.append(t * h * w)
            new.append(self._item_count(t, h, w))
        return native, new

    def _item_count(self, t: int, h: int, w: int) -> int:
        reducer = self.method.pre_llm
        if reducer.temporal:   # one budget per item over its t slices (vltok.methods.temporal)
            return reducer.video_count(t, h, w)
        return t * reducer.plan(h, w).count

    def _item_identity(self, t: int, h: int, w: int) -> bool:
        reducer = self.method.pre_llm
        if reducer.temporal:
            return reducer.video_count(t, h, w) == t * h * w
        return reducer.plan(h, w).identity

    def image_counts(self, call):
        return self._counts(call["image_grid_thw"]) if call.get("image_grid_thw") is not None else ([], [])

    def placeholder_runs(self, call):
        cfg = self.model.config
        runs = []
        for (kind, _, grid_key), token_id in zip(MODALITIES, (cfg.image_token_id, cfg.video_token_id)):
            if call.get(grid_key) is not None:
                runs.append((token_id, *self._counts(call[grid_key]), kind))
        return runs

    def _token_types(self, call) -> torch.Tensor:
        """The call's mm_token_type_ids; without them (the model needs them only for its own M-RoPE positions, so
        it runs without them when position_ids are given) the same codes read from input_ids (1 image, 2 video)."""
        types = call.get("mm_token_type_ids")
        if types is not None:
            return types
        ids, cfg = call["input_ids"], self.model.config
        return (ids == cfg.image_token_id).long() + 2 * (ids == cfg.video_token_id).long()

    def visual_layout(self, call):
        """In-LLM stage: one grid per image and per video frame (temporal slice), (h/m, w/m) each, in splice order.

        The decoder layers receive M-RoPE cos/sin already recomposed from the 3 position rows ([B, S, hd]) and 1-D
        (or no) text position ids, so the engine's gathers on the sequence axis keep every kept token's original
        (t, h, w) rotation; layer 0 keeps the full length, so rope_deltas and decoding are unchanged."""
        from vltok.inllm import VisualImage, split_runs

        cfg = self.model.config
        B = call["input_ids"].shape[0]
        per_sample = [[] for _ in range(B)]
        for (kind, _, grid_key), token_id in zip(MODALITIES, (cfg.image_token_id, cfg.video_token_id)):
            if call.get(grid_key) is None:
                continue
            frames = self._frames(call[grid_key])
            runs = split_runs(call["input_ids"], token_id, [t * h * w for t, h, w in frames], kind=kind)
            it = iter(frames)
            for b, row in enumerate(runs):
                for r in row:
                    t, h, w = next(it)
                    per_sample[b] += [VisualImage(f, (h, w)) for f in r.view(t, h * w)]
        return [sorted(imgs, key=lambda im: int(im.positions[0])) for imgs in per_sample]

    # -- feature reduction -----------------------------------------------------------------------------------
    def _reduce_item(self, f: torch.Tensor, t: int, h: int, w: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """f [t*h*w, D] -> ([t*count, D], kept raster indices per frame (selection methods only))."""
        reducer = self.method.pre_llm
        if reducer.temporal:
            if reducer.video_count(t, h, w) == t * h * w:
                return f, []
            idx, y = reducer.reduce_video(f.view(t, h, w, f.shape[-1]))
            return y, [idx[(idx // (h * w)) == s] - s * h * w for s in range(t)]
        y, plan, idx = apply_grid(reducer, f.view(t, h * w, f.shape[-1]), (h, w))   # (timed by the caller)
        if plan.identity:
            return f, []
        return y.reshape(-1, f.shape[-1]), [] if idx is None else list(idx)   # idx [t, k] ascending

    def _wrap_features(self, inner, kind: str, undo: list) -> None:
        if self.method.vision is not None:
            from .qwen_tower import wrap_tower_features

            return wrap_tower_features(self, inner, kind, undo)
        name = f"get_{kind}_features"
        orig = getattr(inner, name)
        sig = inspect.signature(orig)
        grid_kw = f"{kind}_grid_thw"

        @functools.wraps(orig)   # generate() pre-encodes through this, picking arguments by the signature's names
        def get_features(*args, **kwargs):
            bound, _, as_dict, early = features_entry(sig, inner.config, self._ahead, kind, args, kwargs)
            if early is not None:   # encoded ahead in prepare (data-dependent selection)
                return early
            out = orig(*args, return_dict=True, **kwargs)
            grid_thw = bound.get(grid_kw)
            t0 = time.perf_counter()
            feats, kept = [], []
            for f, (t, h, w) in zip(out.pooler_output, self._frames(grid_thw)):
                y, idx = self._reduce_item(f, t, h, w)
                feats.append(y)
                kept.append(idx)
                plan = self.method.pre_llm.plan(h, w)
                self.record.image(f.shape[0], y.shape[0], [(t, h, w)],
                                  [(y.shape[0],) if self.method.pre_llm.temporal else
                                   (t, *plan.grid) if plan.grid else (t, plan.count)])
            self._kept[kind] = kept
            self._check_probed(kind)
            out.pooler_output = tuple(feats)
            self.record.seconds(time.perf_counter() - t0)
            return out if as_dict else out.to_tuple()

        set_instance_attr(inner, name, get_features, undo)

    # -- M-RoPE ----------------------------------------------------------------------------------------------
    def _selection_positions(self, orig, input_ids, mm_token_type_ids, grids, attention_mask, kwargs):
        """Original 3-D positions of the kept tokens: expand each run to native length, compute, gather."""
        B, L = input_ids.shape
        am, rows, maps = self._native_columns(input_ids, mm_token_type_ids, grids, attention_mask)
        Ln = max(map(len, rows))
        n_types = torch.zeros(B, Ln, dtype=mm_token_type_ids.dtype, device=input_ids.device)
        n_mask = torch.zeros(B, Ln, dtype=torch.long, device=input_ids.device)
        for b, r in enumerate(rows):
            n_types[b, :len(r)] = torch.tensor(r, dtype=n_types.dtype)
            n_mask[b, :len(r)] = 1
        n_ids = n_types.long()
        pos_n, delta_n = orig(n_ids, mm_token_type_ids=n_types, image_grid_thw=grids[1], video_grid_thw=grids[2],
                              attention_mask=n_mask, **kwargs)
        pos = torch.zeros(3, B, L, dtype=pos_n.dtype, device=pos_n.device)
        delta = delta_n.clone()
        for b in range(B):
            idx = torch.tensor(maps[b], dtype=torch.long, device=pos_n.device)
            pos[:, b, am[b].to(pos_n.device)] = pos_n[:, b, idx]
            delta[b] = delta_n[b] + (len(rows[b]) - len(maps[b]))
        return pos, delta

    def _native_columns(self, input_ids, mm_token_type_ids, grids, attention_mask):
        """For a call whose visual runs were shrunk by a selection method: per sample, the token types of the
        native sequence (each run expanded back, real tokens only) and, per real token of the shrunk row, the
        index of the native real token it carries (a kept visual token: the one the method selected)."""
        reducer = self.method.pre_llm
        B, L = input_ids.shape
        am = attention_mask.bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
        am = am.to(input_ids.device)
        items = {code: iter(self._frames(grids[code])) if grids[code] is not None else iter(())
                 for _, code, _ in MODALITIES}
        n_seen = {code: 0 for _, code, _ in MODALITIES}
        rows, maps = [], []
        for b in range(B):
            types = mm_token_type_ids[b][am[b]].tolist()
            native_types, col_map, i = [], [], 0
            while i < len(types):
                code = types[i]
                if code == 0:
                    col_map.append(len(native_types))
                    native_types.append(0)
                    i += 1
                    continue
                try:
                    t, h, w = next(items[code])
                except StopIteration:
                    raise IncompatibleError("more visual runs in mm_token_type_ids than grids in *_grid_thw") from None
                plan = reducer.plan(h, w)
                kind = "image" if code == 1 else "video"
                j = n_seen[code]
                n_seen[code] += 1
                if self._item_identity(t, h, w):
                    keep_idx = torch.arange(t * h * w)
                else:
                    per_frame = self._probe_indices(kind, j, t, h, w, plan)
                    keep_idx = torch.cat([f.cpu() + s * h * w for s, f in enumerate(per_frame)])
                if i + keep_idx.numel() > len(types) or any(c != code for c in types[i:i + keep_idx.numel()]):
                    raise IncompatibleError(
                        f"a {kind} run in mm_token_type_ids does not have the reduced length {keep_idx.numel()}")
                start = len(native_types)
                native_types += [code] * (t * h * w)
                col_map += (keep_idx + start).tolist()
                i += keep_idx.numel()
            rows.append(native_types)
            maps.append(col_map)
        return am, rows, maps

    def _probe_indices(self, kind, j, t, h, w, plan) -> list[torch.Tensor]:
        """Kept raster indices per frame of item j. Selections made at reduction time are used when the features
        already ran in this call (forward); generate() computes positions before the vision tower, so they come from
        the plan (a selection that depends on (h, w) only names its indices there) and the reduction later checks
        that it chose the same indices."""
        recorded = self._kept.get(kind)
        if recorded is not None and j < len(recorded) and recorded[j]:
            return recorded[j]
        if plan.data_dependent:
            raise RuntimeError(f"vltok: the kept indices of {kind} {j} were not recorded before its positions were "
                               "needed (the features are encoded ahead in prepare); please report this")
        idx = [torch.tensor(plan.indices, dtype=torch.long)] * t
        self._probed.setdefault(kind, {})[j] = idx
        return idx

    def install(self, undo):
        inner = self.model.model
        self._kept, self._probed, self._ahead = {}, {}, {}
        if self.method.vision is not None:
            from .qwen_tower import install_tower

            install_tower(self, undo)
        for kind, _, _ in MODALITIES:
            self._wrap_features(inner, kind, undo)
        orig_rope = inner.get_rope_index
        reducer = self.method.pre_llm
        m = self._merge()

        def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None, **kwargs):
            grids = {1: image_grid_thw, 2: video_grid_thw}
            items = [f for g in grids.values() if g is not None for f in self._frames(g)]
            plans = [reducer.plan(h, w) for _, h, w in items]
            if all(self._item_identity(t, h, w) for t, h, w in items):
                return orig_rope(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                                 video_grid_thw=video_grid_thw, **kwargs)
            if all(p.grid is not None for p in plans):
                small = {}
                for code, g in grids.items():
                    if g is None:
                        small[code] = None
                        continue
                    rows = []
                    for t, h, w in self._frames(g):
                        r_h, r_w = reducer.plan(h, w).grid
                        rows.append([t, r_h * m, r_w * m])
                    small[code] = torch.tensor(rows, dtype=g.dtype, device=g.device)   # a compressed COPY
                return orig_rope(input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=small[1],
                                 video_grid_thw=small[2], **kwargs)
            attention_mask = kwargs.pop("attention_mask", None)
            return self._selection_positions(orig_rope, input_ids, mm_token_type_ids, grids, attention_mask, kwargs)

        set_instance_attr(inner, "get_rope_index", get_rope_index, undo)

    def _encode_ahead(self, call) -> None:
        """A data-dependent selection (merging after the merger) knows which tokens survive only from the features,
        but generate() and caller-supplied position_ids need the kept tokens' M-RoPE positions before the model runs
        its vision tower. So the (wrapped) feature methods run here, once: they record the kept indices, and the
        model's own call with the same pixel tensor in this forward gets the same output back without re-encoding."""
        inner = self.model.model
        for kind, _, grid_key in MODALITIES:
            pixels = call.get("pixel_values" if kind == "image" else "pixel_values_videos")
            if pixels is not None and call.get(grid_key) is not None:
                out = getattr(inner, f"get_{kind}_features")(pixels, call[grid_key], return_dict=True)
                self._ahead[kind] = (pixels, out)

    def _rewrite(self, call, default_side, ahead: bool, t0=None):
        """The base placeholder rewrite; then, for a data-dependent selection whose runs were shrunk, the call's
        features encoded ahead (their kept indices are needed for positions before the forward)."""
        new, rw = super().prepare(call, default_side, t0)
        if ahead and rw is not None:
            self._encode_ahead(call)
        return new, rw

    def prepare(self, call, default_side, t0=None):
        ahead = not self._in_generate and self._data_dependent(call)
        if not self._in_generate:
            self._kept, self._probed, self._ahead = {}, {}, {}
        pos = call.get("position_ids")
        if not (isinstance(pos, torch.Tensor) and pos.dim() == 3) or not self.has_pixels(call):
            return self._rewrite(call, default_side, ahead, t0)
        if pos.shape[0] not in (3, 4):
            raise IncompatibleError(f"3-D position_ids must be [3, B, S] (t, h, w) or [4, B, S] (text row first); "
                                    f"got {list(pos.shape)}")
        # the caller's own M-RoPE positions ([3, B, S], or [4, B, S] with the text row first): the base rewrite
        # would rebuild them as 1-D, so take them out and shrink them here, consistently with the placeholders
        grids = [g for g in (call.get("image_grid_thw"), call.get("video_grid_thw")) if g is not None]
        plans = [self.method.pre_llm.plan(h, w) for g in grids for _, h, w in self._frames(g)] \
            if self.method.pre_llm is not None else []
        selection = any(p.grid is None for p in plans)
        if plans and not selection and not all(p.identity for p in plans) and not self._already_reduced(call):
            self._check_own_positions(pos, call)   # before anything runs: nothing half-applied
        new, rw = self._rewrite({k: v for k, v in call.items() if k != "position_ids"}, default_side, ahead, t0)
        new["position_ids"] = pos if rw is None else self._shrink_mrope(pos, call, new, selection)
        return new, rw

    def _data_dependent(self, call) -> bool:
        """Whether the reducer's kept tokens depend on the features for a grid of this call (its plans say)."""
        reducer = self.method.pre_llm
        if reducer is None:
            return False
        grids = [g for g in (call.get("image_grid_thw"), call.get("video_grid_thw")) if g is not None]
        return any(reducer.plan(h, w).data_dependent for g in grids for _, h, w in self._frames(g))

    def _already_reduced(self, call) -> bool:
        """True when every placeholder run already has its reduced length: the inner forward of generate(), whose
        positions (transformers <= 5.17 computes them in generate and passes them in) came from the wrapped
        ``get_rope_index`` on these reduced inputs."""
        ids = call["input_ids"]
        return all(int((ids == tok).sum()) == sum(new) != sum(native)
                   for tok, native, new, *_ in self.placeholder_runs(call))

    def _check_own_positions(self, pos, call) -> None:
        """Resampling methods recompute positions on the compressed grid copy; that stands in for the caller's
        positions only when they are the model's own for these inputs."""
        inner, ids, am = self.model.model, call["input_ids"], call.get("attention_mask")
        real = (am if am is not None else torch.ones_like(ids)).bool().to(pos.device)
        own, _ = type(inner).get_rope_index(inner, ids, mm_token_type_ids=self._token_types(call),
                                            image_grid_thw=call.get("image_grid_thw"),
                                            video_grid_thw=call.get("video_grid_thw"), attention_mask=am)
        own = own.to(pos.device)
        if pos.shape[0] == 4:
            own = torch.cat([(real.long().cumsum(-1) - 1)[None], own])
        if not torch.equal(pos[:, real], own[:, real]):
            raise IncompatibleError(
                f"{self.method.name} resamples each grid, so caller-supplied M-RoPE position_ids have no counterpart "
                "on the compressed grid (vltok computes compact positions of the new grid, which is defined only for "
                "the model's own positions); pass no position_ids, or use a selection method (e.g. 'random'), whose "
                "kept tokens keep the positions you pass")

    def _shrink_mrope(self, pos, call, new, selection: bool) -> torch.Tensor:
        """Selection methods: each kept token keeps the caller's positions of the token it was selected from.
        Resampling methods (positions checked to be the model's own): recomputed on the compressed grid copy."""
        am, ids = call.get("attention_mask"), call["input_ids"]
        if selection:
            real = (am if am is not None else torch.ones_like(ids)).bool().to(pos.device)
            am_new, rows, maps = self._native_columns(new["input_ids"], self._token_types(new),
                                                      {1: call.get("image_grid_thw"), 2: call.get("video_grid_thw")},
                                                      new.get("attention_mask"))
            out = torch.ones(pos.shape[0], *new["input_ids"].shape, dtype=pos.dtype, device=pos.device)
            for b in range(ids.shape[0]):
                cols = real[b].nonzero().flatten()   # the caller's real columns = the native tokens
                out[:, b, am_new[b].to(pos.device)] = pos[:, b, cols[torch.tensor(maps[b], device=pos.device)]]
            return out
        small, _ = self.model.model.get_rope_index(new["input_ids"], mm_token_type_ids=self._token_types(new),
                                        image_grid_thw=call.get("image_grid_thw"),
                                        video_grid_thw=call.get("video_grid_thw"),
                                        attention_mask=new.get("attention_mask"))
        if pos.shape[0] == 4:
            am_new = new.get("attention_mask", torch.ones_like(new["input_ids"]))
            text = (am_new.long().cumsum(-1) - 1).masked_fill(am_new == 0, 1)
            small = torch.cat([text[None].to(small.device), small])
        return small.to(pos.dtype)

    def _check_probed(self, kind: str) -> None:
        """Selections that positions were computed from (generate) must be the ones the reduction made."""
        got = self._kept.get(kind, [])
        for j, idx in self._probed.get(kind, {}).items():
            if j < len(got) and got[j] and any(not torch.equal(a.cpu(), b.cpu()) for a, b in zip(idx, got[j])):
                raise IncompatibleError(
                    f"method {self.method.name!r} selects data-dependent tokens before the LLM; Qwen2-VL's "
                    "generate() (and vltok, for caller-supplied position_ids) computes M-RoPE positions before the "
                    "vision tower runs, so vltok cannot give the kept tokens their original positions there; use "
                    "model(...) without position_ids, or a resampling method")


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Same placeholders, grids and M-RoPE rules; the window-attention permutation is undone inside the ViT, after
    the merger, so the features reduced here are raster-ordered like Qwen2-VL's."""

    family = "qwen2_5_vl"
