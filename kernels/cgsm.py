"""Complete-graph soft matching (CrossGET's CGSM), rank-compare formulation, and the size-weighted merge.

Matching, for a metric m [B, N, d] (rows L2-normalised), importance imp [B, N], r merges, protected [B, N]:
  S = m m^T with the diagonal and protected rows/columns at -inf;
  rank = position of each token when sorted by its row max, descending (stable);
  masked_i = max_{j: rank_j > rank_i} S_ij;  score = imp - masked;  the r smallest scores are sources;
  dst(src) = argmax_j S[src, j] over tokens that are neither sources nor protected; exact ties in S go to the
  candidate with the lowest score, then the lowest index (the authors' reducer takes the argmax over the
  destinations listed in ascending score order: CrossGET LLaVA/llava/model/reducer.py @ dc32975).
No N x N index scatters. The torch path materialises S; the Triton path never stores it: one tiled kernel
computes a running row max / argmax of m_i . m_j over allowed columns, run three times (row max; rank-masked row
max; argmax for the r source rows). The sort between the first two passes stays in torch.

Merge (size space): u = x * size; each source adds w0*u_src + (w1 - 1)*u_dst to its destination, with
w = 2*softmax([imp_src, imp_dst]); sizes add unweighted; x = u / size; sources are removed, order kept.
"""
from __future__ import annotations


import torch

from ._triton import interpret, usable, lazy_definer

NEG = float("-inf")


def _ranks(rowmax: torch.Tensor, rowarg: torch.Tensor) -> torch.Tensor:
    """Rank by row max, descending; ties by index. Mutual nearest neighbours have equal row maxima in exact
    arithmetic (S is symmetric), but S_ij and S_ji may round differently: give both the same value first, so the
    index decides between them on every path."""
    partner_arg = rowarg.gather(-1, rowarg)
    mutual = partner_arg == torch.arange(rowarg.shape[-1], device=rowarg.device)
    rowmax = torch.where(mutual, torch.maximum(rowmax, rowmax.gather(-1, rowarg)), rowmax)
    order = torch.sort(rowmax, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


def _select_sources(imp, masked, protected, r):
    """-> (src [B, r], is_src [B, N], order [B, N]): order lists every token by ascending score (stable on the
    index); its first r are the sources, and destination ties are broken in this order."""
    score = (imp.to(masked.dtype) - masked).masked_fill(protected, float("inf"))
    order = torch.sort(score, dim=-1, stable=True).indices
    src = order[:, :r]
    is_src = torch.zeros_like(protected).scatter_(-1, src, True)
    return src, is_src, order


def cgsm_match_torch(metric: torch.Tensor, imp: torch.Tensor, r: int, protected: torch.Tensor | None = None):
    """Reference: returns (src [B, r], dst [B, r], rank [B, N])."""
    B, N, _ = metric.shape
    protected = torch.zeros(B, N, dtype=torch.bool, device=metric.device) if protected is None else protected
    work = torch.promote_types(metric.dtype, torch.float32)
    s = metric.to(work) @ metric.to(work).transpose(1, 2)
    eye = torch.eye(N, dtype=torch.bool, device=metric.device)
    s = s.masked_fill(eye | protected[:, :, None] | protected[:, None, :], NEG)
    rowmax, rowarg = s.max(-1)
    rank = _ranks(rowmax, rowarg)
    masked = s.masked_fill(rank[:, None, :] <= rank[:, :, None], NEG).amax(-1)
    src, is_src, order = _select_sources(imp, masked, protected, r)
    rows = s.gather(1, src[:, :, None].expand(B, r, N)).masked_fill((is_src | protected)[:, None, :], NEG)
    # argmax over the columns in ascending-score order (argmax takes the first maximum), mapped back to indices
    best = rows.gather(2, order[:, None, :].expand(B, r, N)).argmax(-1)
    dst = order.gather(1, best)
    return src, dst, rank


def _define():
    """Define the Triton kernels (module globals) on first use: `import vltok` must not import triton."""
    global triton, tl, _row_best_kernel, _CONFIGS, _BEST
    import triton
    import triton.language as tl

    @triton.jit
    def _row_best_kernel(m_ptr, rows_ptr, colok_ptr, rank_ptr, outv_ptr, outi_ptr, N, R, smb, smn, N_SPLIT: tl.constexpr,
                         D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         USE_RANK: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        slot = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        part = tl.program_id(2)          # this program scans columns [part * N_SPLIT, (part + 1) * N_SPLIT)
        valid_r = slot < R
        row = tl.load(rows_ptr + b * R + slot, mask=valid_r, other=0)
        if USE_RANK:
            rank_row = tl.load(rank_ptr + b * N + row, mask=valid_r, other=0)
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        besti = tl.zeros((BLOCK_R,), tl.int32)
        dd = tl.arange(0, BLOCK_D)
        for n1 in range(0, N_SPLIT, BLOCK_N):   # N_SPLIT: 128 x a power of two (constexpr: few compiles)
            n0 = part * N_SPLIT + n1
            cj = n0 + tl.arange(0, BLOCK_N)
            valid_c = cj < N
            acc = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                a = tl.load(m_ptr + b * smb + row[:, None] * smn + (d0 + dd)[None, :],
                            mask=valid_r[:, None] & ((d0 + dd)[None, :] < D), other=0.0)
                c = tl.load(m_ptr + b * smb + cj[:, None] * smn + (d0 + dd)[None, :],   # [BLOCK_N, BLOCK_D], rows
                            mask=valid_c[:, None] & ((d0 + dd)[None, :] < D), other=0.0)   # contiguous in d
                if IEEE:
                    acc += tl.dot(a, tl.trans(c), input_precision="ieee")
                else:
                    acc += tl.dot(a, tl.trans(c))
            ok = tl.load(colok_ptr + b * N + cj, mask=valid_c, other=0) != 0
            allowed = ok[None, :] & valid_c[None, :] & (cj[None, :] != row[:, None])
            if USE_RANK:
                rank_c = tl.load(rank_ptr + b * N + cj, mask=valid_c, other=0)
                allowed = allowed & (rank_c[None, :] > rank_row[:, None])
            acc = tl.where(allowed, acc, float("-inf"))
            tmax = tl.max(acc, axis=1)
            targ = tl.argmax(acc, axis=1).to(tl.int32) + n0
            upd = tmax > best
            best = tl.where(upd, tmax, best)
            besti = tl.where(upd, targ, besti)
        out = (part * tl.num_programs(0) + b) * R + slot
        tl.store(outv_ptr + out, best, mask=valid_r)
        tl.store(outi_ptr + out, besti, mask=valid_r)


    # tile shapes (BLOCK_R, BLOCK_N, BLOCK_D, warps, stages); BLOCK_N divides 128, the column parts' granularity
    _CONFIGS = ((64, 64, 64, 4, 2), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
                (128, 128, 32, 8, 4), (64, 64, 128, 4, 3))
    _BEST = {}


# the launch functions below define the kernels above (import triton) on their first call
_with_kernels = lazy_definer(globals(), lambda: _define())


@_with_kernels
def _launch(cfg, args, flags, B, R, parts):
    br, bn, bd, w, st = cfg
    _row_best_kernel[(B, triton.cdiv(R, br), parts)](*args, **flags, BLOCK_R=br, BLOCK_N=bn, BLOCK_D=bd,
                                                     num_warps=w, num_stages=st)


def _pick(key, args, flags, B, R, parts):
    """The fastest tile shape for this (B, N, R, D, precision, pass), timed once on the GPU (CUDA events, the
    median of 5 after a warm-up launch) and remembered; later calls launch the plain kernel (triton's autotuner
    adds host time on every launch, which dominated at batch 1)."""
    cfg = _BEST.get(key)
    if cfg is None and torch.cuda.is_current_stream_capturing():   # no timing inside a CUDA-graph capture
        return _CONFIGS[0]
    if cfg is None:
        times = []
        for c in _CONFIGS:
            _launch(c, args, flags, B, R, parts)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(10)]
            for i in range(5):
                ev[2 * i].record()
                _launch(c, args, flags, B, R, parts)
                ev[2 * i + 1].record()
            torch.cuda.synchronize()
            times.append(sorted(ev[2 * i].elapsed_time(ev[2 * i + 1]) for i in range(5))[2])
        cfg = _BEST[key] = _CONFIGS[min(range(len(times)), key=times.__getitem__)]
    return cfg


@_with_kernels
def _row_best(m, rows, colok, rank=None):
    """For each listed row i: max and argmax of m_i . m_j over columns j != i with colok[j] (and rank_j > rank_i)."""
    B, N, D = m.shape
    R = rows.shape[1]
    # enough programs to fill the GPU: split the columns into parts of a multiple of 128, then reduce the parts'
    # maxima in torch
    n_blocks = triton.cdiv(N, 128)
    row_programs = B * triton.cdiv(R, 128)
    parts = max(1, min(n_blocks, triton.cdiv(264, row_programs)))
    n_split = triton.next_power_of_2(triton.cdiv(n_blocks, parts)) * 128   # few distinct values: few compiles
    parts = triton.cdiv(N, n_split)
    outv = torch.empty(parts, B, R, dtype=torch.float32, device=m.device)
    outi = torch.empty(parts, B, R, dtype=torch.int32, device=m.device)
    args = (m, rows.int().contiguous(), colok.to(torch.int8).contiguous(),
            (rank if rank is not None else rows).int().contiguous(), outv, outi, N, R, m.stride(0), m.stride(1))
    flags = dict(N_SPLIT=n_split, D=D, USE_RANK=rank is not None, IEEE=m.dtype == torch.float32)
    if interpret() or D < 32:   # the interpreter (CPU tests) and tiny widths: one fixed tile shape, no tuning
        _launch((64, 64, 64 if D >= 64 else max(16, triton.next_power_of_2(D)), 4, 2), args, flags, B, R, parts)
    else:
        pow2 = triton.next_power_of_2   # one timing per size class, not per exact shape
        key = (pow2(B), pow2(N), pow2(R), D, m.dtype, rank is not None, m.device.index)
        _launch(_pick(key, args, flags, B, R, parts), args, flags, B, R, parts)
    best, which = outv.max(0)     # first part wins ties, as a left-to-right scan would
    return best, outi.gather(0, which[None]).squeeze(0).long()


def cgsm_match_triton(metric: torch.Tensor, imp: torch.Tensor, r: int, protected: torch.Tensor | None = None):
    """Same result as cgsm_match_torch (up to fp rounding of the similarities), without storing S."""
    B, N, _ = metric.shape
    m = metric.contiguous()
    protected = torch.zeros(B, N, dtype=torch.bool, device=m.device) if protected is None else protected
    rows = torch.arange(N, device=m.device).expand(B, N)
    rowmax, rowarg = _row_best(m, rows, ~protected)
    rowmax = rowmax.masked_fill(protected, NEG)
    rank = _ranks(rowmax, rowarg)
    masked, _ = _row_best(m, rows, ~protected, rank)
    masked = masked.masked_fill(protected, NEG)
    src, is_src, order = _select_sources(imp, masked, protected, r)
    # the destination pass scans the columns in ascending-score order (ties -> lowest score, then index): run it
    # on the score-permuted metric with the source rows renumbered, and map the argmax back
    inv = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=m.device).expand(B, N))
    m_perm = m.gather(1, order[:, :, None].expand(B, N, m.shape[2])).contiguous()
    _, best = _row_best(m_perm, inv.gather(1, src), ~(is_src | protected).gather(1, order))
    dst = order.gather(1, best)
    return src, dst, rank


def cgsm_match(metric, imp, r, protected=None, impl: str = "auto"):
    """Dispatch: Triton on CUDA (when installed), else the torch reference."""
    if impl == "triton" or (impl == "auto" and metric.is_cuda and usable(metric)):
        return cgsm_match_triton(metric, imp, r, protected)
    return cgsm_match_torch(metric, imp, r, protected)


def merge_weighted(x: torch.Tensor, size: torch.Tensor, imp: torch.Tensor, src: torch.Tensor, dst: torch.Tensor):
    """Size-space weighted merge of each src into its dst; returns (x [B, N-r, C], size [B, N-r, 1]), order kept."""
    B, N, C = x.shape
    w = 2 * torch.softmax(torch.stack([imp.gather(1, src), imp.gather(1, dst)], -1).float(), -1)   # [B, r, 2]
    u = x.float() * size.float()
    u_src = u.gather(1, src[..., None].expand(-1, -1, C))
    u_dst = u.gather(1, dst[..., None].expand(-1, -1, C))
    add = w[..., :1] * u_src + (w[..., 1:] - 1) * u_dst
    u = u.scatter_add(1, dst[..., None].expand(-1, -1, C), add)
    sz = size.float().scatter_add(1, dst[..., None], size.float().gather(1, src[..., None]))
    keep = torch.ones(B, N, dtype=torch.bool, device=x.device).scatter_(1, src, False)
    u = u[keep].view(B, N - src.shape[1], C)
    sz = sz[keep].view(B, N - src.shape[1], 1)
    return (u / sz).to(x.dtype), sz.to(size.dtype)
