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
    for i in src:   # the best similarity; exact ties -> the lowest score, then the lowest index (authors' order)
        cands = [j for j in range(N) if j not in src and not protected[j]]
        dst.append(max(cands, key=lambda j: (s[i, j].item(), -score[j], -j)))
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


def tied_inputs():
    """Token 0 (the source: lowest score) has four exact copies (1, 2, 3, 4), equally similar destinations. Their
    scores (imp - masked max) are -0.6, -0.7, -0.8 and 0.1 (4 ranks last among the copies, so its masked max is
    lower), so the authors' rule (ascending score) picks 3, where the lowest index would pick 1."""
    m = torch.nn.functional.normalize(torch.tensor([[[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0],
                                                    [0, 1, 0], [0, 0, 1], [0, 1, 1]]]), dim=-1)
    imp = torch.tensor([[-5.0, 0.4, 0.3, 0.2, 0.1, 1.0, 1.0, 1.0]])
    return m, imp


def test_destination_ties_go_to_lowest_score():
    m, imp = tied_inputs()
    src, dst, _ = cgsm_match_torch(m, imp, 1, None)
    bs, bd = brute_force(m[0], imp[0], 1, [False] * 8)
    assert src[0].tolist() == bs == [0]
    # exact ties among 1..4: the lowest score (3) wins, not the lowest index (1)
    assert dst[0].tolist() == bd == [3]


def test_destination_ties_random_duplicates():
    """Many exact duplicates and random importances: the torch path equals the written-out rule."""
    g = torch.Generator().manual_seed(5)
    base = torch.nn.functional.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=-1)
    m = base[torch.randint(0, 4, (2, 20), generator=g)]
    imp = torch.rand(2, 20, generator=g, dtype=torch.float64)
    protected = torch.zeros(2, 20, dtype=torch.bool)
    protected[:, 0] = True
    src, dst, _ = cgsm_match_torch(m, imp, 6, protected)
    for b in range(2):
        bs, bd = brute_force(m[b], imp[b], 6, protected[b].tolist())
        assert src[b].tolist() == bs and dst[b].tolist() == bd


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


@pytest.mark.skipif(pytest.importorskip("triton") is None, reason="needs triton")
def test_triton_destination_ties():
    """The Triton path breaks exact destination ties the same way (interpreter on CPU, the kernel on CUDA)."""
    from vltok.kernels import cgsm

    m, imp = tied_inputs()
    a = cgsm_match_torch(m.to(DEV), imp.to(DEV), 1, None)
    b = cgsm.cgsm_match_triton(m.to(DEV), imp.to(DEV), 1, None)
    assert a[1].tolist() == b[1].tolist() == [[3]] and a[0].tolist() == b[0].tolist()
