"""Fourier-VLM op against an independent torch.fft reference, gains, rounding, precision, baselines."""
import math

import pytest
import torch

from vltok.methods._grid import grid_for_keep
from vltok.methods.baselines import pool_grid, random_indices
from vltok.methods.fourier import dct_lowpass


def dct2_fft(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal DCT-II along dim via a length-2N FFT of the symmetric extension."""
    x = x.movedim(dim, -1)
    n = x.shape[-1]
    y = torch.fft.fft(torch.cat([x, x.flip(-1)], -1))[..., :n]
    k = torch.arange(n, dtype=x.dtype)
    out = (y * torch.exp(-1j * math.pi * k / (2 * n))).real / 2
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=x.dtype)
    scale[0] = math.sqrt(1.0 / n)
    return (out * scale).movedim(-1, dim)


def idct2_fft(c: torch.Tensor, dim: int) -> torch.Tensor:
    """Orthonormal inverse DCT (DCT-III) along dim via a length-2r inverse FFT."""
    c = c.movedim(dim, -1)
    r = c.shape[-1]
    a = torch.full((r,), math.sqrt(2.0 / r), dtype=c.dtype)
    a[0] = math.sqrt(1.0 / r)
    k = torch.arange(r, dtype=c.dtype)
    z = torch.zeros(*c.shape[:-1], 2 * r, dtype=torch.complex128 if c.dtype == torch.float64 else torch.complex64)
    z[..., :r] = c * a * torch.exp(1j * math.pi * k / (2 * r))
    x = (torch.fft.ifft(z) * 2 * r).real[..., :r]
    return x.movedim(-1, dim)


def fft_reference(x, h, w, r_h, r_w, gain):
    """x [B, h*w, C] -> DCT over (h, w), crop the low r_h x r_w block, inverse DCT of size r."""
    g = x.unflatten(1, (h, w))
    c = dct2_fft(dct2_fft(g, 1), 2)[:, :r_h, :r_w]
    y = idct2_fft(idct2_fft(c, 1), 2).flatten(1, 2)
    return y * (math.sqrt(r_h * r_w / (h * w)) if gain == "resize" else 1.0)


CASES = [(24, 24, 12, 12), (24, 24, 10, 10), (15, 21, 10, 14), (7, 5, 3, 5), (24, 24, 1, 1), (9, 12, 9, 4)]


@pytest.mark.parametrize("h,w,r_h,r_w", CASES)
@pytest.mark.parametrize("impl", ["dense", "separable"])
@pytest.mark.parametrize("gain", ["resize", "paper"])
def test_matches_fft_reference(h, w, r_h, r_w, impl, gain):
    x = torch.randn(2, h * w, 6, generator=torch.Generator().manual_seed(h * w + r_h))
    ref = fft_reference(x.double(), h, w, r_h, r_w, gain)
    assert torch.allclose(dct_lowpass(x.double(), h, w, r_h, r_w, gain=gain, impl=impl), ref, atol=1e-12)
    y32 = dct_lowpass(x, h, w, r_h, r_w, gain=gain, impl=impl)
    assert y32.dtype == torch.float32 and y32.shape == (2, r_h * r_w, 6)
    assert (y32.double() - ref).abs().max() < 1e-5


def test_constant_grid_gain():
    x = torch.full((1, 24 * 24, 3), 2.5, dtype=torch.float64)
    assert torch.allclose(dct_lowpass(x, 24, 24, 12, 12), torch.full((1, 144, 3), 2.5, dtype=torch.float64))
    paper = dct_lowpass(x, 24, 24, 12, 12, gain="paper")
    assert torch.allclose(paper, torch.full_like(paper, 2.5 * 2.0))  # sqrt(576/144) = 2
    one = dct_lowpass(torch.randn(1, 35, 2, dtype=torch.float64), 5, 7, 1, 1)
    assert one.shape == (1, 1, 2)


def test_mean_at_r1_and_input_untouched():
    x = torch.randn(3, 35, 4, dtype=torch.float64)
    x0 = x.clone()
    y = dct_lowpass(x, 5, 7, 1, 1)
    assert torch.allclose(y[:, 0], x.mean(1))
    assert torch.equal(x, x0)


def test_bf16_close_to_fp32_and_deterministic():
    x = torch.randn(2, 576, 64, generator=torch.Generator().manual_seed(1))
    y32 = dct_lowpass(x, 24, 24, 12, 12)
    yb = dct_lowpass(x.bfloat16(), 24, 24, 12, 12)
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - y32).abs().max() <= 0.007 * y32.abs().max()
    assert torch.equal(yb, dct_lowpass(x.bfloat16(), 24, 24, 12, 12))
    yp = dct_lowpass(x.bfloat16(), 24, 24, 12, 12, precise=True)
    assert yp.dtype == torch.bfloat16


@pytest.mark.parametrize("keep,floor,nearest", [(0.5, 16, 17), (0.444, 16, 16), (0.25, 12, 12), (0.16, 9, 10),
                                                (0.111, 8, 8), (0.0625, 6, 6)])
def test_keep_to_grid_rules(keep, floor, nearest):
    assert grid_for_keep(24, 24, keep, "floor") == (floor, floor)
    assert grid_for_keep(24, 24, keep, "nearest") == (nearest, nearest)


def test_keep_rule_on_nonsquare_and_tiny():
    assert grid_for_keep(36, 52, 0.16, "floor") == (14, 20)   # spec's Qwen2-VL-7B example
    assert grid_for_keep(2, 2, 0.01, "nearest") == (1, 1)


def test_pool_grid_matches_avg_pool_when_divisible():
    x = torch.randn(2, 8 * 6, 5)
    y = pool_grid(x, 8, 6, 4, 3)
    ref = torch.nn.functional.avg_pool2d(x.unflatten(1, (8, 6)).permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(y, ref, atol=1e-6)


def test_random_indices_seeded_sorted_unique():
    a, b = random_indices(576, 92, 0), random_indices(576, 92, 0)
    assert torch.equal(a, b) and a.numel() == 92 and a.unique().numel() == 92
    assert torch.all(a[1:] > a[:-1])
    assert not torch.equal(a, random_indices(576, 92, 1))
