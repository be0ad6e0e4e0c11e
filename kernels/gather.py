"""Token compaction for in-LLM pruning: gather the kept rows of the hidden states, and in the same launch the kept
rows of the loop-level cos / sin and position ids.

    hidden [B, N, D] at idx [B, k]              -> [B, k, D]
    cos, sin [B | 1, S, hd] at pe_idx [B, k]    -> [B, k, hd]      (optional)
    position_ids [B | 1, S] at pe_idx [B, k]    -> [B, k]          (optional)

The hidden rows and the position rows use separate index tensors: at a cut the hidden states are indexed relative
to the current (already pruned) sequence, the loop-level tensors by absolute column. ``gather_rows_torch`` is the
reference (one ``gather`` per tensor); ``gather_rows_triton`` is one Triton launch, one program per kept row, that
copies the row of each tensor (last axis contiguous). ``gather_rows(impl="auto")`` picks Triton for CUDA tensors and
torch otherwise; eval/tools/kernel_bench.py (``--only gather``) times both on the GPU.
"""
from __future__ import annotations


import torch

from ._triton import usable, lazy_definer

IMPLS = ("auto", "torch", "triton")


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if t.shape[0] != idx.shape[0]:
        t = t.expand(idx.shape[0], *t.shape[1:])
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


def gather_rows_torch(hidden, idx, cos=None, sin=None, pe_idx=None, position_ids=None):
    """Reference: (hidden rows [B, k, D], cos rows, sin rows, position-id rows); None for what was not given."""
    idx = idx.to(hidden.device)
    out_pe = [None, None, None]
    if cos is not None or position_ids is not None:
        if pe_idx is None:
            raise ValueError("gather_rows: cos / sin / position_ids need pe_idx (their kept absolute columns)")
        for j, t in enumerate((cos, sin, position_ids)):
            if t is not None:
                out_pe[j] = _rows(t, pe_idx.to(t.device))
    return (_rows(hidden, idx), *out_pe)


def _define():
    """Define the Triton kernels (module globals) on first use: `import vltok` must not import triton."""
    global triton, tl, _gather_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_kernel(x_ptr, xi_ptr, y_ptr, c_ptr, s_ptr, pi_ptr, co_ptr, so_ptr, p_ptr, po_ptr,
                       K, HD, sxb, sxn, syb, syk, scb, scn, ssb, ssn, sob, sok, spb, spn, D: tl.constexpr,
                       HAS_PE: tl.constexpr, HAS_PID: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HD: tl.constexpr):
        row = tl.program_id(0)
        b = row // K
        t = row % K
        src = tl.load(xi_ptr + row).to(tl.int64)
        x_row = x_ptr + b.to(tl.int64) * sxb + src * sxn
        y_row = y_ptr + b.to(tl.int64) * syb + t.to(tl.int64) * syk
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            tl.store(y_row + rd, tl.load(x_row + rd, mask=rd < D), mask=rd < D)
        if HAS_PE or HAS_PID:
            j = tl.load(pi_ptr + row).to(tl.int64)
            if HAS_PE:
                rh = tl.arange(0, BLOCK_HD)
                o = b.to(tl.int64) * sob + t.to(tl.int64) * sok + rh
                tl.store(co_ptr + o, tl.load(c_ptr + b * scb + j * scn + rh, mask=rh < HD), mask=rh < HD)
                tl.store(so_ptr + o, tl.load(s_ptr + b * ssb + j * ssn + rh, mask=rh < HD), mask=rh < HD)
            if HAS_PID:
                tl.store(po_ptr + row, tl.load(p_ptr + b * spb + j * spn))


# the launch functions below define the kernels above (import triton) on their first call
_with_kernels = lazy_definer(globals(), lambda: _define())


def _fits(hidden, idx, cos, sin, pe_idx, position_ids) -> bool:
    B, k = idx.shape
    if hidden.dim() != 3 or hidden.shape[0] != B or hidden.stride(-1) != 1:
        return False
    if cos is not None and (sin is None or cos.dim() != 3 or cos.shape != sin.shape or cos.dtype != sin.dtype
                            or cos.shape[0] not in (1, B) or cos.stride(-1) != 1 or sin.stride(-1) != 1):
        return False
    if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[0] not in (1, B)):
        return False
    return pe_idx is None or pe_idx.shape == idx.shape


@_with_kernels
def gather_rows_triton(hidden, idx, cos=None, sin=None, pe_idx=None, position_ids=None):
    """One launch; the same results as :func:`gather_rows_torch` (a copy, bit-exact)."""
    if not (usable(hidden, idx) and _fits(hidden, idx, cos, sin, pe_idx, position_ids)):
        raise RuntimeError("the Triton gather needs triton, CUDA tensors (or TRITON_INTERPRET=1 on CPU), hidden "
                           "[B, N, D] and cos / sin [B | 1, S, hd] with a contiguous last axis; use impl='torch'")
    if (cos is not None or position_ids is not None) and pe_idx is None:
        raise ValueError("gather_rows: cos / sin / position_ids need pe_idx (their kept absolute columns)")
    B, k = idx.shape
    D = hidden.shape[-1]
    idx = idx.contiguous()
    y = torch.empty(B, k, D, dtype=hidden.dtype, device=hidden.device)
    if B * k == 0:
        return gather_rows_torch(hidden, idx, cos, sin, pe_idx, position_ids)
    pi = pe_idx.contiguous() if pe_idx is not None else idx
    has_pe, has_pid = cos is not None, position_ids is not None
    hd = cos.shape[-1] if has_pe else 1
    co = torch.empty(B, k, hd, dtype=cos.dtype, device=cos.device) if has_pe else y
    so = torch.empty_like(co) if has_pe else y
    po = torch.empty(B, k, dtype=position_ids.dtype, device=position_ids.device) if has_pid else idx
    c, s, p = (cos if has_pe else y), (sin if has_pe else y), (position_ids if has_pid else idx)
    bstride = lambda t: 0 if t.shape[0] == 1 else t.stride(0)   # noqa: E731  (broadcast batch)
    _gather_kernel[(B * k,)](
        hidden, idx, y, c, s, pi, co, so, p, po, k, hd, hidden.stride(0), hidden.stride(1), y.stride(0),
        y.stride(1), bstride(c) if has_pe else 0, c.stride(1) if has_pe else 0, bstride(s) if has_pe else 0,
        s.stride(1) if has_pe else 0, co.stride(0) if has_pe else 0, co.stride(1) if has_pe else 0,
        bstride(p) if has_pid else 0, p.stride(1) if has_pid else 0,
        D=D, HAS_PE=has_pe, HAS_PID=has_pid, BLOCK_D=min(triton.next_power_of_2(D), 1024),
        BLOCK_HD=triton.next_power_of_2(hd), num_warps=4)
    return y, (co if has_pe else None), (so if has_pe else None), (po if has_pid else None)


def gather_rows(hidden, idx, cos=None, sin=None, pe_idx=None, position_ids=None, impl: str = "auto"):
    """Kept rows of hidden (at ``idx``) and of cos / sin / position ids (at ``pe_idx``); see the module docstring.
    ``impl``: ``auto`` (Triton for CUDA tensors it fits, else torch), ``torch`` or ``triton``."""
    if impl not in IMPLS:
        raise ValueError(f"gather_rows: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" or (impl == "auto" and hidden.is_cuda and usable(hidden, idx)
                            and _fits(hidden, idx, cos, sin, pe_idx, position_ids)):
        return gather_rows_triton(hidden, idx, cos, sin, pe_idx, position_ids)
    return gather_rows_torch(hidden, idx, cos, sin, pe_idx, position_ids)
