"""vltok.kernels: accelerated versions of vltok's pure tensor functions, with the same signatures.

This release has no Triton kernels yet: the methods call their torch implementations directly (for Fourier,
one GEMM with a cached basis, see vltok.methods.fourier.dct_lowpass). Triton kernels land with the GPU issue.
"""
