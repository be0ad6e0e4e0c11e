"""LLaVA-1.5 (LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration).

Where the grids are:
* LLaVA-1.5: the projector's input, [n_images, prefix + h*w, C_vision], h = H/patch, w = W/patch. The reduction
  runs in a forward pre-hook on ``multi_modal_projector`` (before the projector, as Fourier-VLM does), so the
  projector also runs on fewer tokens.
* LLaVA-NeXT: after ``pack_image_features``: per image, the 24x24 base tile followed by the unpadded high-res
  map of h_u rows x (w_u + 1) columns, the last column being ``image_newline``. The base tile and the map (without
  its newline column) are reduced as two grids; one newline is re-appended per output row (selection methods keep
  every row's newline). This acts after the projector, on one global grid per image.
"""
from __future__ import annotations

import functools
import inspect
import time

import torch

from vltok import compat
from vltok.errors import IncompatibleError
from vltok.stages import VisionFacts

from .base import PlaceholderAdapter, _bind, apply_grid, infer_grid, set_instance_attr


def _n_special_tokens(vision_config) -> int:
    """Non-patch tokens the vision tower emits first: CLS (CLIP, DINOv2) and registers; SigLIP has none."""
    mt = getattr(vision_config, "model_type", "")
    cls = 0 if "siglip" in mt else 1
    return cls + int(getattr(vision_config, "num_register_tokens", 0) or 0)


def _prefix(model) -> int:
    strategy = model.config.vision_feature_select_strategy
    return _n_special_tokens(model.config.vision_config) - (1 if strategy == "default" else 0)


def vision_encoder_name(config) -> str:
    """The name a learned vision-side module records (checkpoint folder of the tower, else its model_type)."""
    vc = config.vision_config
    return getattr(vc, "_name_or_path", "") or vc.model_type


def used_vision_layers(model) -> int:
    """How many encoder layers of a LLaVA-1.5 tower feed the projector (one vision_feature_layer)."""
    from .hf_vit import encoder_layers

    vfl = model.config.vision_feature_layer
    if not isinstance(vfl, int):
        raise IncompatibleError(f"vision-stage methods need one vision_feature_layer; this checkpoint "
                                f"concatenates layers {vfl}; use a pre-LLM method (e.g. 'pool') instead")
    n_layers = len(encoder_layers(model.model.vision_tower))
    used = n_layers + 1 + vfl if vfl < 0 else vfl
    if not 1 <= used <= n_layers:
        raise IncompatibleError(f"vision_feature_layer={vfl} selects the embeddings; no layer to merge in")
    return used


def llava_next_unpadded(config, image_size) -> tuple[int, int]:
    """(rows, cols) of LLaVA-NeXT's unpadded high-resolution feature map for an image of size (H, W)."""
    get_anyres_image_grid_shape, unpad_image = compat.anyres_helpers("llava_next")

    vc = config.vision_config
    t = vc.image_size // vc.patch_size
    nph, npw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vc.image_size)
    shape = unpad_image(torch.empty(1, nph * t, npw * t), image_size).shape
    return int(shape[1]), int(shape[2])


class LlavaAdapter(PlaceholderAdapter):
    family = "llava"
    stages = ("vision", "pre_llm", "in_llm", "decode")
    sites = ("vision_layers", "projector", "llm", "decoder_layers", "placeholder_runs")
    side_inputs = ("cls_attention", "text_embeds")
    gives_saliency = True
    original_positions = True   # positions="original" of pre-LLM selection reducers (_install_original_positions)

    def image_token_id(self):
        return self.model.config.image_token_id

    # -- sites -----------------------------------------------------------------------------------------------
    def vision_layers(self):
        from .hf_vit import encoder_layers

        return encoder_layers(self.model.model.vision_tower)

    def projector(self):
        """The projector: its input is the (reduced) grid (the pre-LLM reduction is a pre-hook on it)."""
        return self.model.model.multi_modal_projector

    def vision_facts(self) -> VisionFacts:
        cfg = self.model.config
        vc = cfg.vision_config
        try:
            used = used_vision_layers(self.model)
        except IncompatibleError:
            used = None
        side = vc.image_size // vc.patch_size
        return VisionFacts(encoder=vision_encoder_name(cfg), model_type=vc.model_type, width=vc.hidden_size,
                           n_special=_n_special_tokens(vc), prefix=_prefix(self.model), grid=(side, side),
                           used_layers=used, feature_layer=cfg.vision_feature_layer,
                           projector_act=getattr(cfg, "projector_hidden_act", "gelu"))

    def _patch(self):
        vc = self.model.config.vision_config
        return vc.patch_size

    def visual_layout(self, call):
        """In-LLM stage: per sample, one h x w grid per image (CLS kept by strategy "full" is not part of it)."""
        from vltok.inllm import VisualImage, split_runs

        pv, p, pre = call["pixel_values"], self._patch(), _prefix(self.model)
        h, w = pv.shape[-2] // p, pv.shape[-1] // p
        n = pv.shape[0] if pv.dim() == 4 else pv.shape[0] * pv.shape[1]
        if self.method.vision is not None:   # merged in the encoder: the survivors (raster order), no grid
            count = h * w - sum(self._vision_schedule(h * w))
            runs = split_runs(call["input_ids"], self.image_token_id(), [pre + count] * n)
            return [[VisualImage(r[pre:], None, image=j, extra=pre, native=h * w) for j, r in enumerate(row)]
                    for row in runs]
        runs = split_runs(call["input_ids"], self.image_token_id(), [pre + h * w] * n)
        return [[VisualImage(r[pre:], (h, w), image=j, extra=pre) for j, r in enumerate(row)] for row in runs]

    def install_saliency(self, engine, undo):
        """CLS attention of the vision tower's LAST layer (mean over heads, fp32), from hooks on its q/k projections;
        that layer's output is otherwise unused by LLaVA (vision_feature_layer=-2), so only two rows are extra."""
        from vltok.inllm import attention_rows

        from .hf_vit import attention_parts

        vc = self.model.config.vision_config
        n_special = _n_special_tokens(vc)
        if n_special == 0:   # SigLIP: no CLS token, so no CLS attention
            return False
        tower = self.model.model.vision_tower
        enc = getattr(tower, "vision_model", tower).encoder
        last = (getattr(enc, "layers", None) or enc.layer)[-1]
        attn = getattr(last, "self_attn", None) or last.attention
        q_lin, k_lin, _, _, _, hd, scale = attention_parts(attn)
        cap = {}
        hooks = [q_lin.register_forward_hook(lambda m, a, o: cap.__setitem__("q", o)),
                 k_lin.register_forward_hook(lambda m, a, o: cap.__setitem__("k", o))]

        def done(module, args, out):
            q, k = cap.pop("q", None), cap.pop("k", None)
            if q is None or k is None:
                return
            T = k.shape[1]
            ok = torch.ones(1, T, dtype=torch.bool, device=k.device)
            run = getattr(self, "_vision_run", None)   # a vision stage merged tokens: the proportional bias
            size = run.size if run is not None and run.size is not None and self.method.vision.prop_attn else None
            engine.set_saliency([attention_rows(q[i, :1].view(1, -1, hd), k[i].view(T, -1, hd), ok, scale,
                                                None if size is None else size[i, :, 0].log())[0, n_special:]
                                 for i in range(k.shape[0])])

        hooks.append(tower.register_forward_hook(done))
        undo.extend(h.remove for h in hooks)
        return True

    def image_counts(self, call):
        if call.get("image_sizes") is not None:
            raise IncompatibleError(
                "this LLaVA checkpoint takes image_sizes (a Pixtral-style vision tower with variable grids); vltok "
                "supports LLaVA-1.5-style fixed grids and LLaVA-NeXT"
            )
        pv = call["pixel_values"]
        p = self._patch()
        h, w = pv.shape[-2] // p, pv.shape[-1] // p
        self._grid = (h, w)
        if self.method.vision is not None:
            if self.method.vision.decide is not None:   # data-dependent count: probe the encoder up to its merge
                self._probe_vision(pv, h * w)
            count = h * w - sum(self._vision_schedule(h * w))
        else:
            count = self.method.pre_llm.plan(h, w).count
        pre = _prefix(self.model)
        n = pv.shape[0] if pv.dim() == 4 else pv.shape[0] * pv.shape[1]
        return [pre + h * w] * n, [pre + count] * n

    # -- vision-encoder stage (ToMe, CrossGET): merges inside the CLIP / SigLIP / DINOv2 tower's layers ----------
    def _probe_vision(self, pixel_values, n_patches: int) -> None:
        """A merge count that depends on the image (MustDrop's threshold): run the tower up to the merge layer
        now, so the placeholder runs can shrink before the model runs; the next tower call uses this count."""
        from vltok.vision import probe_vision

        t0 = time.perf_counter()
        with torch.no_grad():
            r = probe_vision(self._vision_run, lambda: self.model.model.vision_tower(pixel_values, return_dict=True))
        layer = self.method.vision.merge_layer
        self._probed = (n_patches, [0] * layer + [r])
        self.record.seconds(time.perf_counter() - t0)

    def _vision_schedule(self, n_patches: int) -> list[int] | None:
        """r per layer for the layers whose output reaches the projector (vision_feature_layer); None when the
        count depends on the image and no probe ran (the encoder then decides at the merge layer)."""
        probed = getattr(self, "_probed", None)
        if probed is not None and probed[0] == n_patches:
            return probed[1]
        return self.method.vision.schedule(n_patches, used_vision_layers(self.model))

    def _install_vision(self, undo):
        from vltok.vision import install_vision

        from .hf_vit import encoder_layers, split_layer

        tower = self.model.model.vision_tower
        vc = self.model.config.vision_config
        n_special, prefix = _n_special_tokens(vc), _prefix(self.model)
        n_patches = (vc.image_size // vc.patch_size) ** 2

        def on_done(run):
            self._probed = None   # a probed count serves one encoder call
            n_in = prefix + run.counts[0] - n_special
            n_out = prefix + run.counts[-1] - n_special   # (counts exclude a trailing cross token)
            for _ in range(run.size.shape[0] if run.size is not None else 0):
                self.record.image(n_in, n_out, [getattr(self, "_grid", (n_in - prefix,))], [(n_out - prefix,)])
            self.record.stats["vision_tokens_per_layer"] = list(run.counts)
            self.record.seconds(run.seconds)
            self._record_vision_kept(run, n_special)

        merger = self.method.vision
        trailing = merger.trailing   # (its learned tokens were checked and placed by merger.install: install_extras)
        self._vision_run = install_vision(encoder_layers(tower), split_layer, merger,
                                          self._vision_schedule, n_special, undo,
                                          attn_impl=getattr(vc, "_attn_implementation", None), on_done=on_done,
                                          nominal=n_patches, trailing_ok=True,
                                          track=lambda: self.record.record_kept)
        if trailing and any(self._vision_schedule(n_patches)):   # keep=1.0: nothing installed, model unchanged
            run = self._vision_run

            def strip(module, args, kwargs):   # the cross token is last: drop it before the projector
                t, run.appended = run.appended, 0
                if not t:
                    return None
                if args:
                    return (args[0][:, :-t], *args[1:]), kwargs
                return args, {**kwargs, "image_features": kwargs["image_features"][:, :-t]}

            h = self.model.model.multi_modal_projector.register_forward_pre_hook(strip, with_kwargs=True)
            undo.append(h.remove)

    def _record_vision_kept(self, run, n_special: int) -> None:
        """handle.kept_patches() after a vision-stage merge: each output token's first patch (run.pos) and, when
        tracked, every patch's group; patch indices exclude CLS / registers (and a trailing cross token)."""
        grid = getattr(self, "_grid", None)
        n_in = run.counts[0] - n_special
        h, w = grid if grid and grid[0] * grid[1] == n_in else (1, n_in)
        if run.pos is None:   # nothing merged in this call
            self.record.kept("none", (h, w), run.batch)
            return
        B = run.pos.shape[0]
        end = run.pos.shape[1] - run.appended
        kept = run.pos[:, n_special:end] - n_special
        groups = run.groups()
        if groups is not None:
            groups = groups[:, n_special:n_special + h * w] - n_special
        self.record.kept("merge", (h, w), B, kept, groups)

    def _install_cls_attention(self, undo) -> None:
        """Side input ``cls_attention`` (vltok.stages.SIDE_INPUTS): the CLS query's attention row over the patch
        tokens at the encoder layer whose output feeds the projector (mean over heads, softmax over all keys, CLS /
        register columns dropped), from hooks on that layer's q / k projections; kept for the projector pre-hook."""
        from .hf_vit import attention_parts

        facts = self.vision_facts()
        if facts.n_special == 0 or facts.used_layers is None:
            raise IncompatibleError(f"{self.method.name} needs the CLS attention of the vision tower, which this "
                                    f"{facts.model_type} tower (no CLS token, or several feature layers) has not")
        layer = self.vision_layers()[facts.used_layers - 1]
        attn = getattr(layer, "self_attn", None) or layer.attention
        q_lin, k_lin, _, _, _, hd, scale = attention_parts(attn)
        cap = {}

        def keep(name):
            return lambda m, a, o: cap.__setitem__(name, o)

        def done(module, args, out):
            q, k = cap.pop("q", None), cap.pop("k", None)
            if q is not None and k is not None:
                self._side["cls_attention"] = self._cls_row(q, k, hd, scale, facts.n_special)

        self._side = {}
        hooks = [q_lin.register_forward_hook(keep("q")), k_lin.register_forward_hook(keep("k")),
                 layer.register_forward_hook(done)]
        undo.extend(h.remove for h in hooks)

    @staticmethod
    def _cls_row(q, k, hd: int, scale: float, n_special: int) -> torch.Tensor:
        """q, k [B, T, H*hd] -> [B, T - n_special] fp32: the CLS query's softmax row over all keys, mean over heads,
        the special columns dropped."""
        from vltok.inllm import attention_rows_batched

        B, T = k.shape[:2]
        rows = attention_rows_batched(q[:, :1].reshape(B, 1, -1, hd), k.reshape(B, T, -1, hd), None, scale)
        return rows[:, 0, n_special:]

    def install(self, undo):
        if self.method.vision is not None:
            return self._install_vision(undo)
        prefix = _prefix(self.model)
        reducer = self.method.pre_llm
        self._install_side_inputs(reducer, undo)
        if reducer.after_projector and reducer.projector is None:
            # the reducer works on the features the LLM receives: reduce the projector's output (a per-token MLP,
            # so a selection gives the same rows as projecting the kept tokens)
            def post_hook(module, args, output):
                y = self._reduce_images(output, prefix)
                return None if y is output else y

            h = self.model.model.multi_modal_projector.register_forward_hook(post_hook)
            undo.append(h.remove)
            return

        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs["image_features"]
            y = self._reduce_images(x, prefix)
            if y is x:
                return None
            if args:
                return (y, *args[1:]), kwargs
            return args, {**kwargs, "image_features": y}

        h = self.model.model.multi_modal_projector.register_forward_pre_hook(pre_hook, with_kwargs=True)
        undo.append(h.remove)

    # -- side inputs of pre-LLM reducers (cls_attention, text_embeds) and original position ids ---------------------
    def _install_side_inputs(self, reducer, undo):
        """Hooks for the side inputs ``reducer`` needs (refused at patch time when this model has none) or wants
        (given where this adapter can), and the position-id hook of ``positions="original"``."""
        want = [n for n in tuple(reducer.needs) + tuple(reducer.wants) if n in self.side_inputs]
        self._side, self._side_text = {}, None
        if "cls_attention" in want:
            self._install_cls_attention(undo)
        self._wants_text = "text_embeds" in want
        if reducer.positions == "original" and self.original_positions:
            self._install_original_positions(undo)

    def _side_inputs(self, n_images: int) -> dict:
        """The side inputs of one reduction of ``n_images`` images: what the reducer needs or wants, where given."""
        side = {}
        if "cls_attention" in self._side:
            side["cls_attention"] = self._side.pop("cls_attention")
        if getattr(self, "_wants_text", False) and self._side_text is not None and len(self._side_text) == n_images:
            side["text_embeds"] = self._side_text
        return side

    def prepare(self, call, default_side, t0=None):
        orig = (call.get("input_ids"), call.get("attention_mask"), call.get("position_ids"))
        call, rw = super().prepare(call, default_side, t0)
        self._call_side = default_side
        if getattr(self, "_wants_text", False) and self.has_pixels(call):
            t1 = time.perf_counter()
            self._side_text = self._text_embeds(call)
            self.record.seconds(time.perf_counter() - t1)
        if getattr(self, "_orig_positions", None) is not None:
            if rw is not None and self.has_pixels(call):
                self._orig_positions = self._position_map(orig, rw, call)
            elif not self._in_generate:   # an unchanged call (nothing rewritten, or no image): its own positions
                self._orig_positions = {}
        return call, rw

    def _text_embeds(self, call) -> list | None:
        """Per image, the LLM input embeddings of its sample's real non-placeholder tokens [T, C_llm] (from
        input_ids through the embedding table, or the caller's inputs_embeds rows)."""
        ids, emb = call.get("input_ids"), call.get("inputs_embeds")
        am = call.get("attention_mask")
        if ids is None and emb is None:
            return None
        find = ids if ids is not None else self._placeholder_ids(emb)
        real = torch.ones_like(find, dtype=torch.bool) if am is None or am.dim() != 2 else am.bool().to(find.device)
        is_img = find == self.image_token_id()
        pv = call["pixel_values"]
        n_images = pv.shape[0] if pv.dim() == 4 else pv.shape[0] * pv.shape[1]
        per_sample = is_img.sum(1).tolist()
        total = sum(per_sample)
        if not total or total % n_images:
            return None
        per_image = total // n_images
        table = self.model.get_input_embeddings()
        out = []
        with torch.no_grad():
            for b in range(find.shape[0]):
                keep = real[b] & ~is_img[b]
                t = table(ids[b][keep].to(table.weight.device)) if ids is not None else emb[b][keep.to(emb.device)]
                out += [t] * (per_sample[b] // per_image)
        return out if len(out) == n_images else None

    # positions="original": the kept tokens' position ids are those the full grid gave them
    def _install_original_positions(self, undo):
        """A forward pre-hook on the LLM: at prefill, position_ids = each column's position in the caller's
        full-length call (kept image tokens: their raster column in the full grid); at decode steps of generate(),
        the same shift continues (generate counts positions from the shortened prompt)."""
        lm = self.language_model()
        self._orig_positions = {}

        def lm_pre_hook(module, args, kwargs):
            st = self._orig_positions
            if not st:
                return None
            past = compat.get_cache(kwargs)
            emb = kwargs.get("inputs_embeds")
            if emb is None:
                return None
            S = emb.shape[1]
            filled = past is not None and past.get_seq_length() > 0
            pid = kwargs.get("position_ids")
            if not filled:
                if "idx" not in st:
                    return None
                new = self._original_position_ids(st, S, emb.device)
                given = pid if pid is not None else torch.arange(S, device=emb.device).expand(emb.shape[0], -1)
                st["shift"] = new[:, -1:] - given[:, -1:].to(new.device)
                return args, {**kwargs, "position_ids": new}
            if not self._in_generate or "shift" not in st:
                return None
            if pid is None:
                start = past.get_seq_length()
                pid = torch.arange(start, start + S, device=emb.device).expand(emb.shape[0], -1)
            return args, {**kwargs, "position_ids": pid + st["shift"].to(pid.device)}

        h = lm.register_forward_pre_hook(lm_pre_hook, with_kwargs=True)
        undo.append(h.remove)
        undo.append(lambda: self.__dict__.update(_orig_positions=None))

    def _position_map(self, orig, rw, call) -> dict:
        """What the LLM pre-hook needs to give each column of the shortened call its original position."""
        ids0, am0, pid0 = orig
        B, S0 = rw.kept_positions.shape[0], rw.orig_len
        dev = rw.kept_positions.device
        if pid0 is not None:
            full = pid0.to(dev)
        elif getattr(self, "_call_side", "right") == "left" and am0 is not None and am0.dim() == 2:
            full = (am0.long().cumsum(-1) - 1).masked_fill(am0 == 0, 0).to(dev)   # what generate() would pass
        else:
            full = torch.arange(S0, device=dev).expand(B, -1)
        ids = rw.tensors["input_ids"]
        return {"full": full, "kept": rw.kept_positions, "img": (ids == self.image_token_id()).to(dev),
                "prefix": _prefix(self.model)}

    def _original_position_ids(self, st, S, device) -> torch.Tensor:
        """[B, S] position ids of the shortened call's columns in the caller's full call."""
        kept, img, full, idx, pre = st["kept"], st["img"], st["full"], st["idx"], st["prefix"]
        col = kept.clone()
        cols = img.nonzero()                                   # (row, column) of every kept placeholder, in order
        k = idx.shape[1] + pre
        if cols.shape[0] != idx.shape[0] * k:
            raise IncompatibleError("positions='original': the image placeholders do not match the reduced images")
        run_start = kept[cols[::k, 0], cols[::k, 1]]           # the caller's column of each image's first placeholder
        offs = torch.cat([torch.arange(pre, device=idx.device).expand(idx.shape[0], -1), pre + idx], 1)
        col[cols[:, 0], cols[:, 1]] = (run_start[:, None].to(idx.device) + offs).flatten().to(col.device)
        pos = full.gather(1, col.clamp(min=0))
        pos = torch.where(col >= 0, pos, torch.ones_like(pos))   # added pads (masked out)
        return pos[:, -S:].to(device)

    def _reduce_images(self, x, prefix: int):
        """The projector's input [n_images, prefix + h*w, C] -> each image's grid reduced (x itself if unchanged)."""
        n_tok = x.shape[1]
        grid = getattr(self, "_grid", None)
        h, w = grid if grid and grid[0] * grid[1] == n_tok - prefix else infer_grid(n_tok, prefix)
        reducer = self.method.pre_llm
        side = self._side_inputs(x.shape[0])
        missing = [n for n in reducer.needs if n not in side and n != "text_embeds"]   # (text: the reducer says)
        if missing:
            raise IncompatibleError(f"{self.method.name} needs {', '.join(missing)} from the vision tower, which did "
                                    "not run in this call (pass pixel_values, not precomputed image features)")
        y, plan, idx = apply_grid(reducer, x, (h, w), self.record, prefix, side=side, kept=True)
        if idx is not None and getattr(self, "_orig_positions", None):   # positions="original": the map waits
            self._orig_positions["idx"] = idx
        out = [(h, w)] if plan.identity else [plan.grid or (plan.count,)]
        for _ in range(x.shape[0]):
            self.record.image(n_tok, y.shape[1], [(h, w)], out)
        return y


class LlavaNextAdapter(PlaceholderAdapter):
    family = "llava_next"
    stages = ("pre_llm", "in_llm", "decode")

    def image_token_id(self):
        return self.model.config.image_token_id

    def _tile(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def _unpadded(self, image_size) -> tuple[int, int]:
        return llava_next_unpadded(self.model.config, image_size)

    def visual_layout(self, call):
        """In-LLM stage: per image two grids, the base tile and the unpadded map; the map's image_newline
        column is not part of the grid, so newlines are never pruned."""
        from vltok.inllm import VisualImage, split_runs

        t = self._tile()
        sizes = call["image_sizes"]
        shapes = [self._unpadded(s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
        runs = split_runs(call["input_ids"], self.image_token_id(), [t * t + h * (w + 1) for h, w in shapes])
        it = iter(shapes)
        out = []
        for row in runs:
            imgs = []
            for j, r in enumerate(row):
                h_u, w_u = next(it)
                m = r[t * t:].view(h_u, w_u + 1)[:, :w_u].reshape(-1)
                imgs += [VisualImage(r[:t * t], (t, t), image=j, extra=h_u), VisualImage(m, (h_u, w_u), image=j)]
            out.append(imgs)
        return out

    def _map_count(self, plan) -> int:
        return plan.grid[0] * (plan.grid[1] + 1) if plan.grid is not None else plan.count + plan.h

    def image_counts(self, call):
        sizes = call.get("image_sizes")
        if sizes is None:
            raise IncompatibleError("LLaVA-NeXT needs image_sizes with pixel_values (the processor provides it)")
        t, pre = self._tile(), _prefix(self.model)
        if pre:
            raise IncompatibleError("LLaVA-NeXT with CLS tokens in the tile features is not supported by vltok")
        reducer = self.method.pre_llm
        base = reducer.plan(t, t)
        native, new = [], []
        for size in sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes:
            h_u, w_u = self._unpadded(size)
            native.append(t * t + h_u * (w_u + 1))
            new.append(base.count + self._map_count(reducer.plan(h_u, w_u)))
        return native, new

    def install(self, undo):
        inner = self.model.model
        orig_pack = inner.pack_image_features
        reducer = self.method.pre_llm
        t = self._tile()

        def reduce_map(m, h_u, w_u):
            """m [h_u*(w_u+1), D] with a newline column -> reduced map with one newline per row."""
            d = m.shape[-1]
            grid = m.view(h_u, w_u + 1, d)
            newline = grid[0, -1]
            x = grid[:, :w_u].reshape(1, h_u * w_u, d)
            y, plan, idx = apply_grid(reducer, x, (h_u, w_u), self.record)
            if plan.identity:
                return m, plan
            if plan.grid is not None:
                r_h, r_w = plan.grid
                nl = newline.expand(r_h, 1, d)
                return torch.cat([y.view(r_h, r_w, d), nl], dim=1).reshape(-1, d), plan
            idx, tokens = idx[0], y[0]
            keys = torch.cat([(idx // w_u) * (w_u + 1) + idx % w_u,
                              torch.arange(h_u, device=idx.device) * (w_u + 1) + w_u])
            seq = torch.cat([tokens, newline.expand(h_u, d)])
            return seq.index_select(0, keys.argsort(stable=True)), plan

        sig = inspect.signature(orig_pack)

        @functools.wraps(orig_pack)   # any signature: LLaVA-OneVision's pack step has no select strategy
        def pack_image_features(*args, **kwargs):
            feats, lens = orig_pack(*args, **kwargs)
            bound = _bind(sig, args, kwargs)
            image_sizes, image_newline = bound["image_sizes"], bound.get("image_newline")
            if image_newline is None:
                raise IncompatibleError("vltok's LLaVA-NeXT adapter expects image_newline tokens (spatial_unpad)")
            out = []
            base_plan = reducer.plan(t, t)
            for f, size in zip(feats, image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else image_sizes):
                h_u, w_u = self._unpadded(size)
                if f.shape[0] != t * t + h_u * (w_u + 1):
                    raise IncompatibleError(
                        f"packed LLaVA-NeXT features have {f.shape[0]} tokens, expected {t * t + h_u * (w_u + 1)} "
                        f"(base {t}x{t} + {h_u}x({w_u}+1)); this checkpoint's packing is not supported")
                base = apply_grid(reducer, f[None, : t * t], (t, t), self.record)[0][0]
                m, map_plan = reduce_map(f[t * t:], h_u, w_u)
                y = torch.cat([base, m])
                out.append(y)
                self.record.image(f.shape[0], y.shape[0], [(t, t), (h_u, w_u)],
                                  [base_plan.grid or (base_plan.count,), map_plan.grid or (map_plan.count,)])
            return out, torch.tensor([o.shape[0] for o in out], dtype=lens.dtype, device=lens.device)

        set_instance_attr(inner, "pack_image_features", pack_image_features, undo)
