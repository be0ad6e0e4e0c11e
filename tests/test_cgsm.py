"""CGSM: the rank-compare torch path against a brute-force greedy emulation; Triton against torch; the merge."""
import pytest
import torch

from vltok.kernels.cgsm import cgsm_match_torch, merge_weighted

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def brute_force(metric, imp, r, protected):
    """Direct loops over the definition (one sample)."""
    N = metric.shape[0]
    s = metric.double() @ metric.double().T
    s = (s + s.T) / 2   # exactly symmetric: mutual nearest neighbours tie, and the index breaks the tie
    allowed = lambda i, j: i != j and not protected[i] and not protected[j]  # noqa: E731
    rowmax = [max([s[i, j].item() for j in range(N) if allowed(i, j)], default=float("-inf")) for i in range(N)]
    order = sorted(range(N), key=lambda i: (-rowmax[i], i))
    rank = {t: k for k, t in enumerate(order)}
    masked = [max([s[i, j].item() for j in range(N) if allowed(i, j) and rank[j] > rank[i]], default=float("-inf"))
              for i in range(N)]
    score = [float("inf") if protected[i] else imp[i].item() - masked[i] for i in range(N)]
    src = sorted(range(N), key=lambda i: (score[i], i))[:r]
    dst = []
    for i in src:
        cands = [j for j in range(N) if j not in src and not protected[j]]
        dst.append(max(cands, key=lambda j: (s[i, j].item(), -j)))
    return src, dst


@pytest.mark.parametrize("seed", range(4))
def test_rank_compare_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    B, N, d, r = 2, 13, 5, 5
    m = torch.nn.functional.normalize(torch.randn(B, N, d, generator=g, dtype=torch.float64), dim=-1)
    imp = torch.rand(B, N, generator=g, dtype=torch.float64) * 0.1
    protected = torch.zeros(B, N, dtype=torch.bool)
    protected[:, 0] = True
    protected[1, N - 1] = True
    src, dst, _ = cgsm_match_torch(m, imp, r, protected)
    for b in range(B):
        bs, bd = brute_force(m[b], imp[b], r, protected[b].tolist())
        assert src[b].tolist() == bs and dst[b].tolist() == bd


def test_ties_break_by_index():
    m = torch.nn.functional.normalize(torch.tensor([[[1.0, 0], [1, 0], [1, 0], [0, 1], [0, 1], [1, 1]]]), dim=-1)
    imp = torch.zeros(1, 6)
    src, dst, _ = cgsm_match_torch(m, imp, 2, None)
    bs, bd = brute_force(m[0], imp[0], 2, [False] * 6)
    assert src[0].tolist() == bs and dst[0].tolist() == bd
    assert set(src[0].tolist()).isdisjoint(dst[0].tolist())


def test_merge_equal_importance_is_size_weighted_mean_and_sizes_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=g, dtype=torch.float64)
    size = torch.tensor([1.0, 2, 1, 3, 1, 1, 2], dtype=torch.float64).expand(2, 7)[..., None].contiguous()
    src = torch.tensor([[2, 5], [1, 6]])
    dst = torch.tensor([[0, 0], [3, 4]])
    y, sz = merge_weighted(x, size, torch.zeros(2, 7, dtype=torch.float64), src, dst)
    assert y.shape == (2, 5, 3) and torch.allclose(sz.sum(1), size.sum(1))
    ref0 = (x[0, 0] * 1 + x[0, 2] * 1 + x[0, 5] * 1) / 3
    assert torch.allclose(y[0, 0], ref0)
    assert torch.allclose(y[0, 1], x[0, 1]) and torch.allclose(y[0, 2], x[0, 3])   # order kept
    ref1 = (x[1, 3] * 3 + x[1, 1] * 2) / 5
    assert torch.allclose(y[1, 2], ref1)


@pytest.mark.skipif(pytest.importorskip("triton") is None, reason="needs triton")
@pytest.mark.parametrize("N,d,r", [(37, 16, 9), (70, 40, 20)])
def test_triton_matches_torch(N, d, r):
    from vltok.kernels.cgsm import cgsm_match_triton

    g = torch.Generator().manual_seed(N)
    m = torch.nn.functional.normalize(torch.randn(2, N, d, generator=g), dim=-1).to(DEV)
    imp = (torch.rand(2, N, generator=g) * 0.01).to(DEV)
    protected = torch.zeros(2, N, dtype=torch.bool, device=DEV)
    protected[:, 0] = True
    a = cgsm_match_torch(m, imp, r, protected)
    b = cgsm_match_triton(m, imp, r, protected)
    for x, y in zip(a, b):
        assert torch.equal(x.cpu(), y.cpu())
