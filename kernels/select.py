"""The in-LLM cut in few launches: last-row attention scores, stable top-k per row, and column compaction.

At a cut the engine (vltok.inllm) scores each sample's current visual tokens by the attention of its last real
prompt token, lets the method pick survivors, and compacts the sequence. Written as plain torch that is ~100 kernel
launches per cut; these three functions do it in a handful, with the same results:

    last_row_scores(q, k, rows, keys, scale, ...)   -> [B, K] fp32   mean over heads of each head's softmax
    topk_rows(scores, k, force=None)                 -> [G, k] int64  the k best per row, ascending indices
    cut_columns(prev, drop, keep, n_out)             -> (rel, new)    columns that survive a cut, ascending

Each has a torch reference (``*_torch``, the definition) and a Triton version (``*_triton``); the plain name picks
Triton for CUDA tensors the kernels take (or under TRITON_INTERPRET=1 with ``impl="triton"``) and torch otherwise.
The Triton versions take two launches (scores: chunked logits, then chunk combine + head mean; top-k: rank, then
compaction) and one (cut_columns); eval/tools/kernel_bench.py ``--only select`` times them against torch on a GPU.
"""
from __future__ import annotations


import torch

from ._triton import usable, lazy_definer

IMPLS = ("auto", "torch", "triton")


# -- references --------------------------------------------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate-half RoPE (Llama / Qwen2 convention): x [..., hd] with cos / sin broadcastable to it."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def last_row_scores_torch(q, k, rows, keys, scale, norm_all=False, prev=None, am=None, cos=None, sin=None):
    """Reference. Per sample b the query is q[b, rows[b]] ([H, hd]); the scored keys are k[b, keys[b]] ([K, H_kv, hd],
    GQA: head h reads kv head h // (H // H_kv)). Returns [B, K] fp32: the mean over heads of softmax(q·kᵀ·scale),
    where the softmax runs over

    * the K scored keys (``norm_all=False``, FEATHER's criterion), or
    * every current column j <= rows[b] whose absolute column prev[b, j] is a real token (am[b, prev[b, j]] != 0;
      every column when ``am`` is None), of which the K scored keys are a subset (``norm_all=True``, FastV's).

    q [B, Sc, H, hd] and k [B, Sc, H_kv, hd] are the current (pruned) sequence's projections; rows [B] and keys
    [B, K] index it. With ``cos`` / ``sin`` ([1 | B, S, hd], over absolute columns) q and k are rotated at their
    absolute columns ``prev`` [B, Sc] first. Everything is computed in fp32."""
    B, Sc, H, hd = q.shape
    Hkv = k.shape[2]
    bi = torch.arange(B, device=q.device)
    qr = q[bi, rows].float()                                           # [B, H, hd]
    cols = torch.arange(Sc, device=q.device).expand(B, Sc) if norm_all else keys
    kk = k[bi[:, None], cols].float()                                  # [B, C, Hkv, hd]
    if cos is not None:
        if prev is None:
            raise ValueError("last_row_scores: cos / sin need prev (the absolute column of each current column)")
        c, s = (t.expand(B, *t.shape[1:]).float() for t in (cos, sin))
        at_row, at_cols = prev[bi, rows], prev.gather(1, cols)
        qr = _rotate(qr, c[bi, at_row][:, None], s[bi, at_row][:, None])
        kk = _rotate(kk, c[bi[:, None], at_cols][:, :, None], s[bi[:, None], at_cols][:, :, None])
    if H != Hkv:
        kk = kk.repeat_interleave(H // Hkv, dim=2)
    logits = torch.einsum("bhd,bchd->bhc", qr, kk) * scale             # [B, H, C]
    if norm_all:
        ok = cols <= rows[:, None]
        if am is not None:
            ok = ok & (am.gather(1, prev) != 0 if prev is not None else am[:, :Sc] != 0)
        logits = logits.masked_fill(~ok[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if norm_all:
        p = p.gather(2, keys[:, None, :].expand(-1, H, -1))
    return p.mean(1)


def topk_rows_torch(scores: torch.Tensor, k: int, force: torch.Tensor | None = None) -> torch.Tensor:
    """Reference. scores [G, n] -> [G, k] int64: per row the k highest-scoring indices (ties to the lower index),
    sorted ascending. ``force`` [n] bool marks indices that rank above every score (kept first, lower index
    first); with more forced indices than k, the k lowest forced ones."""
    if force is not None:
        scores = scores.masked_fill(force.to(scores.device), float("inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :max(k, 0)].sort(dim=1).values


def cut_columns_torch(prev: torch.Tensor, drop: torch.Tensor, keep: torch.Tensor, n_out: int):
    """Reference. prev [B, Sc] absolute columns of the current sequence; drop [B, D] current indices that are
    candidates for removal (a cut's visual tokens); keep [B, Kp] the subset of them that survives. Every current
    column not in ``drop``, plus ``keep``, survives: exactly n_out per row (the caller knows it from the counts).
    Returns (rel [B, n_out] their current indices ascending, new [B, n_out] = prev at rel)."""
    B, Sc = prev.shape
    mask = torch.ones(B, Sc, dtype=torch.bool, device=prev.device).scatter_(1, drop, False).scatter_(1, keep, True)
    rel = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :n_out]
    return rel, prev.gather(1, rel)


# -- dispatch ----------------------------------------------------------------------------------------------------
def _pick(impl, tensors, why):
    """``why()``: None when the Triton kernel takes the inputs, else what it needs (auto then picks torch)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if all(t.is_cuda for t in tensors) and usable(*tensors) and why() is None \
            else "torch"
    return impl


def last_row_scores(q, k, rows, keys, scale, norm_all=False, prev=None, am=None, cos=None, sin=None,
                    impl: str = "auto"):
    """See :func:`last_row_scores_torch` (the definition)."""
    if _pick(impl, (q, k), lambda: _scores_fit(q, k, rows, keys, prev, am, cos, sin)) == "triton":
        fn = _last_row_scores_launch if impl == "auto" else last_row_scores_triton   # auto has checked the inputs
        return fn(q, k, rows, keys, scale, norm_all, prev, am, cos, sin)
    return last_row_scores_torch(q, k, rows, keys, scale, norm_all, prev, am, cos, sin)


def topk_rows(scores, k: int, force=None, impl: str = "auto"):
    """See :func:`topk_rows_torch` (the definition)."""
    if _pick(impl, (scores,), lambda: _topk_fit(scores, force)) == "triton":
        return (_topk_rows_launch if impl == "auto" else topk_rows_triton)(scores, k, force)
    return topk_rows_torch(scores, k, force)


def cut_columns(prev, drop, keep, n_out: int, impl: str = "auto"):
    """See :func:`cut_columns_torch` (the definition)."""
    if _pick(impl, (prev,), lambda: _cut_fit(prev, drop, keep)) == "triton":
        return (_cut_columns_launch if impl == "auto" else cut_columns_triton)(prev, drop, keep, n_out)
    return cut_columns_torch(prev, drop, keep, n_out)


# -- Triton --------------------------------------------------------------------------------------------------------
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INDEX = (torch.int64, torch.int32)
_MAX_SPLITS = 32     # chunks per head in last_row_scores (a constexpr tile width)
_PROGRAMS = 512      # programs last_row_scores aims for (a few per SM on an H100)

def _define():
    """Define the Triton kernels (module globals) on first use: `import vltok` must not import triton."""
    global triton, tl, _rope_halves, _key_logits, _in_softmax, _logits_kernel, _head_mean_kernel, _compact_row, _rank_kernel, _topk_compact_kernel, _set_flags, _cut_kernel
    import triton
    import triton.language as tl

    # Loops over runtime lengths are while loops: the CPU interpreter (numpy >= 2.4) cannot take a tensor as a
    # range() bound, and constexpr lengths would recompile for every sequence length.

    @triton.jit
    def _rope_halves(x1, x2, c_row, s_row, off, mask, HALF: tl.constexpr):
        """Rotate-half RoPE of (x1, x2), the two halves of a row or of a tile of rows; c_row / s_row point at each
        row's cos / sin, ``off`` is the offset inside the first half."""
        c1 = tl.load(c_row + off, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(c_row + off + HALF, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(s_row + off, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + off + HALF, mask=mask, other=0.0).to(tl.float32)
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2

    @triton.jit
    def _key_logits(k_ptr, cos_ptr, sin_ptr, prev_ptr, b, hkv, col, valid, q1, q2, scale, skb, sks, skh, spb, sps,
                    scb, scs, ssb, sss, HALF: tl.constexpr, ROPE: tl.constexpr):
        """scale * (q . k[b, col, hkv]) for a block of current columns ``col`` [BLOCK_K], k rotated at prev[b, col]."""
        d = tl.arange(0, HALF)[None, :]
        m2 = valid[:, None]
        kp = k_ptr + b * skb + col[:, None] * sks + hkv * skh + d
        k1 = tl.load(kp, mask=m2, other=0.0).to(tl.float32)
        k2 = tl.load(kp + HALF, mask=m2, other=0.0).to(tl.float32)
        if ROPE:
            pos = tl.load(prev_ptr + b * spb + col * sps, mask=valid, other=0)[:, None]
            k1, k2 = _rope_halves(k1, k2, cos_ptr + b * scb + pos * scs, sin_ptr + b * ssb + pos * sss, d, m2, HALF)
        return tl.sum(k1 * q1[None, :] + k2 * q2[None, :], axis=1) * scale

    @triton.jit
    def _in_softmax(valid, col, row, prev_ptr, am_ptr, b, spb, sps, sab, sas, HAS_PREV: tl.constexpr,
                    HAS_AM: tl.constexpr):
        """norm_all's key set: current columns col <= row whose absolute column is a real token."""
        valid = valid & (col <= row)
        if HAS_AM:
            if HAS_PREV:
                acol = tl.load(prev_ptr + b * spb + col * sps, mask=valid, other=0)
            else:
                acol = col
            valid = valid & (tl.load(am_ptr + b * sab + acol * sas, mask=valid, other=0) != 0)
        return valid

    @triton.jit(do_not_specialize=["n", "chunk"])   # no recompiles across sequence lengths
    def _logits_kernel(q_ptr, k_ptr, rows_ptr, keys_ptr, prev_ptr, am_ptr, cos_ptr, sin_ptr, lg_ptr, mp_ptr, sp_ptr,
                       n, chunk, scale, sqb, sqs, sqh, skb, sks, skh, srb, syb, syk, spb, sps, sab, sas, scb, scs,
                       ssb, sss, GROUP: tl.constexpr, HALF: tl.constexpr, NORM_ALL: tl.constexpr,
                       HAS_PREV: tl.constexpr, HAS_AM: tl.constexpr, ROPE: tl.constexpr, BLOCK_K: tl.constexpr,
                       MAX_SPLITS: tl.constexpr):
        """Program (b, h, part): the logits of head h over the part-th chunk of the softmax's key set (the n current
        columns for norm_all, else the n = K scored keys) into lg [B, H, n] (-inf where outside the softmax), and
        that chunk's max and sum of exp into the partials mp / sp [B, H, MAX_SPLITS]."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        part = tl.program_id(2)
        bh = b * tl.num_programs(1) + h
        hkv = h // GROUP
        d = tl.arange(0, HALF)
        row = tl.load(rows_ptr + b * srb).to(tl.int64)
        qp = q_ptr + b * sqb + row * sqs + h * sqh + d
        q1 = tl.load(qp).to(tl.float32)
        q2 = tl.load(qp + HALF).to(tl.float32)
        if ROPE:
            pq = tl.load(prev_ptr + b * spb + row * sps)
            q1, q2 = _rope_halves(q1, q2, cos_ptr + b * scb + pq * scs, sin_ptr + b * ssb + pq * sss, d, d < HALF,
                                  HALF)
        lo = part * chunk
        hi = tl.minimum(lo + chunk, n)
        if NORM_ALL:
            hi = tl.minimum(hi, row + 1)      # columns after the row are never read (kernel 2 masks them)
        m_run = tl.full((BLOCK_K,), -1.0e30, tl.float32)   # per-lane running max / sum of exp, reduced after
        s_run = tl.zeros((BLOCK_K,), tl.float32)
        j0 = lo
        while j0 < hi:
            jj = j0 + tl.arange(0, BLOCK_K)
            inb = jj < hi
            if NORM_ALL:
                col = jj
            else:
                col = tl.load(keys_ptr + b * syb + jj * syk, mask=inb, other=0)
            lg = _key_logits(k_ptr, cos_ptr, sin_ptr, prev_ptr, b, hkv, col, inb, q1, q2, scale, skb, sks, skh,
                             spb, sps, scb, scs, ssb, sss, HALF, ROPE)
            valid = inb
            if NORM_ALL:
                valid = _in_softmax(inb, col, row, prev_ptr, am_ptr, b, spb, sps, sab, sas, HAS_PREV, HAS_AM)
            lg = tl.where(valid, lg, float("-inf"))
            tl.store(lg_ptr + bh * n + jj, lg, mask=inb)
            m_new = tl.maximum(m_run, lg)
            s_run = s_run * tl.exp(m_run - m_new) + tl.exp(lg - m_new)
            m_run = m_new
            j0 += BLOCK_K
        m_part = tl.max(m_run, axis=0)
        tl.store(mp_ptr + bh * MAX_SPLITS + part, m_part)
        tl.store(sp_ptr + bh * MAX_SPLITS + part, tl.sum(s_run * tl.exp(m_run - m_part), axis=0))

    @triton.jit(do_not_specialize=["K", "n", "splits"])
    def _head_mean_kernel(lg_ptr, mp_ptr, sp_ptr, rows_ptr, keys_ptr, out_ptr, H, K, n, splits, srb, syb, syk,
                          NORM_ALL: tl.constexpr, H_P2: tl.constexpr, MAX_SPLITS: tl.constexpr,
                          BLOCK_J: tl.constexpr):
        """Program (b, key block): each head's softmax normaliser from its chunk partials, then the mean over
        heads of p = exp(logit - max) / sum at the block's keys (one fixed-order reduction: deterministic)."""
        b = tl.program_id(0).to(tl.int64)
        hh = tl.arange(0, H_P2)
        hok = hh < H
        sp = tl.arange(0, MAX_SPLITS)
        pok = hok[:, None] & (sp[None, :] < splits)
        part = (b * H + hh)[:, None] * MAX_SPLITS + sp[None, :]
        mp = tl.load(mp_ptr + part, mask=pok, other=-1.0e30)
        m_h = tl.max(mp, axis=1)
        s_h = tl.sum(tl.load(sp_ptr + part, mask=pok, other=0.0) * tl.exp(mp - m_h[:, None]), axis=1)
        j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
        jok = j < K
        if NORM_ALL:   # the scored keys' logits, gathered from the current columns'
            col = tl.load(keys_ptr + b * syb + j * syk, mask=jok, other=0)
            jok = jok & (col <= tl.load(rows_ptr + b * srb))
        else:
            col = j
        ok = hok[:, None] & jok[None, :]
        lg = tl.load(lg_ptr + (b * H + hh)[:, None] * n + col[None, :], mask=ok, other=float("-inf"))
        p = tl.where(ok, tl.exp(lg - m_h[:, None]) / s_h[:, None], 0.0)
        tl.store(out_ptr + b * K + j, tl.sum(p, axis=0) / H, mask=j < K)

    @triton.jit
    def _compact_row(flag_row, n, n_out, out_row, src_row, src_stride, val_row, HAS_VAL: tl.constexpr,
                     BLOCK: tl.constexpr):
        """Store the index of each flagged entry of a [n] flag row at its slot (prefix sum), ascending, up to n_out;
        with HAS_VAL also src_row[index] into val_row."""
        base = tl.zeros((), tl.int32)
        i0 = 0
        while i0 < n:
            i = i0 + tl.arange(0, BLOCK)
            f = tl.load(flag_row + i, mask=i < n, other=0).to(tl.int32)
            slot = base + tl.cumsum(f, 0) - 1
            sel = (f != 0) & (slot < n_out)
            tl.store(out_row + slot, i.to(tl.int64), mask=sel)
            if HAS_VAL:
                tl.store(val_row + slot, tl.load(src_row + i.to(tl.int64) * src_stride, mask=sel), mask=sel)
            base += tl.sum(f, 0)
            i0 += BLOCK

    @triton.jit(do_not_specialize=["n", "k"])
    def _rank_kernel(s_ptr, force_ptr, flag_ptr, n, k, ssg, ssn, sf, HAS_FORCE: tl.constexpr, BLOCK_I: tl.constexpr,
                     BLOCK_J: tl.constexpr):
        """flag[g, i] = rank_i < k, rank_i = #{j: s_j > s_i or (s_j == s_i and j < i)}, forced entries at +inf."""
        g = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        vi = i < n
        si = tl.load(s_ptr + g * ssg + i * ssn, mask=vi, other=0.0).to(tl.float32)
        if HAS_FORCE:
            si = tl.where(tl.load(force_ptr + i * sf, mask=vi, other=0) != 0, float("inf"), si)
        cnt = tl.zeros((BLOCK_I,), tl.int32)
        j0 = 0
        while j0 < n:
            j = j0 + tl.arange(0, BLOCK_J)
            vj = j < n
            sj = tl.load(s_ptr + g * ssg + j * ssn, mask=vj, other=0.0).to(tl.float32)
            if HAS_FORCE:
                sj = tl.where(tl.load(force_ptr + j * sf, mask=vj, other=0) != 0, float("inf"), sj)
            before = (sj[None, :] > si[:, None]) | ((sj[None, :] == si[:, None]) & (j[None, :] < i[:, None]))
            cnt += tl.sum((before & vj[None, :]).to(tl.int32), axis=1)
            j0 += BLOCK_J
        tl.store(flag_ptr + g * n + i, (cnt < k).to(tl.int8), mask=vi)

    @triton.jit(do_not_specialize=["n", "k"])
    def _topk_compact_kernel(flag_ptr, out_ptr, n, k, BLOCK: tl.constexpr):
        g = tl.program_id(0).to(tl.int64)
        _compact_row(flag_ptr + g * n, n, k, out_ptr + g * k, out_ptr, 0, out_ptr, False, BLOCK)

    @triton.jit
    def _set_flags(flag_row, idx_ptr, stride, count, VALUE: tl.constexpr, BLOCK: tl.constexpr):
        """flag_row[idx[j]] = VALUE for j < count (idx read with ``stride``)."""
        i0 = 0
        while i0 < count:
            i = i0 + tl.arange(0, BLOCK)
            col = tl.load(idx_ptr + i * stride, mask=i < count, other=0)
            tl.store(flag_row + col, tl.full((BLOCK,), VALUE, tl.int8), mask=i < count)
            i0 += BLOCK

    @triton.jit(do_not_specialize=["Sc", "D", "Kp", "n_out"])
    def _cut_kernel(prev_ptr, drop_ptr, keep_ptr, flag_ptr, rel_ptr, new_ptr, Sc, D, Kp, n_out, spb, sps, sdb, sdd,
                    skb, skk, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        flag_row = flag_ptr + b * Sc
        i0 = 0
        while i0 < Sc:
            i = i0 + tl.arange(0, BLOCK)
            tl.store(flag_row + i, tl.full((BLOCK,), 1, tl.int8), mask=i < Sc)
            i0 += BLOCK
        tl.debug_barrier()
        _set_flags(flag_row, drop_ptr + b * sdb, sdd, D, 0, BLOCK)
        tl.debug_barrier()
        _set_flags(flag_row, keep_ptr + b * skb, skk, Kp, 1, BLOCK)
        tl.debug_barrier()
        _compact_row(flag_row, Sc, n_out, rel_ptr + b * n_out, prev_ptr + b * spb, sps, new_ptr + b * n_out, True,
                     BLOCK)


# the launch functions below define the kernels above (import triton) on their first call
_with_kernels = lazy_definer(globals(), lambda: _define())


def _bstride(t):
    """Batch stride of a [1 | B, ...] tensor: 0 when it broadcasts."""
    return 0 if t.shape[0] == 1 else t.stride(0)


def _scores_fit(q, k, rows, keys, prev, am, cos, sin) -> str | None:
    """None when the Triton scores kernel takes these inputs, else what does not fit."""
    if q.dim() != 4 or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        return "q [B, Sc, H, hd] and k [B, Sc, H_kv, hd]"
    B, Sc, H, hd = q.shape
    if H % k.shape[2] or hd < 4 or hd > 256 or hd & (hd - 1):
        return f"H a multiple of H_kv and hd a power of two from 4 to 256 (got H={H}, H_kv={k.shape[2]}, hd={hd})"
    if q.dtype not in _FLOATS or k.dtype not in _FLOATS or q.stride(-1) != 1 or k.stride(-1) != 1:
        return f"fp16 / bf16 / fp32 q and k with a contiguous last axis (got {q.dtype}, {k.dtype})"
    if rows.shape != (B,) or keys.dim() != 2 or keys.shape[0] != B or rows.dtype not in _INDEX \
            or keys.dtype not in _INDEX:
        return "rows [B] and keys [B, K] integer"
    if prev is not None and (prev.shape != (B, Sc) or prev.dtype not in _INDEX):
        return "prev [B, Sc] integer"
    if am is not None and (am.dim() != 2 or am.shape[0] != B or am.is_complex()):
        return "am [B, S]"
    if any(t is not None and t.device != q.device for t in (k, rows, keys, prev, am, cos, sin)):
        return "every tensor on q's device"
    if cos is not None and (sin is None or cos.dim() != 3 or cos.shape != sin.shape or cos.shape[0] not in (1, B)
                            or cos.shape[2] != hd or cos.dtype not in _FLOATS or sin.dtype not in _FLOATS
                            or cos.stride(-1) != 1 or sin.stride(-1) != 1):
        return "cos / sin [1 | B, S, hd] fp16 / bf16 / fp32 with a contiguous last axis"
    return None


def _topk_fit(scores, force) -> str | None:
    if scores.dim() != 2 or scores.dtype not in _FLOATS:
        return f"scores [G, n] fp16 / bf16 / fp32 (got {tuple(scores.shape)} {scores.dtype})"
    if force is not None and (force.shape != (scores.shape[1],) or force.device != scores.device):
        return f"force [n] on the scores' device (got {tuple(force.shape)} on {force.device})"
    return None


def _cut_fit(prev, drop, keep) -> str | None:
    if prev.dim() != 2 or drop.dim() != 2 or keep.dim() != 2 or not prev.shape[0] == drop.shape[0] == keep.shape[0]:
        return "prev [B, Sc], drop [B, D], keep [B, Kp]"
    if any(t.dtype not in _INDEX for t in (prev, drop, keep)):
        return "integer prev / drop / keep"
    if drop.device != prev.device or keep.device != prev.device:
        return "prev, drop and keep on one device"
    return None


def _check(name, why, *tensors):
    if not usable(*tensors):
        why = "triton and CUDA tensors (or TRITON_INTERPRET=1 with CPU tensors)"
    if why is not None:
        raise RuntimeError(f"{name}: the Triton kernel needs {why}; use impl='torch'")


def last_row_scores_triton(q, k, rows, keys, scale, norm_all=False, prev=None, am=None, cos=None, sin=None):
    """Two Triton launches: grid (B, H, chunks) writes each head's logits over a chunk of its softmax's key set with
    the chunk's max and sum of exp (RoPE, GQA and the norm_all mask in-kernel); grid (B, key blocks) combines the
    chunks and averages the heads' probabilities at the scored keys. The same results as
    :func:`last_row_scores_torch` up to fp32 rounding, deterministic. q / k may be strided views (last axis
    contiguous); hd a power of two from 4 to 256."""
    _check("last_row_scores", _scores_fit(q, k, rows, keys, prev, am, cos, sin), q, k)
    return _last_row_scores_launch(q, k, rows, keys, scale, norm_all, prev, am, cos, sin)


@_with_kernels
def _last_row_scores_launch(q, k, rows, keys, scale, norm_all, prev, am, cos, sin):
    if cos is not None and prev is None:
        raise ValueError("last_row_scores: cos / sin need prev (the absolute column of each current column)")
    B, Sc, H, hd = q.shape
    K = keys.shape[1]
    out = torch.empty(B, K, dtype=torch.float32, device=q.device)
    if B == 0 or K == 0 or H == 0:
        return out
    norm_all = bool(norm_all)
    has_prev, has_am, rope = prev is not None, norm_all and am is not None, cos is not None
    if has_am and am.dtype == torch.bool:
        am = am.view(torch.uint8)
    pv = prev if has_prev else rows.view(B, 1)
    a = am if has_am else rows.view(B, 1)
    c, s = (cos, sin) if rope else (q, q)
    # split each head's key set into chunks so that ~_PROGRAMS programs run at batch 1 too (B * H alone is 32)
    n = Sc if norm_all else K
    block_k = max(16, min(128, 4096 // hd))
    blocks = triton.cdiv(n, block_k)
    splits = max(1, min(blocks, _MAX_SPLITS, triton.cdiv(_PROGRAMS, B * H)))
    chunk = triton.cdiv(blocks, splits) * block_k
    splits = triton.cdiv(n, chunk)
    lg = torch.empty(B, H, n, dtype=torch.float32, device=q.device)
    mp = torch.empty(B, H, _MAX_SPLITS, dtype=torch.float32, device=q.device)
    sp = torch.empty_like(mp)
    _logits_kernel[(B, H, splits)](
        q, k, rows, keys, pv, a, c, s, lg, mp, sp, n, chunk, float(scale),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), rows.stride(0),
        keys.stride(0), keys.stride(1), pv.stride(0), pv.stride(1), a.stride(0), a.stride(1),
        _bstride(c) if rope else 0, c.stride(1) if rope else 0, _bstride(s) if rope else 0,
        s.stride(1) if rope else 0,
        GROUP=H // k.shape[2], HALF=hd // 2, NORM_ALL=norm_all, HAS_PREV=has_prev, HAS_AM=has_am, ROPE=rope,
        BLOCK_K=block_k, MAX_SPLITS=_MAX_SPLITS, num_warps=4)
    _head_mean_kernel[(B, triton.cdiv(K, 64))](
        lg, mp, sp, rows, keys, out, H, K, n, splits, rows.stride(0), keys.stride(0), keys.stride(1),
        NORM_ALL=norm_all, H_P2=max(2, triton.next_power_of_2(H)), MAX_SPLITS=_MAX_SPLITS, BLOCK_J=64, num_warps=4)
    return out


def topk_rows_triton(scores, k, force=None):
    """Two Triton launches: a rank kernel (rank_i = #{j: s_j > s_i, or s_j == s_i and j < i}, forced entries at
    +inf; grid (G, n / 64)) flags rank_i < k, then one program per row compacts the flags into ascending indices.
    The same indices as :func:`topk_rows_torch` (ties included); NaN scores are not supported (their rank is
    undefined here, while torch.sort puts them first). Scores fp16 / bf16 / fp32 (compared in fp32: exact)."""
    _check("topk_rows", _topk_fit(scores, force), scores)
    return _topk_rows_launch(scores, k, force)


@_with_kernels
def _topk_rows_launch(scores, k, force):
    G, n = scores.shape
    k = min(int(k), n)
    out = torch.empty(G, max(k, 0), dtype=torch.int64, device=scores.device)
    if k <= 0 or G == 0:
        return out
    flags = torch.empty(G, n, dtype=torch.int8, device=scores.device)
    f = scores if force is None else (force.view(torch.uint8) if force.dtype == torch.bool else force)
    _rank_kernel[(G, triton.cdiv(n, 64))](scores, f, flags, n, k, scores.stride(0), scores.stride(1),
                                          0 if force is None else f.stride(0), HAS_FORCE=force is not None,
                                          BLOCK_I=64, BLOCK_J=128, num_warps=4)
    _topk_compact_kernel[(G,)](flags, out, n, k, BLOCK=min(1024, max(16, triton.next_power_of_2(n))), num_warps=4)
    return out


def cut_columns_triton(prev, drop, keep, n_out):
    """One Triton launch, one program per row: a flag row (1 everywhere, 0 at drop, 1 at keep, the phases ordered
    by barriers) compacted by a prefix sum into rel and prev at rel. The same results as :func:`cut_columns_torch`
    when every row has exactly n_out survivors (the contract); with more, the first n_out are returned."""
    _check("cut_columns", _cut_fit(prev, drop, keep), prev, drop, keep)
    return _cut_columns_launch(prev, drop, keep, n_out)


@_with_kernels
def _cut_columns_launch(prev, drop, keep, n_out):
    B, Sc = prev.shape
    rel = torch.empty(B, n_out, dtype=torch.int64, device=prev.device)
    new = torch.empty(B, n_out, dtype=prev.dtype, device=prev.device)
    if B == 0 or n_out == 0:
        return rel, new
    flags = torch.empty(B, Sc, dtype=torch.int8, device=prev.device)
    _cut_kernel[(B,)](prev, drop, keep, flags, rel, new, Sc, drop.shape[1], keep.shape[1], n_out, prev.stride(0),
                      prev.stride(1), drop.stride(0), drop.stride(1), keep.stride(0), keep.stride(1),
                      BLOCK=min(1024, max(16, triton.next_power_of_2(Sc))), num_warps=4)
    return rel, new
