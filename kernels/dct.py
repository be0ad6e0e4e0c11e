"""DCT low-pass as a Triton batched GEMM against the cached basis: Y[b] = M @ X[b].

Same signature as ``vltok.methods.fourier.dct_lowpass``. One program computes a (BLOCK_K x BLOCK_C) tile of one
image's output, streaming that image's tokens; the basis (<= a few hundred KB) stays in L2, each input element is
read ceil(K / BLOCK_K) times (once for K <= 128) and each output element is written once, in the input dtype, with
fp32 accumulation. The gain is folded into the basis and the raster reshape is free (the kernel reads X in place).
"""
from __future__ import annotations


import torch

from ._triton import lazy_definer as _lazy_definer


def _define():
    """Define the Triton kernels (module globals) on first use: `import vltok` must not import triton."""
    global triton, tl, _lowpass_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _lowpass_kernel(m_ptr, x_ptr, y_ptr, K, C, sxb, sxn, sxc, syb, syk, syc,
                        N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        IEEE: tl.constexpr):
        b = tl.program_id(0)
        pc = tl.program_id(1)
        pk = tl.program_id(2)
        rk = pk * BLOCK_K + tl.arange(0, BLOCK_K)
        rc = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            m = tl.load(m_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            x = tl.load(x_ptr + b * sxb + rn[:, None] * sxn + rc[None, :] * sxc,
                        mask=(rn[:, None] < N) & (rc[None, :] < C), other=0.0)
            if IEEE:
                acc += tl.dot(m, x, input_precision="ieee")
            else:
                acc += tl.dot(m, x)
        tl.store(y_ptr + b * syb + rk[:, None] * syk + rc[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
                 mask=(rk[:, None] < K) & (rc[None, :] < C))


# the launch functions below define the kernels above (import triton) on their first call
_with_kernels = _lazy_definer(globals(), lambda: _define())


@_with_kernels
def lowpass_gemm(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """basis [K, N], x [B, N, C] (any strides) -> [B, K, C] in x.dtype (fp32 accumulation)."""
    B, N, C = x.shape
    K = basis.shape[0]
    y = torch.empty(B, K, C, dtype=x.dtype, device=x.device)
    block_k = 64 if K <= 64 else 128
    block_c = 64 if C <= 64 else 128
    grid = (B, triton.cdiv(C, block_c), triton.cdiv(K, block_k))
    _lowpass_kernel[grid](basis, x, y, K, C, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
                          y.stride(2), N=N, BLOCK_K=block_k, BLOCK_N=32, BLOCK_C=block_c,
                          IEEE=x.dtype == torch.float32, num_warps=4, num_stages=3)
    return y


def dct_lowpass(x, h, w, r_h, r_w, gain="resize", impl="auto", precise=False):
    """Triton path of vltok.methods.fourier.dct_lowpass (dense basis; the same result up to fp32 rounding)."""
    from ._triton import usable
    from .dct_basis import check_args as _check, dense_basis as _dense_basis

    _check(x, h, w, r_h, r_w, impl)
    if not usable(x) or x.dtype == torch.float64:
        raise RuntimeError("the Triton DCT low-pass needs triton and a CUDA fp16/bf16/fp32 tensor (or "
                           "TRITON_INTERPRET=1 on CPU); use impl='dense' otherwise")
    if (r_h, r_w) == (h, w) and gain == "resize":
        return x
    work = torch.float32 if precise else x.dtype
    basis = _dense_basis(h, w, r_h, r_w, gain, work, x.device).contiguous()
    return lowpass_gemm(basis, x.to(work)).to(x.dtype)
