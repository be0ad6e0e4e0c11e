"""vltok.kernels.gather: the Triton token compaction against its torch reference (CPU: TRITON_INTERPRET=1)."""
import pytest
import torch

from vltok.kernels.gather import gather_rows, gather_rows_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sorted_idx(B, n, k, g):
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(B)]).to(DEV)


def test_reference_is_row_gather():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 5, generator=g)
    idx = torch.tensor([[0, 3, 6], [1, 2, 5]])
    cos = torch.randn(1, 9, 4, generator=g)
    pid = torch.arange(9)[None] * 10
    pe_idx = torch.tensor([[0, 4, 8], [2, 3, 7]])
    y, c, s, p = gather_rows_torch(x, idx, cos, -cos, pe_idx, pid)
    for b in range(2):
        assert torch.equal(y[b], x[b, idx[b]]) and torch.equal(c[b], cos[0, pe_idx[b]])
        assert torch.equal(s[b], -cos[0, pe_idx[b]]) and torch.equal(p[b], pe_idx[b] * 10)
    assert gather_rows_torch(x, idx)[1:] == (None, None, None)


@pytest.mark.parametrize("B,N,D,S,hd,k", [(1, 12, 40, 12, 8, 5), (3, 50, 130, 60, 16, 17), (2, 9, 1500, 9, 6, 9)])
@pytest.mark.parametrize("pe_batch", [1, "B"])
def test_triton_matches_reference_exactly(B, N, D, S, hd, k, pe_batch):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(B * N + k)
    pb = B if pe_batch == "B" else 1
    x = torch.randn(B, N, D, generator=g).to(DEV)
    cos, sin = torch.randn(pb, S, hd, generator=g).to(DEV), torch.randn(pb, S, hd, generator=g).to(DEV)
    pid = torch.randint(0, 1000, (pb, S), generator=g).to(DEV)
    idx, pe_idx = sorted_idx(B, N, k, g), sorted_idx(B, S, k, g)
    want = gather_rows_torch(x, idx, cos, sin, pe_idx, pid)
    got = gather_rows(x, idx, cos, sin, pe_idx, pid, impl="triton")
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    # hidden only; a strided (non-contiguous batch / token axes) input; fp16
    xs = torch.randn(N, B, D, generator=g).to(DEV).transpose(0, 1)
    assert torch.equal(gather_rows(xs, idx, impl="triton")[0], gather_rows_torch(xs, idx)[0])
    xh = x.half()
    assert torch.equal(gather_rows(xh, idx, impl="triton")[0], gather_rows_torch(xh, idx)[0])


def test_auto_picks_torch_on_cpu_and_bad_calls_are_refused():
    x = torch.randn(1, 4, 3)
    idx = torch.tensor([[1, 2]])
    assert torch.equal(gather_rows(x, idx)[0], x[:, 1:3])
    with pytest.raises(ValueError, match="pe_idx"):
        gather_rows(x, idx, torch.randn(1, 4, 2), torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match="impl"):
        gather_rows(x, idx, impl="cuda")
