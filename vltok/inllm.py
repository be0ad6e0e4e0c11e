"""The in-LLM stage engine: prune visual tokens before chosen decoder layers at prefill; decode on the pruned KV.

It knows neither a method nor a model family:

* the **adapter** gives the decoder layers (``decoder_layers()``), the attention module of a layer
  (``attention(layer)``), the rotary function (``apply_rope``) and, per call, where each sample's visual tokens
  sit (``visual_layout(call)`` -> per sample a list of :class:`VisualImage`);
* the **method** (``Method.in_llm``) gives a plan per call (``plan(n_layers, [(n, grid) per image]) -> list[Cut]``)
  and picks the survivors of each image at each cut (``select(cut, view, scores [R, n_cur]) -> kept indices into
  view.raster``, or a :class:`Merge`: kept indices plus replacement hidden rows for them); optionally
  ``Method.decode`` rewrites earlier layers' caches after prefill (``evict_from(cuts) -> first layer``).

Mechanism (docs/architecture.md, "In-LLM stage"): forward pre-hooks (with kwargs) on every decoder layer gather the
hidden states (at a cut) and, from the loop-level tensors HF passes to every layer, the position ids, the
``position_embeddings`` (cos, sin; sequence on axis -2, Qwen's [3, B, S, hd] included), the 4-D mask (rows and
columns) or the 2-D FA2 mask. Kept tokens keep their ORIGINAL positions. Scores come from forward hooks on the
previous layer's ``q_proj`` / ``k_proj`` (a few rows, fp32), never from ``output_attentions``. Layers after a cut
store shorter K/V in the ``DynamicCache``; each decode step's 4-D mask is gathered per layer on the key axis with
``cat(kept prefill columns of that layer, new columns)``.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from .compat import cache_classes, get_cache
from .errors import IncompatibleError
from .kernels.select import cut_columns, last_row_scores
from .stages import BatchView, Cut, DecodePolicy, ImageView, InLLMPolicy, Merge  # noqa: F401  (re-exported)

_STATE = "_vltok_inllm"   # attribute on the DynamicCache: per-layer kept columns for decode steps
_MAX_GRAPHS = 32          # cut graphs (and shapes seen once) kept per patched model; each holds its input buffers


@dataclass
class VisualImage:
    """One grid of visual tokens in one sample: ``positions`` [n] are sequence columns (in the LLM input) in raster
    order of ``grid`` (h, w) (h*w == n), or ``grid=None`` for tokens without a layout. ``protected`` lists raster
    indices that are never dropped. ``saliency`` is filled by the adapter while the vision tower runs when the
    method asks for it (``in_llm.needs_saliency``)."""

    positions: torch.Tensor
    grid: tuple[int, int] | None
    protected: torch.Tensor | None = None
    saliency: torch.Tensor | None = None   # [n] a vision-side score per token (LLaVA: CLS attention, last ViT layer)
    image: int = 0    # which image of the sample this grid belongs to (LLaVA-NeXT: two grids per image)
    extra: int = 0    # that image's placeholder tokens outside every grid (NeXT newlines, a kept CLS): never pruned
    native: int | None = None   # tokens of this grid before a vision stage merged some (None: no vision stage)


@dataclass
class _Sample:
    images: list = field(default_factory=list)      # per image: [abs positions (current survivors), raster indices]


@dataclass
class _Slot:
    """Image j of every sample, batched (used when all samples have the same grids, the usual batch): current
    survivors as absolute columns ``pos`` [B, n_cur] and raster indices ``raster`` [B, n_cur], both ascending."""

    pos: torch.Tensor
    raster: torch.Tensor
    n: int
    grid: tuple[int, int] | None
    extra: int
    image: int
    saliency: torch.Tensor | None   # [B, n]


def gather_seq(t: torch.Tensor, idx: torch.Tensor, seq_axis: int) -> torch.Tensor:
    """Gather ``t`` on its sequence axis with per-sample indices ``idx`` [B, S'] (batch axis = the axis before).

    Works for hidden [B, S, d], cos/sin [B, S, hd] or [3, B, S, hd], position ids [B, S] or [3, B, S]."""
    seq_axis = seq_axis % t.dim()
    b_axis = seq_axis - 1
    x = t.movedim((b_axis, seq_axis), (0, 1))
    B = idx.shape[0]
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    out = x[torch.arange(B, device=x.device)[:, None], idx.to(x.device)]
    return out.movedim((0, 1), (b_axis, seq_axis))


def gather_mask(mask, rows: torch.Tensor | None, cols: torch.Tensor):
    """4-D mask [B|1, 1|H, Q, K]: gather columns (and rows at prefill) per sample; 2-D mask [B, K]: columns."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return mask
    if mask.dim() == 2:
        return gather_seq(mask, cols, -1)
    B = cols.shape[0]
    m = mask.expand(B, *mask.shape[1:]) if mask.shape[0] != B else mask
    bi = torch.arange(B, device=m.device)[:, None]
    if rows is not None:
        m = m.permute(0, 2, 1, 3)[bi, rows.to(m.device)].permute(0, 2, 1, 3)   # [B, h, Q', K]
    return m.permute(0, 3, 1, 2)[bi, cols.to(m.device)].permute(0, 2, 3, 1)   # [B, h, Q', K']


def rotate_half_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The Llama/Qwen2 rotary convention on [B, H, S, hd] tensors with cos/sin [B, S, hd]."""
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def attention_rows(q: torch.Tensor, k: torch.Tensor, key_ok: torch.Tensor, scale: float,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over heads of softmax(q kᵀ · scale + bias) restricted to ``key_ok`` keys, fp32.

    q [R, H, hd], k [K, H_kv, hd] (GQA keys are repeated to H heads), key_ok [R, K] bool, bias [K] (e.g. a vision
    encoder's log token sizes) -> [R, K]."""
    H, H_kv = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(H // H_kv, dim=1)
    logits = torch.einsum("rhd,khd->hrk", q.float(), k) * scale
    if bias is not None:
        logits = logits + bias.float()
    logits = logits.masked_fill(~key_ok[None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(0)


def attention_rows_batched(q: torch.Tensor, k: torch.Tensor, key_ok: torch.Tensor | None, scale: float):
    """:func:`attention_rows` for a batch: q [B, R, H, hd], k [B, K, H_kv, hd], key_ok [B, R, K] bool or None (all
    keys) -> [B, R, K] fp32, mean over heads."""
    H, H_kv = q.shape[2], k.shape[2]
    k = k.float().repeat_interleave(H // H_kv, dim=2) if H != H_kv else k.float()
    logits = torch.einsum("brhd,bkhd->bhrk", q.float(), k) * scale
    if key_ok is not None:
        logits = logits.masked_fill(~key_ok[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(1)


ROPE_CONVENTIONS = ("rotate_half", "custom")   # an adapter's ``rope_convention`` (see PlaceholderAdapter)


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, S, ...] gathered on axis 1 with idx [B, S'] (one launch)."""
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


class InLLMEngine:
    def __init__(self, adapter, method, handle):
        self.adapter, self.method, self.handle = adapter, method, handle
        self._pending = None     # visual layout of the next LLM call, set by the adapter's forward wrapper
        self._prompt_seen = None  # [B, S] the prompt columns decode rows see (after a decode stage's eviction)
        self._prompt = None      # the prefill's (S, layout, mask) in generate(): use_cache=False steps cut it again
        self._call = None        # per-call prefill state
        self._decode = None      # state of a decode step (read from the cache)
        self._captured = {}
        self._capture = []       # this call's q / k capture hooks (registered at prefill for the cut layers)
        self._graphs = {}        # CUDA graphs of cuts, per shape (see _graphed_cut)
        self._aranges = {}       # shared read-only index rows (see _arange)

    # -- installation ------------------------------------------------------------------------------------------
    def attach(self, undo: list) -> None:
        ad = self.adapter
        lm = ad.language_model()
        layers = list(ad.decoder_layers())
        self.n_layers = len(layers)
        if ad.rope_convention not in ROPE_CONVENTIONS:
            raise IncompatibleError(f"vltok's {ad.family} adapter declares rope_convention={ad.rope_convention!r}; "
                                    f"the in-LLM engine knows {', '.join(map(repr, ROPE_CONVENTIONS))}")
        validate = getattr(self.method.in_llm, "validate", None)
        if validate is not None:
            validate(self.n_layers)   # refuse impossible budgets at patch time, before any hook is installed
        if getattr(self.method.in_llm, "needs_saliency", False) and not ad.install_saliency(self, undo):
            warnings.warn(f"{self.method.name}: vltok's {ad.family} adapter has no vision-side token score (CLS "
                          "attention) for this model, so no key set is protected (as with key_rate=0)", stacklevel=3)
        hooks = [lm.register_forward_pre_hook(self._lm_start, with_kwargs=True),
                 lm.register_forward_hook(self._lm_end, with_kwargs=True)]
        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        self._attn = [ad.attention(layer) for layer in layers]
        for h in hooks:
            undo.append(h.remove)
        undo.append(self._drop_capture)
        undo.append(self._graphs.clear)
        undo.append(self._aranges.clear)

    # -- per call ----------------------------------------------------------------------------------------------
    def no_images(self) -> None:
        """Called by the adapter's forward wrapper for a call without images: nothing pending may be pruned."""
        self._pending = self._prompt = None

    def begin_call(self, call: dict, layout: list[list[VisualImage]]) -> None:
        """Called by the adapter's forward wrapper with the (rewritten) call and each sample's visual grids."""
        if call.get("labels") is not None or self.adapter.model.training:
            raise IncompatibleError(
                f"{self.method.name} prunes tokens inside the LLM, so the logits cover fewer positions than the "
                "labels; loss / training is not supported: call the model without labels in eval mode, or "
                "vltok.unpatch(model) for training")
        ids = call["input_ids"]
        if self._prompt is not None and self.adapter._in_generate and ids.shape[1] > self._prompt[0]:
            self._pending = None   # a use_cache=False step that brings the images again: _lm_start cuts the prompt
            return
        self._prompt = None
        if not any(len(imgs) for imgs in layout):
            self._pending = None
            return
        am = call.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        self._pending = (ids.shape[1], layout, am)

    def set_saliency(self, per_image: list[torch.Tensor]) -> None:
        """Called by the adapter's vision-tower hook: one [n] score per grid of the pending call, sample-major."""
        if self._pending is None:
            return
        flat = [im for imgs in self._pending[1] for im in imgs]
        if len(flat) != len(per_image) or any(im.positions.numel() != sc.numel() for im, sc in zip(flat, per_image)):
            raise IncompatibleError(f"{self.method.name}: the vision tower scored {len(per_image)} grid(s) but the "
                                    f"inputs hold {len(flat)}; pass one image per placeholder run")
        for im, sc in zip(flat, per_image):
            im.saliency = sc.float()

    def _lm_start(self, module, args, kwargs):
        t0 = time.perf_counter()
        self._drop_capture()
        self._call, self._decode, self._captured = None, None, {}
        pending, self._pending = self._pending, None
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            emb = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3 else None
        B, S = (emb if emb is not None else kwargs["input_ids"]).shape[:2]
        cache = get_cache(kwargs)
        if pending is not None and B != pending[2].shape[0]:
            pending = _expand_pending(pending, B)   # beams / num_return_sequences: rows repeated
        if pending is not None and pending[0] == S:
            _check_cache(cache, self.method.name)
            if cache is not None and cache.get_seq_length() > 0:
                raise IncompatibleError(f"{self.method.name}: the images must be in the first (prefill) call on a "
                                        "cache; chunked prefill / continuing a filled cache is not supported")
            self._prompt = pending if self.adapter._in_generate else None
            self._start_prefill(S, pending[1], pending[2])
            self._call["scoring"] += time.perf_counter() - t0
        elif cache is not None and getattr(cache, _STATE, None) is not None:
            self._decode = getattr(cache, _STATE)
        elif (self._prompt is not None and self.adapter._in_generate and S > self._prompt[0]
              and (cache is None or cache.get_seq_length() == 0)):
            # generate(use_cache=False): every step re-runs prompt + generated tokens. The prompt's columns are cut
            # as at prefill (the same scores: the query stays the prompt's last token, whose rows do not see later
            # columns), the generated columns are kept and never queried, so the tokens equal the cached run's.
            P, layout, am = self._prompt
            if B != am.shape[0]:
                P, layout, am = _expand_pending(self._prompt, B)
            self._start_prefill(S, layout, torch.cat([am, am.new_zeros(am.shape[0], S - P)], 1), prompt=P)
            self._call["scoring"] += time.perf_counter() - t0
        return None

    def _start_prefill(self, S, layout, am, prompt=None):
        sizes = [[int(im.positions.numel()) for im in imgs] for imgs in layout]
        ref = next(b for b, imgs in enumerate(layout) if imgs)   # the plan's sample: the first one with images
        first = [(int(im.positions.numel()), im.grid) for im in layout[ref]]
        kw = {}
        if any(im.native is not None for im in layout[ref]):   # a vision stage merged tokens: keep is relative to
            kw["native"] = [im.native or n for im, (n, _) in zip(layout[ref], first)]   # the native count
        cuts = sorted((c for c in self.method.in_llm.plan(self.n_layers, first, **kw) if 1 <= c.layer < self.n_layers),
                      key=lambda c: c.layer)
        B = am.shape[0]
        dev = am.device
        slots = self._slots(layout, dev)
        samples = []
        for imgs in (layout if slots is None else ()):
            s = _Sample()
            for im in imgs:
                n = int(im.positions.numel())
                s.images.append([im.positions.to(dev).long(), torch.arange(n, device=dev), im])
            samples.append(s)
        self._call = dict(S=S, cuts={c.layer: c for c in cuts}, samples=samples, am=am.to(dev),
                          keep=self._arange(B, S, dev), per_layer={}, layer_keep={},
                          dead=None, layer_dead={}, cut_done=False,
                          scoring=0.0, n0=sum(sizes[ref]), ref=ref, cache=None, slots=slots, layout=layout, has_dead=False,
                          rel=None, gathered=None, text_rows=None, last_abs=None, prompt=prompt)
        for c in cuts:   # q / k projections are captured only where a cut reads them, only for this call
            if c.scores:
                attn = self._attn[c.layer - 1]
                self._capture += [attn.q_proj.register_forward_hook(self._capture_hook("q")),
                                  attn.k_proj.register_forward_hook(self._capture_hook("k"))]

    def _slots(self, layout, dev):
        """Batched image slots when every sample holds the same grids and the method selects a slot at once
        (``select_batch``); None for the per-sample path (ragged batches, or a ``select`` replaced on the instance,
        which the engine then honours)."""
        sel = self.method.in_llm
        if getattr(sel, "select_batch", None) is None or "select" in vars(sel):
            return None
        first = layout[0]
        if any(len(imgs) != len(first) for imgs in layout):
            return None
        slots = []
        for j, im0 in enumerate(first):
            col = [imgs[j] for imgs in layout]
            n = im0.positions.numel()
            if any(im.positions.numel() != n or im.grid != im0.grid or im.extra != im0.extra or im.image != im0.image
                   or im.protected is not None or (im.saliency is None) != (im0.saliency is None) for im in col):
                return None
            pos = _to_device(torch.stack([im.positions.reshape(-1) for im in col]).long(), dev)
            sal = torch.stack([im.saliency for im in col]).to(dev) if im0.saliency is not None else None
            slots.append(_Slot(pos, self._arange(len(col), n, dev), n, im0.grid, im0.extra,
                               im0.image, sal))
        return slots

    def _arange(self, B: int, n: int, dev) -> torch.Tensor:
        """[B, n] rows of 0..n-1, contiguous, made once per shape (read-only: the engine replaces, never writes)."""
        key = (B, n, str(dev))
        t = self._aranges.get(key)
        if t is None:
            t = self._aranges[key] = torch.arange(n, device=dev).expand(B, n).contiguous()
        return t

    def _capture_hook(self, which):
        def hook(module, args, out):
            if self._call is not None:
                self._captured[which] = out
        return hook

    def _drop_capture(self):
        """Remove this call's q / k capture hooks (at the end of the LLM's forward, the start of the next one, and
        at unpatch)."""
        while self._capture:
            self._capture.pop().remove()

    def _layer_hook(self, i):
        def hook(module, args, kwargs):
            c = self._call
            if c is not None:
                t0 = time.perf_counter()
                try:
                    return self._prefill_layer(i, args, kwargs)
                finally:
                    c["scoring"] += time.perf_counter() - t0
            d = self._decode
            if d is not None and i in d["keep"]:
                mask = kwargs.get("attention_mask")
                dead = d["dead"].get(i)
                if isinstance(mask, torch.Tensor):
                    keep = d["keep"][i]
                    K = mask.shape[-1]
                    new = torch.arange(d["S"], K, device=keep.device).expand(keep.shape[0], -1)
                    mask = gather_mask(mask, None, torch.cat([keep, new], 1))
                if dead is not None:
                    q = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
                    if isinstance(mask, torch.Tensor):
                        K = mask.shape[-1]
                    else:                           # this step's keys: the layer's cache plus the new tokens
                        K = get_cache(kwargs).layers[i].keys.shape[-2] + q
                    pad = torch.zeros(dead.shape[0], K - dead.shape[1], dtype=torch.bool, device=dead.device)
                    mask = self._mask_dead(mask, torch.cat([dead, pad], 1), prefill=False, q=q)
                if isinstance(mask, torch.Tensor):
                    return args, dict(kwargs, attention_mask=mask)
            return None
        return hook

    def _prefill_layer(self, i, args, kwargs):
        c = self._call
        if c["cache"] is None and get_cache(kwargs) is not None:
            c["cache"] = get_cache(kwargs)
            _check_cache(c["cache"], self.method.name)
        if not c["cut_done"] and i not in c["cuts"]:   # before the first cut every layer runs as it would
            if self._evicts(i):
                return args, dict(kwargs, attention_mask=self._mask_evicted(kwargs.get("attention_mask"), c["keep"]))
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = dict(kwargs)
        if i in c["cuts"]:
            out = self._graphed_cut(c["cuts"][i], kwargs, hidden, kw)
            if out is not None:
                hidden = out
            else:
                new, rel, merged = self._cut(c["cuts"][i], kwargs, hidden)
                c["keep"], c["cut_done"] = new, True
                hidden = self._gather_at_cut(hidden, rel, new, kw)
                if merged is not None:
                    hidden = _put_rows(hidden, new, merged)
            if c["slots"] is not None:   # visual tokens entering this layer and the next ones up to the next cut
                c["per_layer"][i] = sum(sl.pos.shape[1] + sl.extra for sl in c["slots"])
            else:
                c["per_layer"][i] = sum(p.numel() + im.extra for p, _, im in c["samples"][c["ref"]].images)
        keep = c["keep"]
        c["layer_keep"][i] = keep
        # HF hands every layer the same loop-level position embeddings / ids / mask: gather them once per cut
        g = c["gathered"]
        pe, pid, m = kw.get("position_embeddings"), kw.get("position_ids"), kw.get("attention_mask")
        if g is None or g["keep"] is not keep or g["src"][0] is not (pe[0] if pe is not None else None) \
                or g["src"][1] is not pid or g["src"][2] is not m:
            out, dead = self._gather_loop_kwargs(kw, keep)
            g = c["gathered"] = dict(keep=keep, src=(pe[0] if pe is not None else None, pid, m), out=out, dead=dead)
        if g["dead"] is not None:
            c["layer_dead"][i] = g["dead"]
        kw.update(g["out"])
        if self._evicts(i):
            kw["attention_mask"] = self._mask_evicted(kw.get("attention_mask"), keep)
        if args:
            return (hidden, *args[1:]), kw
        kw["hidden_states"] = hidden
        return args, kw

    def _evicts(self, i) -> bool:
        """A use_cache=False step of generate() whose decode stage evicted layer i's cache in the cached run."""
        c = self._call
        if c["prompt"] is None or self.method.decode is None or self._prompt_seen is None or not c["cuts"]:
            return False
        return i >= max(self.method.decode.evict_from(sorted(c["cuts"])), 1)

    def _mask_evicted(self, m, keep):
        """The mask of a use_cache=False step at an evicting layer: the generated rows see only the prompt columns
        the cached run keeps in that layer's cache (the prefill's final survivors), the prompt rows what they saw."""
        c = self._call
        P, seen = c["prompt"], self._prompt_seen
        if isinstance(m, torch.Tensor) and m.dim() == 2:
            raise IncompatibleError(f"{self.method.name}: generate(use_cache=False) with its decode stage needs a 4-D "
                                    "mask (sdpa / eager attention); use the cache or another attention backend")
        B, K = keep.shape
        hide = (keep < P) & ~seen.to(keep.device).gather(1, keep.clamp(max=P - 1))       # [B, K] evicted columns
        block = ((keep >= P)[:, :, None] & hide[:, None, :])[:, None]                    # [B, 1, Q, K]
        if m is None:
            m = torch.ones(K, K, dtype=torch.bool, device=keep.device).tril()[None, None].expand(B, 1, K, K)
            if (getattr(self._attn[0].config, "_attn_implementation", "sdpa") or "sdpa") == "eager":
                m = torch.zeros(m.shape, device=keep.device).masked_fill(~m, torch.finfo(torch.float32).min)
        if m.dtype == torch.bool:
            return m & ~block
        return m.masked_fill(block, torch.finfo(m.dtype).min)

    # -- the cut as a CUDA graph ----------------------------------------------------------------------------------
    def _graphed_cut(self, cut, kwargs, hidden, kw):
        """The batched cut of a method that declares ``graph_safe`` (its ``select_batch`` is sync-free index work)
        on CUDA, replayed from a CUDA graph: the first call of a shape runs eagerly (compiling the kernels), the
        second captures scores, selection, compaction and the gather of the survivors' rows, later ones copy the
        inputs into the graph's buffers and replay it, a dozen host calls instead of ~70 launches' Python. Returns
        the survivors' hidden rows (the call's state updated as the eager cut does), or None for the eager path.
        ``vltok.patch(..., cut_graphs=False)`` (``handle.cut_graphs``) turns it off."""
        c = self._call
        if not (hidden.is_cuda and c["slots"] is not None and cut.scores and cut.query == "last" and not cut.hidden
                and getattr(self.method.in_llm, "graph_safe", False)
                and self.handle.cut_graphs is not False
                and not torch.cuda.is_current_stream_capturing()):   # (inside vltok.fast's graph: captured eagerly)
            return None
        pe = kw.get("position_embeddings")
        pid = kw.get("position_ids") if isinstance(kw.get("position_ids"), torch.Tensor) else None
        if pe is not None and not (len(pe) == 2 and pe[0].dim() == 3):
            return None
        slots = c["slots"]
        ins = [self._captured.get("q"), self._captured.get("k"), hidden, c["keep"], c["am"], self._last_abs(),
               *(pe or (None, None)), pid, *[sl.pos for sl in slots], *[sl.raster for sl in slots]]
        key = (cut, c["cut_done"], tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in ins))
        entry = self._graphs.get(key)
        if entry is None:                    # first sight of this shape: the eager cut (compiles, fills caches)
            while len(self._graphs) >= _MAX_GRAPHS:   # many prompt lengths: drop the oldest shape's graph
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = "seen"
            return None
        if entry == "off":
            return None
        if entry == "seen":
            entry = self._graphs[key] = self._capture_cut(cut, kwargs, kw, ins) or "off"
            if entry == "off":
                return None
        else:
            for static, t in zip(entry["in"], ins):
                if t is not None:
                    static.copy_(t)
        entry["graph"].replay()
        new = entry["new"].clone()           # kept for decode steps: must survive the next replay
        for sl, pos, raster in zip(slots, entry["pos"], entry["raster"]):
            sl.pos, sl.raster = pos, raster
        c["keep"], c["cut_done"], c["has_dead"] = new, True, False
        # what the captured gather recorded, with this call's loop-level tensors where it used them
        c["pre_gathered"] = (new, pe[0] if entry["pe_used"] else None, entry["pe"], pid if entry["pid_used"] else None,
                             entry["pid"])
        return entry["hidden"]

    def _capture_cut(self, cut, kwargs, kw, ins):
        """Capture the eager cut on static copies of ``ins`` (see _graphed_cut); None when it cannot be captured."""
        c = self._call
        slots = c["slots"]
        static = [None if t is None else t.clone() for t in ins]
        s_q, s_k, s_hidden, s_keep, s_am, s_last, s_cos, s_sin, s_pid = static[:9]
        n = len(slots)
        live = (c["keep"], c["am"], c["last_abs"], dict(self._captured), [(sl.pos, sl.raster) for sl in slots])
        c["keep"], c["am"], c["last_abs"], self._captured = s_keep, s_am, s_last, {"q": s_q, "k": s_k}
        for sl, pos, raster in zip(slots, static[9:9 + n], static[9 + n:]):
            sl.pos, sl.raster = pos, raster
        pe = None if s_cos is None else (s_cos, s_sin)
        kw_s = dict(kw, position_embeddings=pe, position_ids=s_pid if s_pid is not None else kw.get("position_ids"))
        kwargs_s = dict(kwargs, position_embeddings=pe)
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                new, rel, merged = self._cut(cut, kwargs_s, s_hidden)
                hidden = self._gather_at_cut(s_hidden, rel, new, kw_s)
                pre = c.pop("pre_gathered")
            if merged is not None:
                raise RuntimeError("a merge cannot be replayed")
        except Exception as e:   # a method that syncs or merges: eager from now on, for this shape
            warnings.warn(f"{self.method.name}: the cut before layer {cut.layer} runs eagerly ({e})", stacklevel=2)
            entry = None
        else:
            entry = {"graph": graph, "in": static, "new": new, "hidden": hidden, "pe": pre[2], "pid": pre[4],
                     "pe_used": pre[1] is not None, "pid_used": pre[3] is not None,
                     "pos": [sl.pos for sl in slots], "raster": [sl.raster for sl in slots]}
        c["keep"], c["am"], c["last_abs"], self._captured = live[:4]
        for sl, (pos, raster) in zip(slots, live[4]):
            sl.pos, sl.raster = pos, raster
        c.pop("pre_gathered", None)
        return entry

    def _gather_at_cut(self, hidden, rel, keep, kw):
        """Hidden rows of the survivors and, in the same launch (vltok.kernels.gather), the loop-level cos / sin and
        position-id rows of the new columns, which every layer up to the next cut reuses."""
        from vltok.kernels.gather import gather_rows

        pe = kw.get("position_embeddings")
        pid = kw.get("position_ids") if isinstance(kw.get("position_ids"), torch.Tensor) else None
        if self.adapter.model.config._attn_implementation.startswith("flash"):
            pid = None
        if pid is not None and pid.dim() != 2:
            pid = None
        if pe is not None and not (len(pe) == 2 and pe[0].dim() == 3 and pe[0].shape[0] in (1, keep.shape[0])):
            pe = None                                    # (Qwen's [3, B, S, hd] goes through gather_seq)
        hidden, cos, sin, pid_out = gather_rows(hidden, rel, *(pe or (None, None)), keep, pid)
        self._call["pre_gathered"] = (keep, pe[0] if pe is not None else None, (cos, sin), pid, pid_out)
        return hidden

    def _gather_loop_kwargs(self, kw, keep):
        c = self._call
        out = {}
        pre = c.pop("pre_gathered", None)
        if pre is not None and pre[0] is not keep:
            pre = None
        pe = kw.get("position_embeddings")
        if pe is not None:
            if pre is not None and pre[1] is pe[0]:
                out["position_embeddings"] = pre[2]
            else:
                out["position_embeddings"] = tuple(gather_seq(t, keep, -2) for t in pe)
        pid = kw.get("position_ids")
        if isinstance(pid, torch.Tensor):
            if self.adapter.model.config._attn_implementation.startswith("flash"):
                out["position_ids"] = None
            else:
                out["position_ids"] = pre[4] if pre is not None and pre[3] is pid else gather_seq(pid, keep, -1)
        m = kw.get("attention_mask")
        if isinstance(m, torch.Tensor):
            m = gather_mask(m, keep if m.dim() == 4 else None, keep)
        dead = None
        if c["has_dead"]:   # known on the host: the per-sample path padded a sample with filler columns at this cut
            dead = c["dead"].gather(1, keep)
            m = self._mask_dead(m, dead, prefill=True)
        if "attention_mask" in kw or m is not None:
            out["attention_mask"] = m
        return out, dead

    def _mask_dead(self, m, dead, prefill, q=1):
        """Mask the key columns ``dead`` [B, K] (filler columns) in a gathered mask, building one if it is None."""
        impl = getattr(self._attn[0].config, "_attn_implementation", "sdpa") or "sdpa"
        if isinstance(m, torch.Tensor) and m.dim() == 2:               # FlashAttention-2 padding mask
            return m * (~dead).to(m.dtype)
        if m is None:
            K = dead.shape[1]
            rows = torch.arange(K - q, K, device=dead.device) if not prefill else torch.arange(K, device=dead.device)
            m = (torch.arange(K, device=dead.device)[None, :] <= rows[:, None])[None, None].expand(dead.shape[0], 1, -1, -1)
            if impl == "eager":
                m = torch.zeros(m.shape, device=dead.device).masked_fill(~m, torch.finfo(torch.float32).min)
        if m.dtype == torch.bool:
            return m & ~dead[:, None, None, :]
        return m.masked_fill(dead[:, None, None, :], torch.finfo(m.dtype).min)

    def _cut(self, cut: Cut, kwargs, hidden):
        """Score the current survivors from layer cut.layer-1's q/k; return the new kept columns [B, S'], their
        indices into the current sequence [B, S'] and the merged rows (None, or what :func:`_put_rows` takes)."""
        c = self._call
        attn = self._attn[cut.layer - 1]
        q = k = None
        if cut.scores:
            q_out, k_out = self._captured.get("q"), self._captured.get("k")
            if q_out is None or k_out is None:
                raise RuntimeError(f"vltok: no q/k captured at layer {cut.layer - 1}")
            B, Sc = q_out.shape[:2]
            q = q_out.view(B, Sc, -1, attn.head_dim)
            k = k_out.view(B, Sc, -1, attn.head_dim)
        if not cut.hidden:
            hidden = None
        if c["slots"] is not None:
            out = self._cut_batched(cut, kwargs, q, k, attn, hidden)
            if out is not None:
                return out
            c["samples"] = self._samples_from_slots()   # the method cannot select this cut batched
            c["slots"] = None
        prev = c["keep"]
        new, merged = self._cut_per_sample(cut, kwargs, q, k, attn, hidden)
        return new, torch.searchsorted(prev.contiguous(), new), merged

    def _cut_batched(self, cut, kwargs, q, k, attn, hidden):
        """The cut for batched slots: a fixed number of launches for the whole batch, no host sync (every count
        is known on the host from the shapes). Returns None when the method declines (``select_batch`` -> None)."""
        c = self._call
        prev = c["keep"].contiguous()
        B, Sc = prev.shape
        dev = prev.device
        slots = c["slots"]
        # current indices of each slot's tokens (before the first cut the current columns are the absolute ones)
        cur = [torch.searchsorted(prev, sl.pos) if c["cut_done"] else sl.pos for sl in slots]
        vis = cur[0] if len(cur) == 1 else torch.cat(cur, 1)
        probs = None
        if cut.scores:
            probs = self._scores_last(cut, kwargs, q, k, attn, prev)
            probs = self._scores_batched(cut, kwargs, q, k, attn, prev, vis) if probs is None else probs(vis)
        sels, merged, off = [], [], 0
        for sl, cj in zip(slots, cur):
            n_cur = sl.pos.shape[1]
            view = BatchView(sl.grid, sl.n, sl.raster, sl.saliency, _take(hidden, cj) if hidden is not None else None)
            sel = self.method.in_llm.select_batch(cut, view, probs[:, :, off:off + n_cur] if probs is not None else None)
            if sel is None:
                return None
            if isinstance(sel, Merge):
                merged.append((cj.gather(1, sel.indices.to(dev)), sel.rows))
                sel = sel.indices
            sels.append(sel.to(dev))
            off += n_cur
        kept = [cj.gather(1, sel) for cj, sel in zip(cur, sels)]
        for sl, sel in zip(slots, sels):
            sl.pos, sl.raster = sl.pos.gather(1, sel), sl.raster.gather(1, sel)
        S_new = Sc - vis.shape[1] + sum(sel.shape[1] for sel in sels)
        rel, new = cut_columns(prev, vis, kept[0] if len(kept) == 1 else torch.cat(kept, 1), S_new)
        c["has_dead"] = False
        if merged:   # current indices of the merged survivors -> their absolute columns
            merged = (prev.gather(1, torch.cat([m[0] for m in merged], 1)), torch.cat([m[1] for m in merged], 1))
        return new, rel, merged or None

    def _last_abs(self) -> torch.Tensor:
        """[B, 1] each sample's last real column (absolute), computed once per call."""
        c = self._call
        if c["last_abs"] is None:
            c["last_abs"] = torch.where(c["am"] != 0, torch.arange(c["am"].shape[1], device=c["am"].device),
                                        -1).amax(1, keepdim=True)
        return c["last_abs"]

    def _scores_last(self, cut, kwargs, q, k, attn, prev):
        """The last-token criterion in two launches (vltok.kernels.select.last_row_scores), as a function of the
        scored columns -> [B, 1, K]; None where that kernel does not apply (other queries, another rotary)."""
        c = self._call
        if cut.query != "last":
            return None
        cos = sin = None
        if cut.rope:
            pe = kwargs.get("position_embeddings")
            if pe is None or len(pe) != 2 or pe[0].dim() != 3 or pe[0].shape[0] not in (1, prev.shape[0]) \
                    or self.adapter.rope_convention != "rotate_half":
                return None
            cos, sin = pe
        last = self._last_abs()
        # its current index: the last current column at or before it (the last real token is text unless the
        # prompt ends with an image, whose last token a cut may have dropped)
        rows = (torch.searchsorted(prev, last, right=True) - 1)[:, 0] if c["cut_done"] else last[:, 0]
        norm_all = cut.softmax == "all"

        def scores(keys):
            return last_row_scores(q, k, rows, keys, attn.scaling, norm_all=norm_all, prev=prev,
                                   am=c["am"] if norm_all else None, cos=cos, sin=sin)[:, None]
        return scores

    def _scores_batched(self, cut, kwargs, q, k, attn, prev, vis):
        """[B, R, n_vis] attention of the cut's query rows to the slots' current visual columns ``vis``."""
        c = self._call
        B, Sc = prev.shape
        dev = prev.device
        ar = torch.arange(Sc, device=dev)
        amc = c["am"].gather(1, prev).bool()
        last = torch.where(amc, ar, -1).amax(1, keepdim=True)             # the last real column
        valid = None
        if cut.query == "last":
            rows = last
        else:                                                             # real columns after the sample's images
            rows_abs, valid = self._text_rows()
            rows = torch.searchsorted(prev, rows_abs).clamp(max=Sc - 1)
            anyv = valid.any(1, keepdim=True)                             # none: the last real column instead
            rows = torch.cat([torch.where(anyv, rows[:, :1], last), rows[:, 1:]], 1)
            valid = torch.cat([valid[:, :1] | ~anyv, valid[:, 1:]], 1)
        keys = vis if cut.softmax == "visual" else None                    # None: every current column
        qr = _take(q, rows)
        kk = k if keys is None else _take(k, keys)
        if cut.rope:
            pe = kwargs["position_embeddings"]
            at_rows = prev.gather(1, rows)
            at_keys = prev if keys is None else prev.gather(1, keys)
            cr, sr = (gather_seq(t, at_rows, -2) for t in pe)
            ck, sk = (gather_seq(t, at_keys, -2) for t in pe)
            # rows and keys have different lengths: rotate each as "q" (the one-head "k" is a throw-away)
            qr = self.adapter.apply_rope(qr.transpose(1, 2), qr[:, :, :1].transpose(1, 2), cr, sr)[0].transpose(1, 2)
            kk = self.adapter.apply_rope(kk.transpose(1, 2), kk[:, :, :1].transpose(1, 2), ck, sk)[0].transpose(1, 2)
        ok = None if keys is not None else amc[:, None, :] & (ar[None, None, :] <= rows[:, :, None])
        probs = attention_rows_batched(qr, kk, ok, attn.scaling)          # [B, R, K]
        if keys is None:
            probs = probs.gather(2, vis[:, None, :].expand(-1, probs.shape[1], -1))
        if valid is not None:                                             # padded query rows score nothing
            probs = torch.where(valid[:, :, None], probs, 0.0)
        return probs

    def _text_rows(self):
        """Per sample, the columns after its last visual token [B, R] (padded) and which are real tokens [B, R];
        computed once per call from the layout's positions (host tensors from split_runs: no sync)."""
        c = self._call
        if c["text_rows"] is None:
            S, dev = c["S"], c["am"].device
            last = _last_visual(c["layout"])
            R = max(1, S - 1 - min(last))
            rows = torch.tensor(last)[:, None] + 1 + torch.arange(R)
            inside = rows <= S - 1
            rows = _to_device(rows.clamp(max=S - 1), dev)
            valid = _to_device(inside, dev) & c["am"].gather(1, rows).bool()
            c["text_rows"] = (rows, valid)
        return c["text_rows"]

    def _samples_from_slots(self):
        c = self._call
        out = []
        for b, imgs in enumerate(c["layout"]):
            s = _Sample()
            s.images = [[sl.pos[b], sl.raster[b], im] for sl, im in zip(c["slots"], imgs)]
            out.append(s)
        return out

    def _cut_per_sample(self, cut, kwargs, q, k, attn, hidden):
        """The general cut (ragged batches): per sample, filler columns where samples keep different counts.
        Returns the new columns [B, S'] and the merged rows (a list per sample of (columns [R], rows [R, d]), or
        None)."""
        c = self._call
        prev = c["keep"]
        Sc = prev.shape[1]
        if cut.scores and cut.rope:
            pe = kwargs["position_embeddings"]
            cos, sin = (gather_seq(t, prev, -2) for t in pe) if prev.shape[1] != pe[0].shape[-2] else pe
            qr, kr = self.adapter.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            q, k = qr.transpose(1, 2), kr.transpose(1, 2)
        if c["dead"] is None:   # filler columns of ragged samples (only this path makes them)
            c["dead"] = torch.zeros(prev.shape[0], c["S"], dtype=torch.bool, device=prev.device)
        am = gather_seq(c["am"], prev, -1).bool() & ~c["dead"].gather(1, prev)   # fillers are no keys
        new_rows, merged = [], []
        for b, s in enumerate(c["samples"]):
            if not s.images:   # a text-only sample in a batch with images: every column stays
                new_rows.append((prev[b], ~c["dead"][b, prev[b]]))
                merged.append(None)
                continue
            pos_in_cur = [torch.searchsorted(prev[b], p) for p, _, _ in s.images]
            vis = torch.cat(pos_in_cur)
            probs = None
            if cut.scores and vis.numel():
                real = am[b].nonzero().flatten()
                if cut.query == "last":
                    rows = real[-1:]
                else:
                    rows = real[real > vis.max()]
                    if rows.numel() == 0:
                        rows = real[-1:]
                if cut.softmax == "visual":
                    keys = vis
                    ok = torch.ones(rows.numel(), keys.numel(), dtype=torch.bool, device=keys.device)
                else:
                    keys = torch.arange(Sc, device=am.device)
                    ok = am[b][None, :] & (keys[None, :] <= rows[:, None])
                probs = attention_rows(q[b, rows], k[b, keys], ok, attn.scaling)
                if cut.softmax != "visual":
                    probs = probs[:, vis]
            before = torch.cat([p for p, _, _ in s.images])
            off, cols, rows_new = 0, [], []
            for j, (p, raster, im) in enumerate(s.images):
                n_cur = p.numel()
                h_j = hidden[b, pos_in_cur[j]] if hidden is not None else None
                view = ImageView(im.grid, int(im.positions.numel()), raster, im.protected, im.saliency, h_j)
                sel = self.method.in_llm.select(cut, view, probs[:, off:off + n_cur] if probs is not None else None)
                if isinstance(sel, Merge):
                    idx = sel.indices.to(p.device)
                    if idx.numel() > 1 and not bool((idx.diff() > 0).all()):
                        raise RuntimeError(f"{self.method.name}: a Merge's indices must be strictly ascending")
                    cols.append(p[idx])
                    rows_new.append(sel.rows)
                    sel = idx
                else:
                    sel = sel.to(p.device).unique(sorted=True)
                s.images[j] = [p[sel], raster[sel], im]
                off += n_cur
            merged.append((torch.cat(cols), torch.cat(rows_new)) if cols else None)
            after = torch.cat([p for p, _, _ in s.images])
            dropped = before[~torch.isin(before, after)]
            live = ~torch.isin(prev[b], dropped) & ~c["dead"][b, prev[b]]
            new_rows.append((prev[b], live))
        # samples that kept fewer columns are padded with some of their dropped columns, marked dead: masked as
        # keys in every later layer and at decode, so the batch stays rectangular (spec feather.md §9 (b))
        counts = [int(live.sum()) for _, live in new_rows]
        width = max(counts)
        out = []
        for b, ((row, live), n) in enumerate(zip(new_rows, counts)):
            fill = (~live).nonzero().flatten()[:width - n]
            live = live.clone()
            live[fill] = True
            c["dead"][b, row[fill]] = True
            out.append(row[live])
        c["has_dead"] = any(n < width for n in counts)   # the new columns hold fillers: mask them from now on
        return torch.stack(out), (merged if any(m is not None for m in merged) else None)

    def _lm_end(self, module, args, kwargs, output):
        t0 = time.perf_counter()
        c, self._call = self._call, None
        self._decode = None
        self._drop_capture()
        if c is None:
            return None
        if c["slots"] is not None:   # the same grids in every sample: per-image counts from the slots' shapes
            c["samples"] = [_Sample([[sl.pos[b], None, im] for sl, im in zip(c["slots"], imgs)])
                            for b, imgs in enumerate(c["layout"])]
        L, N = self.n_layers, c["n0"] + sum(im.extra for _, _, im in c["samples"][c["ref"]].images)
        counts, n = [], N
        for i in range(L):
            n = c["per_layer"].get(i, n)
            counts.append(n)
        cache = c["cache"]
        self.handle.inllm_prefill_columns = dict(c["layer_keep"])   # per layer: kept prefill columns [B, S_l]
        self.handle.inllm_dead_columns = dict(c["layer_dead"])      # per layer: [B, S_l] True = masked filler
        if cache is not None:
            if self.method.decode is not None and c["layer_keep"]:
                self._evict(c, cache)
            setattr(cache, _STATE, dict(S=c["S"], keep=dict(c["layer_keep"]), dead=dict(c["layer_dead"])))
        final = c["keep"]
        if c["prompt"] is None and self._prompt is not None:   # generate()'s prefill: what use_cache=False steps
            seen = torch.zeros(final.shape[0], c["S"], dtype=torch.bool, device=final.device)   # show decode rows
            seen.scatter_(1, final, True)
            if c["has_dead"]:
                seen.scatter_(1, final, ~c["dead"].gather(1, final))
            self._prompt_seen = seen
        self.handle.inllm_layer_columns = dict(c["layer_keep"])   # what decode steps see (after the decode stage)
        self.handle._record_inllm(counts, N, sorted(c["cuts"]), c["scoring"], final,
                                  [_per_image(s, lambda p, im: im.positions.numel()) for s in c["samples"]],
                                  [_per_image(s, lambda p, im: p.numel()) for s in c["samples"]])
        self.handle._record_kept_inllm(c["layout"], sorted(c["cuts"]))   # handle.kept_patches() (vltok/kept.py)
        self.handle._add_seconds(time.perf_counter() - t0)   # this hook's own work
        return None

    def _evict(self, c, cache):
        """Decode-stage policy: layers >= evict_from(cuts) keep only the final survivors in their caches."""
        start = self.method.decode.evict_from(sorted(c["cuts"]))
        final = c["keep"]
        # never layer 0: HF reads the sequence length (decode positions, mask sizes) from layer 0's cache
        for i in range(max(start, 1), self.n_layers):
            cur = c["layer_keep"].get(i)
            if cur is None:
                cur = torch.arange(c["S"], device=final.device).expand(final.shape[0], -1)
            if cur.shape[1] == final.shape[1]:
                continue
            rel = torch.searchsorted(cur.contiguous(), final)
            layer = cache.layers[i]
            idx = rel.to(layer.keys.device)[:, None, :, None]
            layer.keys = layer.keys.gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
            c["layer_keep"][i] = final
            if c["has_dead"]:   # the final columns hold fillers (known on the host)
                c["layer_dead"][i] = c["dead"].gather(1, final)


def _put_rows(hidden: torch.Tensor, keep: torch.Tensor, merged) -> torch.Tensor:
    """The gathered hidden states [B, S', d] with the rows of merged survivors replaced (a new tensor): ``merged``
    is (absolute columns [B, R], rows [B, R, d]) from the batched cut, or per sample None / (columns [R], rows)."""
    if isinstance(merged, tuple):
        cols, rows = merged
        idx = torch.searchsorted(keep.contiguous(), cols.to(keep.device)).to(hidden.device)
        return hidden.scatter(1, idx[..., None].expand(-1, -1, hidden.shape[-1]), rows.to(hidden.dtype))
    hidden = hidden.clone()
    for b, m in enumerate(merged):
        if m is not None:
            hidden[b, torch.searchsorted(keep[b].contiguous(), m[0].to(keep.device)).to(hidden.device)] = \
                m[1].to(hidden.dtype)
    return hidden


def _to_device(t: torch.Tensor, dev) -> torch.Tensor:
    """A small host tensor to ``dev`` without a host sync: a blocking host-to-device copy waits for the stream, so
    CUDA copies go through pinned memory, asynchronously (the caching host allocator keeps the buffer alive)."""
    if torch.device(dev).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def _last_visual(layout) -> list[int]:
    """Per sample, the last visual column: free for split_runs' host positions (one read-back if a family's layout
    lives on the device)."""
    return torch.stack([torch.stack([im.positions.max() for im in imgs]).max() for imgs in layout]).tolist()


_last_visual._vltok_host = 0   # host-side work (eval/profile_vltok.py counts its read-backs: none)


def _expand_pending(pending, B: int):
    """The pending call for generate()'s expanded batch (beam search, num_return_sequences): HF repeats each sample
    ``B // b`` times in a row (repeat_interleave), so each sample's layout and mask are repeated the same way."""
    S, layout, am = pending
    if B % am.shape[0]:
        raise IncompatibleError(f"the LLM runs on {B} rows for {am.shape[0]} prompts; vltok's in-LLM stage expects "
                                "each prompt repeated the same number of times (beam search / num_return_sequences)")
    r = B // am.shape[0]
    return S, [imgs for imgs in layout for _ in range(r)], am.repeat_interleave(r, dim=0)


def _per_image(sample, count) -> list[int]:
    """Tokens per image of a sample (its grids plus the tokens outside them), image order."""
    out = {}
    for p, _, im in sample.images:
        out[im.image] = out.get(im.image, 0) + int(count(p, im)) + im.extra
    return [out[k] for k in sorted(out)]


def _check_cache(cache, name):
    if cache is None:
        return
    DynamicCache, DynamicLayer = cache_classes()

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or (layers and any(type(l) is not DynamicLayer for l in layers)):
        raise IncompatibleError(
            f"{name} prunes tokens inside the LLM, so every layer keeps its own cache length; it needs a plain "
            f"DynamicCache, got {type(cache).__name__}"
            f"{' with ' + ', '.join(sorted({type(l).__name__ for l in layers})) if layers else ''}. Use the default "
            "cache (no cache_implementation='static', no StaticCache / sliding-window / quantized cache)")


def split_runs(input_ids: torch.Tensor, token_id: int, counts: list[int]) -> list[list[torch.Tensor]]:
    """Per sample, the columns of each item's placeholder run: item j owns the next ``counts[j]`` columns holding
    ``token_id`` in row-major order (the order models splice features in). The columns are host tensors: the ids
    are read back once (one copy instead of a ``nonzero`` sync per sample); the engine moves them in one copy."""
    out, j = [], 0
    for row in input_ids.cpu():
        pos = (row == token_id).nonzero().flatten()
        runs, used = [], 0
        while used < pos.numel():
            if j >= len(counts):
                raise IncompatibleError(f"more placeholder tokens (id {token_id}) than images: check that the "
                                        "pixel values hold one entry per image")
            run = pos[used:used + counts[j]]
            if run.numel() != counts[j]:
                raise IncompatibleError(f"an image has {run.numel()} placeholder tokens, expected {counts[j]}; pass "
                                        "the processor's unmodified input_ids")
            runs.append(run)
            used += counts[j]
            j += 1
        out.append(runs)
    if j != len(counts):
        raise IncompatibleError(f"{len(counts)} images but {j} placeholder runs (id {token_id}) in input_ids")
    return out


split_runs._vltok_host = 1   # works on one host copy of the ids (eval/profile_vltok.py counts one read-back)
