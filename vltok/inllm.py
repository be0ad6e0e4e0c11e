"""The in-LLM stage engine: prune visual tokens before chosen decoder layers at prefill; decode on the pruned KV.

It knows neither a method nor a model family. The method's side of the contract is code: the Protocols
:class:`vltok.stages.InLLMPolicy` / :class:`vltok.stages.BatchedInLLMPolicy` / :class:`vltok.stages.DecodePolicy` and
the types they see (:class:`~vltok.stages.Cut`, :class:`~vltok.stages.Merge`, :class:`~vltok.stages.ImageView`,
:class:`~vltok.stages.BatchView`), re-exported here. The adapter's side: ``language_model()``, ``decoder_layers()``,
``attention(layer)``, ``apply_rope`` with its declared ``rope_convention``, ``install_saliency`` (adapters/base.py),
and per call :meth:`InLLMEngine.begin_call` with each sample's :class:`VisualImage` list. The mechanism (hooks,
gathered loop-level kwargs, per-layer caches) is described in docs/architecture.md, "In-LLM and decode stages".

Layout of this file: the per-call state (:class:`PrefillState`, :class:`DecodeState`), the scoring functions, the
three cut paths (:func:`cut_batched`, :func:`cut_per_sample`, :class:`CutGraphs` replaying the batched one), then the
engine that wires them to the model's hooks. Mask / position gathering lives in vltok/inllm_gather.py.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .compat import cache_classes, get_cache
from .errors import IncompatibleError
from .inllm_gather import (PreGathered, gather_at_cut, gather_loop_kwargs, gather_mask, gather_seq, mask_dead,
                           mask_evicted, put_rows, take)
from .kernels.select import cut_columns, last_row_scores
from .stages import (BatchedInLLMPolicy, BatchView, Cut, DecodePolicy, ImageView, InLLMPolicy,  # noqa: F401
                     Merge)   # re-exported: the method-facing types live in vltok.stages

_STATE = "_vltok_inllm"   # attribute on the DynamicCache: its DecodeState
_MAX_GRAPHS = 32          # cut graphs (and shapes seen once) kept per patched model; each holds its input buffers
ROPE_CONVENTIONS = ("rotate_half", "custom")   # an adapter's ``rope_convention`` (see PlaceholderAdapter)


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


# -- per-call state -----------------------------------------------------------------------------------------------
class PendingCall(NamedTuple):
    """What the adapter's forward wrapper announced for the next LLM call: its length, layout and 2-D mask."""

    S: int
    layout: list            # per sample, a list of VisualImage
    am: torch.Tensor        # [B, S] attention mask (ones when the caller passed none)


@dataclass
class _Sample:
    """One sample on the per-sample path: per image [absolute columns of its current survivors, their raster indices,
    its VisualImage]."""

    images: list = field(default_factory=list)


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


@dataclass
class _Gathered:
    """The loop-level kwargs gathered at the current kept columns, and the tensors they were gathered from (HF hands
    every layer the same ones, so they are gathered once per cut)."""

    keep: torch.Tensor
    src: tuple            # (cos or None, position ids, mask) as passed to the layer
    out: dict             # the replaced kwargs
    dead: torch.Tensor | None


@dataclass
class PrefillState:
    """The engine's state for one prefill (one LLM forward that carries the images), from ``_lm_start`` to
    ``_lm_end``. Exactly one of ``slots`` (every sample has the same grids: the batched path) and ``samples`` (the
    per-sample path) describes the current survivors of each image."""

    S: int                              # the call's sequence length
    cuts: dict                          # layer -> Cut
    layout: list                        # per sample, its VisualImage list
    am: torch.Tensor                    # [B, S] attention mask (prompt columns; generated columns 0 in use_cache=False)
    keep: torch.Tensor                  # [B, S_cur] the current kept columns (absolute, ascending)
    ref: int                            # the sample the plan was made from (the first with images)
    n0: int                             # the ref sample's visual tokens in grids
    slots: list | None                  # list[_Slot] on the batched path
    samples: list                       # list[_Sample] on the per-sample path
    prompt: int | None = None           # generate(use_cache=False) step: the prompt length (None: a real prefill)
    qk: dict = field(default_factory=dict)          # "q" / "k": the captured projections of the layer before a cut
    per_layer: dict = field(default_factory=dict)   # layer -> visual tokens entering it (ref sample), at cuts
    layer_keep: dict = field(default_factory=dict)  # layer -> kept columns [B, S_l] it ran on
    layer_dead: dict = field(default_factory=dict)  # layer -> [B, S_l] filler columns masked as keys
    dead: torch.Tensor | None = None    # [B, S] filler columns (per-sample path of a ragged batch)
    has_dead: bool = False              # the current columns hold fillers
    cut_done: bool = False              # a cut ran (before it, every layer runs as it would)
    scoring: float = 0.0                # host seconds inside the engine's hooks
    cache: object = None                # the call's DynamicCache (None: use_cache=False)
    gathered: _Gathered | None = None
    pre_gathered: PreGathered | None = None   # what the last cut gathered with the hidden rows
    text_rows: tuple | None = None      # see text_rows()
    last_abs: torch.Tensor | None = None   # see last_real()

    def last_real(self) -> torch.Tensor:
        """[B, 1] each sample's last real column (absolute), computed once per call."""
        if self.last_abs is None:
            self.last_abs = torch.where(self.am != 0, torch.arange(self.am.shape[1], device=self.am.device),
                                        -1).amax(1, keepdim=True)
        return self.last_abs

    def query_text_rows(self):
        """Per sample, the columns after its last visual token [B, R] (padded) and which are real tokens [B, R];
        computed once per call from the layout's positions (host tensors from split_runs: no sync)."""
        if self.text_rows is None:
            S, dev = self.S, self.am.device
            last = _last_visual(self.layout)
            R = max(1, S - 1 - min(last))
            rows = torch.tensor(last)[:, None] + 1 + torch.arange(R)
            inside = rows <= S - 1
            rows = _to_device(rows.clamp(max=S - 1), dev)
            valid = _to_device(inside, dev) & self.am.gather(1, rows).bool()
            self.text_rows = (rows, valid)
        return self.text_rows

    def samples_from_slots(self) -> list:
        """The per-sample view of the batched slots (when a cut falls back to the per-sample path)."""
        return [_Sample([[sl.pos[b], sl.raster[b], im] for sl, im in zip(self.slots, imgs)])
                for b, imgs in enumerate(self.layout)]


@dataclass
class DecodeState:
    """Stored on the DynamicCache after a pruned prefill: what each decode step's layers see of the prompt."""

    S: int          # the prefill's length
    keep: dict      # layer -> kept prefill columns [B, S_l] in its cache
    dead: dict      # layer -> [B, S_l] filler columns masked as keys


# -- scoring ------------------------------------------------------------------------------------------------------
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


def scores_last(st: PrefillState, cut: Cut, pe, q, k, attn, prev, rope_convention: str):
    """The last-token criterion in two launches (vltok.kernels.select.last_row_scores), as a function of the
    scored columns -> [B, 1, K]; None where that kernel does not apply (other queries, another rotary)."""
    if cut.query != "last":
        return None
    cos = sin = None
    if cut.rope:
        if pe is None or len(pe) != 2 or pe[0].dim() != 3 or pe[0].shape[0] not in (1, prev.shape[0]) \
                or rope_convention != "rotate_half":
            return None
        cos, sin = pe
    last = st.last_real()
    # its current index: the last current column at or before it (the last real token is text unless the
    # prompt ends with an image, whose last token a cut may have dropped)
    rows = (torch.searchsorted(prev, last, right=True) - 1)[:, 0] if st.cut_done else last[:, 0]
    norm_all = cut.softmax == "all"

    def scores(keys):
        return last_row_scores(q, k, rows, keys, attn.scaling, norm_all=norm_all, prev=prev,
                               am=st.am if norm_all else None, cos=cos, sin=sin)[:, None]
    return scores


def scores_batched(st: PrefillState, cut: Cut, pe, q, k, attn, prev, vis, apply_rope):
    """[B, R, n_vis] attention of the cut's query rows to the slots' current visual columns ``vis``."""
    B, Sc = prev.shape
    dev = prev.device
    ar = torch.arange(Sc, device=dev)
    amc = st.am.gather(1, prev).bool()
    last = torch.where(amc, ar, -1).amax(1, keepdim=True)             # the last real column
    valid = None
    if cut.query == "last":
        rows = last
    else:                                                             # real columns after the sample's images
        rows_abs, valid = st.query_text_rows()
        rows = torch.searchsorted(prev, rows_abs).clamp(max=Sc - 1)
        anyv = valid.any(1, keepdim=True)                             # none: the last real column instead
        rows = torch.cat([torch.where(anyv, rows[:, :1], last), rows[:, 1:]], 1)
        valid = torch.cat([valid[:, :1] | ~anyv, valid[:, 1:]], 1)
    keys = vis if cut.softmax == "visual" else None                    # None: every current column
    qr = take(q, rows)
    kk = k if keys is None else take(k, keys)
    if cut.rope:
        at_rows = prev.gather(1, rows)
        at_keys = prev if keys is None else prev.gather(1, keys)
        cr, sr = (gather_seq(t, at_rows, -2) for t in pe)
        ck, sk = (gather_seq(t, at_keys, -2) for t in pe)
        # rows and keys have different lengths: rotate each as "q" (the one-head "k" is a throw-away)
        qr = apply_rope(qr.transpose(1, 2), qr[:, :, :1].transpose(1, 2), cr, sr)[0].transpose(1, 2)
        kk = apply_rope(kk.transpose(1, 2), kk[:, :, :1].transpose(1, 2), ck, sk)[0].transpose(1, 2)
    ok = None if keys is not None else amc[:, None, :] & (ar[None, None, :] <= rows[:, :, None])
    probs = attention_rows_batched(qr, kk, ok, attn.scaling)          # [B, R, K]
    if keys is None:
        probs = probs.gather(2, vis[:, None, :].expand(-1, probs.shape[1], -1))
    if valid is not None:                                             # padded query rows score nothing
        probs = torch.where(valid[:, :, None], probs, 0.0)
    return probs


# -- the three cut paths ------------------------------------------------------------------------------------------
# Each returns the new kept columns [B, S'] (absolute, ascending) and the merged rows (None, or what put_rows
# takes); the batched path also the survivors' indices into the current sequence (the per-sample path's caller
# computes them). They update the call's survivors (st.slots / st.samples, st.dead, st.has_dead).


def cut_batched(st: PrefillState, cut: Cut, pe, q, k, attn, hidden, policy, adapter):
    """The cut for batched slots: a fixed number of launches for the whole batch, no host sync (every count
    is known on the host from the shapes). Returns (new, rel, merged), or None when the method declines
    (``select_batch`` -> None; nothing has changed then)."""
    prev = st.keep.contiguous()
    Sc = prev.shape[1]
    dev = prev.device
    slots = st.slots
    # current indices of each slot's tokens (before the first cut the current columns are the absolute ones)
    cur = [torch.searchsorted(prev, sl.pos) if st.cut_done else sl.pos for sl in slots]
    vis = cur[0] if len(cur) == 1 else torch.cat(cur, 1)
    probs = None
    if cut.scores:
        probs = scores_last(st, cut, pe, q, k, attn, prev, adapter.rope_convention)
        probs = scores_batched(st, cut, pe, q, k, attn, prev, vis, adapter.apply_rope) if probs is None \
            else probs(vis)
    sels, merged, off = [], [], 0
    for sl, cj in zip(slots, cur):
        n_cur = sl.pos.shape[1]
        view = BatchView(sl.grid, sl.n, sl.raster, sl.saliency, take(hidden, cj) if hidden is not None else None)
        sel = policy.select_batch(cut, view, probs[:, :, off:off + n_cur] if probs is not None else None)
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
    st.has_dead = False
    if merged:   # current indices of the merged survivors -> their absolute columns
        merged = (prev.gather(1, torch.cat([m[0] for m in merged], 1)), torch.cat([m[1] for m in merged], 1))
    return new, rel, merged or None


def _sample_scores(cut: Cut, q_b, k_b, am_b, vis, Sc: int, attn):
    """One sample's [R, n_vis] attention of the cut's query rows to its current visual columns ``vis``."""
    real = am_b.nonzero().flatten()
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
        keys = torch.arange(Sc, device=am_b.device)
        ok = am_b[None, :] & (keys[None, :] <= rows[:, None])
    probs = attention_rows(q_b[rows], k_b[keys], ok, attn.scaling)
    return probs if cut.softmax == "visual" else probs[:, vis]


def _select_image(policy, cut: Cut, view: ImageView, scores, p: torch.Tensor, name: str):
    """One image's survivors at a cut (per-sample path): (their indices into ``p`` ascending, merged (columns,
    rows) or None)."""
    sel = policy.select(cut, view, scores)
    if isinstance(sel, Merge):
        idx = sel.indices.to(p.device)
        if idx.numel() > 1 and not bool((idx.diff() > 0).all()):
            raise RuntimeError(f"{name}: a Merge's indices must be strictly ascending")
        return idx, (p[idx], sel.rows)
    return sel.to(p.device).unique(sorted=True), None


def _pad_ragged(st: PrefillState, new_rows) -> torch.Tensor:
    """Samples that kept fewer columns are padded with some of their dropped columns, marked dead: masked as keys in
    every later layer and at decode, so the batch stays rectangular (spec feather.md §9 (b))."""
    counts = [int(live.sum()) for _, live in new_rows]
    width = max(counts)
    out = []
    for b, ((row, live), n) in enumerate(zip(new_rows, counts)):
        fill = (~live).nonzero().flatten()[:width - n]
        live = live.clone()
        live[fill] = True
        st.dead[b, row[fill]] = True
        out.append(row[live])
    st.has_dead = any(n < width for n in counts)   # the new columns hold fillers: mask them from now on
    return torch.stack(out)


def cut_per_sample(st: PrefillState, cut: Cut, pe, q, k, attn, hidden, policy, adapter, name: str):
    """The general cut (ragged batches): per sample, filler columns where samples keep different counts.
    Returns the new columns [B, S'] and the merged rows (a list per sample of (columns [R], rows [R, d]), or
    None)."""
    prev = st.keep
    Sc = prev.shape[1]
    if cut.scores and cut.rope:
        cos, sin = (gather_seq(t, prev, -2) for t in pe) if prev.shape[1] != pe[0].shape[-2] else pe
        qr, kr = adapter.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        q, k = qr.transpose(1, 2), kr.transpose(1, 2)
    if st.dead is None:   # filler columns of ragged samples (only this path makes them)
        st.dead = torch.zeros(prev.shape[0], st.S, dtype=torch.bool, device=prev.device)
    am = gather_seq(st.am, prev, -1).bool() & ~st.dead.gather(1, prev)   # fillers are no keys
    new_rows, merged = [], []
    for b, s in enumerate(st.samples):
        if not s.images:   # a text-only sample in a batch with images: every column stays
            new_rows.append((prev[b], ~st.dead[b, prev[b]]))
            merged.append(None)
            continue
        pos_in_cur = [torch.searchsorted(prev[b], p) for p, _, _ in s.images]
        vis = torch.cat(pos_in_cur)
        probs = _sample_scores(cut, q[b], k[b], am[b], vis, Sc, attn) if cut.scores and vis.numel() else None
        before = torch.cat([p for p, _, _ in s.images])
        off, cols, rows_new = 0, [], []
        for j, (p, raster, im) in enumerate(s.images):
            n_cur = p.numel()
            h_j = hidden[b, pos_in_cur[j]] if hidden is not None else None
            view = ImageView(im.grid, int(im.positions.numel()), raster, im.protected, im.saliency, h_j)
            sel, m = _select_image(policy, cut, view, probs[:, off:off + n_cur] if probs is not None else None, p,
                                   name)
            if m is not None:
                cols.append(m[0])
                rows_new.append(m[1])
            s.images[j] = [p[sel], raster[sel], im]
            off += n_cur
        merged.append((torch.cat(cols), torch.cat(rows_new)) if cols else None)
        after = torch.cat([p for p, _, _ in s.images])
        dropped = before[~torch.isin(before, after)]
        live = ~torch.isin(prev[b], dropped) & ~st.dead[b, prev[b]]
        new_rows.append((prev[b], live))
    return _pad_ragged(st, new_rows), (merged if any(m is not None for m in merged) else None)


class CutGraphs:
    """The batched cut of a method that declares ``graph_safe`` (its ``select_batch`` is sync-free index work) on
    CUDA, replayed from a CUDA graph: the first call of a shape runs eagerly (compiling the kernels), the second
    captures scores, selection, compaction and the gather of the survivors' rows, later ones copy the inputs into
    the graph's buffers and replay it, a dozen host calls instead of ~70 launches' Python. ``entries``: per shape key,
    "seen" (once, eagerly), "off" (cannot be captured: eager from now on) or the captured graph (a dict); at most
    ``_MAX_GRAPHS`` of them, oldest dropped first. ``vltok.patch(..., cut_graphs=False)`` turns it off."""

    def __init__(self):
        self.entries: dict = {}

    def clear(self) -> None:
        self.entries.clear()

    def run(self, st: PrefillState, cut: Cut, hidden, kw: dict, eager, name: str):
        """The survivors' hidden rows (``st`` updated as the eager cut does), or None for the eager path.
        ``eager(cut, pe, hidden, kw) -> (new, merged, hidden, PreGathered)`` is the eager cut and gather."""
        pe = kw.get("position_embeddings")
        pid = kw.get("position_ids") if isinstance(kw.get("position_ids"), torch.Tensor) else None
        if pe is not None and not (len(pe) == 2 and pe[0].dim() == 3):
            return None
        slots = st.slots
        ins = [st.qk.get("q"), st.qk.get("k"), hidden, st.keep, st.am, st.last_real(), *(pe or (None, None)), pid,
               *[sl.pos for sl in slots], *[sl.raster for sl in slots]]
        key = (cut, st.cut_done, tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in ins))
        entry = self.entries.get(key)
        if entry is None:                    # first sight of this shape: the eager cut (compiles, fills caches)
            while len(self.entries) >= _MAX_GRAPHS:   # many prompt lengths: drop the oldest shape's graph
                self.entries.pop(next(iter(self.entries)))
            self.entries[key] = "seen"
            return None
        if entry == "off":
            return None
        if entry == "seen":
            entry = self.entries[key] = self._capture(st, cut, kw, ins, eager, name) or "off"
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
        st.keep, st.cut_done, st.has_dead = new, True, False
        # what the captured gather recorded, with this call's loop-level tensors where it used them
        st.pre_gathered = PreGathered(new, pe[0] if entry["pe_used"] else None, entry["pe"],
                                      pid if entry["pid_used"] else None, entry["pid"])
        return entry["hidden"]

    @staticmethod
    def _capture(st: PrefillState, cut: Cut, kw: dict, ins: list, eager, name: str):
        """Capture the eager cut on static copies of ``ins`` (see run); None when it cannot be captured."""
        slots = st.slots
        static = [None if t is None else t.clone() for t in ins]
        s_q, s_k, s_hidden, s_keep, s_am, s_last, s_cos, s_sin, s_pid = static[:9]
        n = len(slots)
        live = (st.keep, st.am, st.last_abs, st.qk, [(sl.pos, sl.raster) for sl in slots])
        st.keep, st.am, st.last_abs, st.qk = s_keep, s_am, s_last, {"q": s_q, "k": s_k}
        for sl, pos, raster in zip(slots, static[9:9 + n], static[9 + n:]):
            sl.pos, sl.raster = pos, raster
        pe = None if s_cos is None else (s_cos, s_sin)
        kw_s = dict(kw, position_embeddings=pe, position_ids=s_pid if s_pid is not None else kw.get("position_ids"))
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                new, merged, hidden, pre = eager(cut, pe, s_hidden, kw_s)
            if merged is not None:
                raise RuntimeError("a merge cannot be replayed")
        except Exception as e:   # a method that syncs or merges: eager from now on, for this shape
            warnings.warn(f"{name}: the cut before layer {cut.layer} runs eagerly ({e})", stacklevel=2)
            entry = None
        else:
            entry = {"graph": graph, "in": static, "new": new, "hidden": hidden, "pe": pre.pe, "pid": pre.pid,
                     "pe_used": pre.pe_src is not None, "pid_used": pre.pid_src is not None,
                     "pos": [sl.pos for sl in slots], "raster": [sl.raster for sl in slots]}
        st.keep, st.am, st.last_abs, st.qk = live[:4]
        for sl, (pos, raster) in zip(slots, live[4]):
            sl.pos, sl.raster = pos, raster
        return entry


# -- the engine ---------------------------------------------------------------------------------------------------
class InLLMEngine:
    """Wires an :class:`~vltok.stages.InLLMPolicy` (``method.in_llm``) to a model through its adapter: hooks on the
    LLM (start / end of its forward) and on every decoder layer; per call a :class:`PrefillState`, per decode step
    the cache's :class:`DecodeState`."""

    def __init__(self, adapter, method, handle):
        self.adapter, self.method, self.handle = adapter, method, handle
        self._pending: PendingCall | None = None   # the next LLM call, announced by the adapter's forward wrapper
        self._prompt_seen = None  # [B, S] the prompt columns decode rows see (after a decode stage's eviction)
        self._prompt: PendingCall | None = None    # the prefill in generate(): use_cache=False steps cut it again
        self._call: PrefillState | None = None     # per-call prefill state
        self._decode: DecodeState | None = None    # state of a decode step (read from the cache)
        self._capture = []       # this call's q / k capture hooks (registered at prefill for the cut layers)
        self.graphs = CutGraphs()
        self._aranges = {}       # shared read-only index rows (see _arange)

    @property
    def policy(self) -> InLLMPolicy:
        return self.method.in_llm

    @property
    def _graphs(self) -> dict:
        """The cut graphs per shape (CutGraphs.entries)."""
        return self.graphs.entries

    # -- installation ------------------------------------------------------------------------------------------
    def attach(self, undo: list) -> None:
        ad = self.adapter
        lm = ad.language_model()
        layers = list(ad.decoder_layers())
        self.n_layers = len(layers)
        if ad.rope_convention not in ROPE_CONVENTIONS:
            raise IncompatibleError(f"vltok's {ad.family} adapter declares rope_convention={ad.rope_convention!r}; "
                                    f"the in-LLM engine knows {', '.join(map(repr, ROPE_CONVENTIONS))}")
        validate = getattr(self.policy, "validate", None)
        if validate is not None:
            validate(self.n_layers)   # refuse impossible budgets at patch time, before any hook is installed
        if getattr(self.policy, "needs_saliency", False) and not ad.install_saliency(self, undo):
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
        undo.append(self.graphs.clear)
        undo.append(self._aranges.clear)

    # -- called by the adapter ---------------------------------------------------------------------------------
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
        if self._prompt is not None and self.adapter._in_generate and ids.shape[1] > self._prompt.S:
            self._pending = None   # a use_cache=False step that brings the images again: _lm_start cuts the prompt
            return
        self._prompt = None
        if not any(len(imgs) for imgs in layout):
            self._pending = None
            return
        am = call.get("attention_mask")
        am = torch.ones_like(ids) if am is None else am
        self._pending = PendingCall(ids.shape[1], layout, am)

    def set_saliency(self, per_image: list[torch.Tensor]) -> None:
        """Called by the adapter's vision-tower hook: one [n] score per grid of the pending call, sample-major."""
        if self._pending is None:
            return
        flat = [im for imgs in self._pending.layout for im in imgs]
        if len(flat) != len(per_image) or any(im.positions.numel() != sc.numel() for im, sc in zip(flat, per_image)):
            raise IncompatibleError(f"{self.method.name}: the vision tower scored {len(per_image)} grid(s) but the "
                                    f"inputs hold {len(flat)}; pass one image per placeholder run")
        for im, sc in zip(flat, per_image):
            im.saliency = sc.float()

    # -- the LLM's forward: start and end ----------------------------------------------------------------------
    def _lm_start(self, module, args, kwargs):
        t0 = time.perf_counter()
        self._drop_capture()
        self._call, self._decode = None, None
        pending, self._pending = self._pending, None
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            emb = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3 else None
        B, S = (emb if emb is not None else kwargs["input_ids"]).shape[:2]
        cache = get_cache(kwargs)
        if pending is not None and B != pending.am.shape[0]:
            pending = _expand_pending(pending, B)   # beams / num_return_sequences: rows repeated
        if pending is not None and pending.S == S:
            _check_cache(cache, self.method.name)
            if cache is not None and cache.get_seq_length() > 0:
                raise IncompatibleError(f"{self.method.name}: the images must be in the first (prefill) call on a "
                                        "cache; chunked prefill / continuing a filled cache is not supported")
            self._prompt = pending if self.adapter._in_generate else None
            self._call = self._start_prefill(S, pending.layout, pending.am)
            self._call.scoring += time.perf_counter() - t0
        elif cache is not None and getattr(cache, _STATE, None) is not None:
            self._decode = getattr(cache, _STATE)
        elif (self._prompt is not None and self.adapter._in_generate and S > self._prompt.S
              and (cache is None or cache.get_seq_length() == 0)):
            # generate(use_cache=False): every step re-runs prompt + generated tokens. The prompt's columns are cut
            # as at prefill (the same scores: the query stays the prompt's last token, whose rows do not see later
            # columns), the generated columns are kept and never queried, so the tokens equal the cached run's.
            P, layout, am = self._prompt
            if B != am.shape[0]:
                P, layout, am = _expand_pending(self._prompt, B)
            self._call = self._start_prefill(S, layout, torch.cat([am, am.new_zeros(am.shape[0], S - P)], 1),
                                             prompt=P)
            self._call.scoring += time.perf_counter() - t0
        return None

    def _start_prefill(self, S, layout, am, prompt=None) -> PrefillState:
        sizes = [[int(im.positions.numel()) for im in imgs] for imgs in layout]
        ref = next(b for b, imgs in enumerate(layout) if imgs)   # the plan's sample: the first one with images
        first = [(int(im.positions.numel()), im.grid) for im in layout[ref]]
        kw = {}
        if any(im.native is not None for im in layout[ref]):   # a vision stage merged tokens: keep is relative to
            kw["native"] = [im.native or n for im, (n, _) in zip(layout[ref], first)]   # the native count
        cuts = sorted((c for c in self.policy.plan(self.n_layers, first, **kw) if 1 <= c.layer < self.n_layers),
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
        st = PrefillState(S=S, cuts={c.layer: c for c in cuts}, layout=layout, am=am.to(dev),
                          keep=self._arange(B, S, dev), ref=ref, n0=sum(sizes[ref]), slots=slots, samples=samples,
                          prompt=prompt)
        for c in cuts:   # q / k projections are captured only where a cut reads them, only for this call
            if c.scores:
                attn = self._attn[c.layer - 1]
                self._capture += [attn.q_proj.register_forward_hook(self._capture_hook("q")),
                                  attn.k_proj.register_forward_hook(self._capture_hook("k"))]
        return st

    def _slots(self, layout, dev):
        """Batched image slots when every sample holds the same grids and the method selects a slot at once
        (``select_batch``); None for the per-sample path (ragged batches, or a ``select`` replaced on the instance,
        which the engine then honours)."""
        sel = self.policy
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
                self._call.qk[which] = out
        return hook

    def _drop_capture(self):
        """Remove this call's q / k capture hooks (at the end of the LLM's forward, the start of the next one, and
        at unpatch)."""
        while self._capture:
            self._capture.pop().remove()

    def _lm_end(self, module, args, kwargs, output):
        t0 = time.perf_counter()
        c, self._call = self._call, None
        self._decode = None
        self._drop_capture()
        if c is None:
            return None
        if c.slots is not None:   # the same grids in every sample: per-image counts from the slots' shapes
            c.samples = [_Sample([[sl.pos[b], None, im] for sl, im in zip(c.slots, imgs)])
                         for b, imgs in enumerate(c.layout)]
        L, N = self.n_layers, c.n0 + sum(im.extra for _, _, im in c.samples[c.ref].images)
        counts, n = [], N
        for i in range(L):
            n = c.per_layer.get(i, n)
            counts.append(n)
        cache = c.cache
        self.handle.inllm_prefill_columns = dict(c.layer_keep)   # per layer: kept prefill columns [B, S_l]
        self.handle.inllm_dead_columns = dict(c.layer_dead)      # per layer: [B, S_l] True = masked filler
        if cache is not None:
            if self.method.decode is not None and c.layer_keep:
                self._evict(c, cache)
            setattr(cache, _STATE, DecodeState(c.S, dict(c.layer_keep), dict(c.layer_dead)))
        final = c.keep
        if c.prompt is None and self._prompt is not None:   # generate()'s prefill: what use_cache=False steps
            seen = torch.zeros(final.shape[0], c.S, dtype=torch.bool, device=final.device)   # show decode rows
            seen.scatter_(1, final, True)
            if c.has_dead:
                seen.scatter_(1, final, ~c.dead.gather(1, final))
            self._prompt_seen = seen
        self.handle.inllm_layer_columns = dict(c.layer_keep)   # what decode steps see (after the decode stage)
        self.handle.recorder.inllm(counts, N, sorted(c.cuts), c.scoring, final,
                                  [_per_image(s, lambda p, im: im.positions.numel()) for s in c.samples],
                                  [_per_image(s, lambda p, im: p.numel()) for s in c.samples])
        self.handle.recorder.kept_inllm(c.layout, sorted(c.cuts))   # handle.kept_patches() (vltok/kept.py)
        self.handle.recorder.seconds(time.perf_counter() - t0)   # this hook's own work
        return None

    def _evict(self, c: PrefillState, cache):
        """Decode-stage policy: layers >= evict_from(cuts) keep only the final survivors in their caches."""
        start = self.method.decode.evict_from(sorted(c.cuts))
        final = c.keep
        # never layer 0: HF reads the sequence length (decode positions, mask sizes) from layer 0's cache
        for i in range(max(start, 1), self.n_layers):
            cur = c.layer_keep.get(i)
            if cur is None:
                cur = torch.arange(c.S, device=final.device).expand(final.shape[0], -1)
            if cur.shape[1] == final.shape[1]:
                continue
            rel = torch.searchsorted(cur.contiguous(), final)
            layer = cache.layers[i]
            idx = rel.to(layer.keys.device)[:, None, :, None]
            layer.keys = layer.keys.gather(2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
            layer.values = layer.values.gather(2, idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
            c.layer_keep[i] = final
            if c.has_dead:   # the final columns hold fillers (known on the host)
                c.layer_dead[i] = c.dead.gather(1, final)

    # -- every decoder layer -----------------------------------------------------------------------------------
    def _layer_hook(self, i):
        def hook(module, args, kwargs):
            c = self._call
            if c is not None:
                t0 = time.perf_counter()
                try:
                    return self._prefill_layer(i, args, kwargs)
                finally:
                    c.scoring += time.perf_counter() - t0
            d = self._decode
            if d is not None and i in d.keep:
                return self._decode_layer(d, i, args, kwargs)
            return None
        return hook

    def _impl(self) -> str:
        return getattr(self._attn[0].config, "_attn_implementation", "sdpa") or "sdpa"

    def _flash(self) -> bool:
        return self.adapter.model.config._attn_implementation.startswith("flash")

    def _decode_layer(self, d: DecodeState, i: int, args, kwargs):
        """A decode step at layer i: the mask's key axis gathered to (kept prefill columns, new columns), fillers
        masked."""
        mask = kwargs.get("attention_mask")
        dead = d.dead.get(i)
        if isinstance(mask, torch.Tensor):
            keep = d.keep[i]
            K = mask.shape[-1]
            new = torch.arange(d.S, K, device=keep.device).expand(keep.shape[0], -1)
            mask = gather_mask(mask, None, torch.cat([keep, new], 1))
        if dead is not None:
            q = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
            if isinstance(mask, torch.Tensor):
                K = mask.shape[-1]
            else:                           # this step's keys: the layer's cache plus the new tokens
                K = get_cache(kwargs).layers[i].keys.shape[-2] + q
            pad = torch.zeros(dead.shape[0], K - dead.shape[1], dtype=torch.bool, device=dead.device)
            mask = mask_dead(mask, torch.cat([dead, pad], 1), prefill=False, impl=self._impl(), q=q)
        if isinstance(mask, torch.Tensor):
            return args, dict(kwargs, attention_mask=mask)
        return None

    def _prefill_layer(self, i, args, kwargs):
        c = self._call
        if c.cache is None and get_cache(kwargs) is not None:
            c.cache = get_cache(kwargs)
            _check_cache(c.cache, self.method.name)
        if not c.cut_done and i not in c.cuts:   # before the first cut every layer runs as it would
            if self._evicts(i):
                return args, dict(kwargs, attention_mask=self._mask_evicted(kwargs.get("attention_mask"), c.keep))
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        kw = dict(kwargs)
        if i in c.cuts:
            hidden = self._run_cut(c.cuts[i], hidden, kw)
            if c.slots is not None:   # visual tokens entering this layer and the next ones up to the next cut
                c.per_layer[i] = sum(sl.pos.shape[1] + sl.extra for sl in c.slots)
            else:
                c.per_layer[i] = sum(p.numel() + im.extra for p, _, im in c.samples[c.ref].images)
        keep = c.keep
        c.layer_keep[i] = keep
        # HF hands every layer the same loop-level position embeddings / ids / mask: gather them once per cut
        g = c.gathered
        pe, pid, m = kw.get("position_embeddings"), kw.get("position_ids"), kw.get("attention_mask")
        src = (pe[0] if pe is not None else None, pid, m)
        if g is None or g.keep is not keep or any(a is not b for a, b in zip(g.src, src)):
            dead = c.dead.gather(1, keep) if c.has_dead else None   # fillers (known on the host)
            pre, c.pre_gathered = c.pre_gathered, None
            out = gather_loop_kwargs(kw, keep, pre, self._flash(), dead, self._impl())
            g = c.gathered = _Gathered(keep, src, out, dead)
        if g.dead is not None:
            c.layer_dead[i] = g.dead
        kw.update(g.out)
        if self._evicts(i):
            kw["attention_mask"] = self._mask_evicted(kw.get("attention_mask"), keep)
        if args:
            return (hidden, *args[1:]), kw
        kw["hidden_states"] = hidden
        return args, kw

    def _evicts(self, i) -> bool:
        """A use_cache=False step of generate() whose decode stage evicted layer i's cache in the cached run."""
        c = self._call
        if c.prompt is None or self.method.decode is None or self._prompt_seen is None or not c.cuts:
            return False
        return i >= max(self.method.decode.evict_from(sorted(c.cuts)), 1)

    def _mask_evicted(self, m, keep):
        return mask_evicted(m, keep, self._call.prompt, self._prompt_seen, self._impl(), self.method.name)

    # -- the cut -----------------------------------------------------------------------------------------------
    def _may_graph(self, cut: Cut, hidden) -> bool:
        """Whether this cut may run from a CUDA graph (CutGraphs): CUDA, batched slots, last-token scores, a
        ``graph_safe`` method, the handle's ``cut_graphs`` not False, not inside an outer capture (vltok.fast)."""
        return (hidden.is_cuda and self._call.slots is not None and cut.scores and cut.query == "last"
                and not cut.hidden and getattr(self.policy, "graph_safe", False)
                and self.handle.cut_graphs is not False
                and not torch.cuda.is_current_stream_capturing())

    def _run_cut(self, cut: Cut, hidden, kw: dict):
        """The cut before a layer: the call's survivors updated, the survivors' hidden rows returned."""
        c = self._call
        if self._may_graph(cut, hidden):
            out = self.graphs.run(c, cut, hidden, kw, self._cut_and_gather, self.method.name)
            if out is not None:
                return out
        new, merged, hidden, pre = self._cut_and_gather(cut, kw.get("position_embeddings"), hidden, kw)
        c.keep, c.cut_done, c.pre_gathered = new, True, pre
        if merged is not None:
            hidden = put_rows(hidden, new, merged)
        return hidden

    def _cut_and_gather(self, cut: Cut, pe, hidden, kw: dict):
        """The eager cut and the gather of the survivors' rows: (new columns, merged rows or None, hidden rows,
        PreGathered). Does not touch ``keep`` (the caller or the graph's replay sets it)."""
        new, rel, merged = self._cut(cut, pe, hidden)
        hidden, pre = gather_at_cut(hidden, rel, new, kw, self._flash())
        return new, merged, hidden, pre

    def _cut(self, cut: Cut, pe, hidden):
        """Score the current survivors from layer cut.layer-1's q/k; return the new kept columns [B, S'], their
        indices into the current sequence [B, S'] and the merged rows (None, or what put_rows takes)."""
        c = self._call
        attn = self._attn[cut.layer - 1]
        q = k = None
        if cut.scores:
            q_out, k_out = c.qk.get("q"), c.qk.get("k")
            if q_out is None or k_out is None:
                raise RuntimeError(f"vltok: no q/k captured at layer {cut.layer - 1}")
            B, Sc = q_out.shape[:2]
            q = q_out.view(B, Sc, -1, attn.head_dim)
            k = k_out.view(B, Sc, -1, attn.head_dim)
        if not cut.hidden:
            hidden = None
        if c.slots is not None:
            out = cut_batched(c, cut, pe, q, k, attn, hidden, self.policy, self.adapter)
            if out is not None:
                return out
            c.samples = c.samples_from_slots()   # the method cannot select this cut batched
            c.slots = None
        prev = c.keep
        new, merged = cut_per_sample(c, cut, pe, q, k, attn, hidden, self.policy, self.adapter, self.method.name)
        return new, torch.searchsorted(prev.contiguous(), new), merged


# -- layout helpers -----------------------------------------------------------------------------------------------
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


_last_visual._vltok_host = 0   # host-side work (eval/tools/profile_vltok.py counts its read-backs: none)


def _expand_pending(pending: PendingCall, B: int) -> PendingCall:
    """The pending call for generate()'s expanded batch (beam search, num_return_sequences): HF repeats each sample
    ``B // b`` times in a row (repeat_interleave), so each sample's layout and mask are repeated the same way."""
    S, layout, am = pending
    if B % am.shape[0]:
        raise IncompatibleError(f"the LLM runs on {B} rows for {am.shape[0]} prompts; vltok's in-LLM stage expects "
                                "each prompt repeated the same number of times (beam search / num_return_sequences)")
    r = B // am.shape[0]
    return PendingCall(S, [imgs for imgs in layout for _ in range(r)], am.repeat_interleave(r, dim=0))


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


def split_runs(input_ids: torch.Tensor, token_id: int, counts: list[int],
               kind: str = "image") -> list[list[torch.Tensor]]:
    """Per sample, the columns of each item's placeholder run: item j owns the next ``counts[j]`` columns holding
    ``token_id`` in row-major order (the order models splice features in). The columns are host tensors: the ids
    are read back once (one copy instead of a ``nonzero`` sync per sample); the engine moves them in one copy.
    A count mismatch raises IncompatibleError starting with the model's own phrase for it ("Image features and
    image tokens do not match", ``kind`` "video": "Video ..."), so code that catches the model's error keeps working
    (peer suite: test_mismatching_num_image_tokens under fastv)."""
    phrase = f"{kind.capitalize()} features and {kind} tokens do not match: "
    out, j = [], 0
    for row in input_ids.cpu():
        pos = (row == token_id).nonzero().flatten()
        runs, used = [], 0
        while used < pos.numel():
            if j >= len(counts):
                raise IncompatibleError(f"{phrase}more placeholder tokens (id {token_id}) than {kind}s: check "
                                        f"that the pixel values hold one entry per {kind}")
            run = pos[used:used + counts[j]]
            if run.numel() != counts[j]:
                raise IncompatibleError(f"{phrase}one {kind} has {run.numel()} placeholder tokens, expected "
                                        f"{counts[j]}; pass the processor's unmodified input_ids")
            runs.append(run)
            used += counts[j]
            j += 1
        out.append(runs)
    if j != len(counts):
        raise IncompatibleError(f"{phrase}{len(counts)} {kind}s but {j} placeholder runs (id {token_id}) in "
                                "input_ids")
    return out


split_runs._vltok_host = 1   # works on one host copy of the ids (eval/tools/profile_vltok.py counts one read-back)
