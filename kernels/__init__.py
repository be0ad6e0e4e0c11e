"""vltok.kernels: accelerated versions of vltok's pure tensor functions, with the same signatures.

Triton kernels next to torch references (the definitions), picked for CUDA tensors (CPU tests run them under
TRITON_INTERPRET=1): dct (Fourier's DCT low-pass; the dispatcher is vltok.methods.fourier.dct_lowpass's ``impl``),
cgsm (CrossGET's matching), gather (token compaction at an in-LLM cut) and select (the in-LLM cut's last-row
attention scores, stable top-k per row and column compaction). eval/kernel_bench.py times them on a GPU.
"""
