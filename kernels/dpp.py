"""The greedy MAP inference of a DPP (Chen, Zhang & Zhou, NeurIPS'18) in one Triton launch.

    dpp_greedy_triton(L, k) -> [B, k] int64, ascending

The definition is the torch loop ``vltok.methods.dpp.dpp_greedy_torch`` (k steps of a few small ops each: on a GPU
it is bound by kernel launches, ~15 per kept token). Here one program per batch item runs the whole loop:

    d2 = diag(L)
    repeat k times:  j = argmax d2 (ties to the lower index, NaN first);  e = (L[j] - sum_t c_t[j] c_t) / sqrt(d2[j])
                     (e = 0 where d2[j] <= eps);  c_i = e;  d2 -= e^2;  d2 = -inf at every picked index

with d2 and the current row in registers (BLOCK_N = the next power of two of N, at most MAX_N) and the c vectors
[B, k, N] fp32 in global memory (L2-resident at the sizes vltok meets: 92 x 576 x 4 B = 212 KB per sample at
LLaVA-1.5 keep 0.16; step i reads i of them, BLOCK_T rows at a time). The kept set is compacted into ascending
indices in the kernel (a prefix sum over a chosen mask), so the call is one launch. All arithmetic is fp32 (L of any
float dtype is read and converted); division and square root are IEEE-rounded and the kernel is compiled without
multiply-add fusion, so each step rounds as torch's separate ops do.

One program per sample: at batch 1 the loop runs on one SM (the torch loop's launches spread each step over the
GPU, but wait on the host); both cost O(k^2 N) per sample.

Equality with the torch loop: the argmax, the -inf masking and the zero vector at a gain <= eps are the loop's, so
exact ties (duplicate tokens: identical columns of L give bit-identical gains in both) go to the lower index in both.
The projection sum runs in a different order than torch's einsum (a blocked fixed-order sum here, a BLAS reduction
there), so gains can differ in the last bits, and two candidates whose gains are that close can be picked in either
order. With full-rank kernels that is rare (gains differ by far more than the rounding); once k exceeds the kernel's
numerical rank (every gain left is rounding noise: many near-identical tokens) the two loops order the remaining
picks differently, each still a greedy argmax up to rounding (tests/test_dpp_kernel.py replays them in float64).
``dpp_greedy_triton(..., order=True)`` also returns the pick order, for checking such a set step by step.

eval/tools/dpp_kernel_speed.py times it against the torch loop on a GPU.
"""
from __future__ import annotations

import torch

from ._triton import lazy_definer, usable

EPS = 1e-12          # the torch loop's floor of a gain before its square root
MAX_N = 8192         # BLOCK_N cap: d2, the row, its projection and the mask live in registers
_TILE = 16384        # elements of the c tile read per inner step (BLOCK_T rows of BLOCK_N): ~64 KB in flight
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _define():
    """Define the Triton kernel (module globals) on first use: `import vltok` must not import triton."""
    global triton, tl, _greedy_kernel
    import triton
    import triton.language as tl

    # Loops over runtime lengths are while loops: the CPU interpreter (numpy >= 2.4) cannot take a tensor as a
    # range() bound, and constexpr lengths would recompile for every k.

    @triton.jit(do_not_specialize=["N", "k"])
    def _greedy_kernel(L_ptr, c_ptr, order_ptr, out_ptr, N, k, slb, sln, slm, eps, BLOCK_N: tl.constexpr,
                       BLOCK_T: tl.constexpr):
        """Program b: the k greedy picks of sample b into order [B, k] (pick order) and out [B, k] (ascending);
        c [B, k, N] is its scratch (row t = the t-th Cholesky vector)."""
        b = tl.program_id(0).to(tl.int64)
        n = tl.arange(0, BLOCK_N)
        valid = n < N
        Lb = L_ptr + b * slb
        cb = c_ptr + b * k * N
        d2 = tl.load(Lb + n * (sln + slm), mask=valid, other=float("-inf")).to(tl.float32)
        chosen = tl.zeros((BLOCK_N,), tl.int32)
        tt = tl.arange(0, BLOCK_T)
        i = 0
        while i < k:
            j = tl.argmax(tl.where(d2 != d2, float("inf"), d2), axis=0, tie_break_left=True)   # NaN: the max
            pick = n == j
            dj = tl.sum(tl.where(pick, d2, 0.0), axis=0)
            tl.store(order_ptr + b * k + i, j.to(tl.int64))
            row = tl.load(Lb + j.to(tl.int64) * sln + n.to(tl.int64) * slm, mask=valid, other=0.0).to(tl.float32)
            # the projection of row j on the earlier vectors: sum_t c_t[j] c_t, BLOCK_T rows at a time
            acc = tl.zeros((BLOCK_N,), tl.float32)
            t0 = 0
            while t0 < i:
                t = t0 + tt
                tok = t < i
                cj = tl.load(cb + t * N + j, mask=tok, other=0.0)                               # [BLOCK_T]
                ct = tl.load(cb + t[:, None] * N + n[None, :], mask=tok[:, None] & valid[None, :],
                             other=0.0)                                                          # [BLOCK_T, BLOCK_N]
                acc += tl.sum(cj[:, None] * ct, axis=0)
                t0 += BLOCK_T
            # a gain <= eps: e = 0 (dividing by inf), as the torch loop does
            e = tl.div_rn(row - acc, tl.where(dj > eps, tl.sqrt_rn(tl.maximum(dj, eps)), float("inf")))
            tl.store(cb + i * N + n, e, mask=valid)
            chosen = tl.where(pick, 1, chosen)
            d2 = tl.where((chosen != 0) | (n >= N), float("-inf"), d2 - e * e)   # launched without FMA fusion
            tl.debug_barrier()   # c_i (written lane by lane) is read whole, and at column j, from the next step on
            i += 1
        slot = tl.cumsum(chosen, axis=0) - 1
        tl.store(out_ptr + b * k + slot, n.to(tl.int64), mask=chosen != 0)


# the launch functions below define the kernel above (import triton) on their first call
_with_kernels = lazy_definer(globals(), lambda: _define())


def _fit(L) -> str | None:
    """None when the Triton kernel takes L, else what it needs."""
    if L.dim() != 3 or L.shape[1] != L.shape[2]:
        return f"L [B, N, N] (got {tuple(L.shape)})"
    if L.dtype not in _FLOATS:
        return f"a floating-point L (got {L.dtype})"
    if L.shape[1] > MAX_N:
        return f"N <= {MAX_N} (got N={L.shape[1]})"
    return None


def fits(L) -> bool:
    """Whether the Triton kernel can run on L here (CUDA, or the interpreter on CPU; shape and dtype it takes)."""
    return usable(L) and _fit(L) is None


def dpp_greedy_triton(L: torch.Tensor, k: int, order: bool = False):
    """Greedy MAP of a DPP with kernel L [B, N, N] (fp16 / bf16 / fp32 / fp64, any strides; computed in fp32):
    [B, k] int64 indices, ascending, in one launch. ``order=True``: (ascending, the picks in pick order). The same
    picks as the torch loop (vltok.methods.dpp.dpp_greedy_torch) up to fp32 rounding of the gains (see the module
    docstring); N up to MAX_N."""
    why = _fit(L)
    if not usable(L):
        why = "triton and a CUDA tensor (or TRITON_INTERPRET=1 with a CPU tensor)"
    if why is not None:
        raise RuntimeError(f"dpp_greedy: the Triton kernel needs {why}; use impl='torch'")
    N = L.shape[1]
    if not 1 <= k <= N:
        raise ValueError(f"dpp: k={k} must be in [1, {N}]")
    return _launch(L, int(k), order)


def config(N: int, tile: int | None = None, warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_T, num_warps) for N tokens: BLOCK_N the next power of two; BLOCK_T rows of c per inner step so
    that a step reads about ``tile`` elements (default _TILE); warps by BLOCK_N unless given (tuning: the speed
    script's --sweep)."""
    block_n = max(16, 1 << (max(int(N), 1) - 1).bit_length())
    block_t = max(1, min(16, (tile or _TILE) // block_n))
    if warps is None:
        warps = 4 if block_n <= 512 else 8 if block_n <= 4096 else 16   # sm_90: no spills up to 4096; 8192: a few bytes
    return block_n, block_t, warps


@_with_kernels
def _launch(L, k, order, tile=None, warps=None):
    B, N, _ = L.shape
    out = torch.empty(B, k, dtype=torch.int64, device=L.device)
    picks = torch.empty(B, k, dtype=torch.int64, device=L.device)
    if B:
        c = torch.empty(B, k, N, dtype=torch.float32, device=L.device)
        block_n, block_t, warps = config(N, tile, warps)
        _greedy_kernel[(B,)](L, c, picks, out, N, k, L.stride(0), L.stride(1), L.stride(2), EPS, BLOCK_N=block_n,
                             BLOCK_T=block_t, num_warps=warps,
                             enable_fp_fusion=False)   # e^2 rounded, then subtracted, as torch's square and sub
    return (out, picks) if order else out
