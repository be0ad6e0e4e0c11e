"""Triton kernels against their torch references (CPU: TRITON_INTERPRET=1; GPU: the real kernels)."""
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the `kernels` extra (pip install triton)")

from vltok.kernels.dct import dct_lowpass as triton_lowpass  # noqa: E402
from vltok.methods.fourier import dct_lowpass  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("h,w,r_h,r_w,C", [(8, 8, 4, 4, 32), (6, 10, 3, 7, 80), (24, 24, 10, 10, 16), (5, 3, 2, 2, 130)])
@pytest.mark.parametrize("gain", ["resize", "paper"])
def test_triton_lowpass_matches_dense_fp32(h, w, r_h, r_w, C, gain):
    x = torch.randn(3, h * w, C, device=DEV)
    ref = dct_lowpass(x.double(), h, w, r_h, r_w, gain=gain, impl="dense")
    y = triton_lowpass(x, h, w, r_h, r_w, gain=gain)
    assert y.shape == (3, r_h * r_w, C) and y.dtype == torch.float32
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5


def test_triton_lowpass_strided_input_and_bf16():
    base = torch.randn(2, 40, 64, device=DEV)
    x = base.transpose(1, 2)            # [2, 64, 40]: an 8x8 grid with strided tokens
    ref = dct_lowpass(x.contiguous().double(), 8, 8, 4, 4)
    y = triton_lowpass(x, 8, 8, 4, 4)
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-5
    # the CPU interpreter computes through numpy, which has no bfloat16: bf16 is checked on the GPU only
    for dt in (torch.float16, torch.bfloat16) if DEV == "cuda" else (torch.float16,):
        yl = triton_lowpass(x.contiguous().to(dt), 8, 8, 4, 4)
        assert yl.dtype == dt
        assert ((yl.double() - ref).norm() / ref.norm()) < 1e-2


def test_triton_lowpass_refuses_fp64_with_a_clear_message():
    with pytest.raises(RuntimeError, match="impl='dense'"):
        triton_lowpass(torch.randn(1, 16, 4, dtype=torch.float64, device=DEV), 4, 4, 2, 2)
