"""vltok.kernels.dpp: the fused Triton greedy MAP against the torch loop (vltok.methods.dpp.dpp_greedy_torch, the
definition). CPU: TRITON_INTERPRET=1 (set by conftest.py); GPU checks at LLaVA-1.5 / LLaVA-NeXT sizes are marked
gpu. Indices are compared exactly, in pick order; where fp32 rounding leaves near-equal gains (k past the kernel's
numerical rank) both picks are checked against a float64 replay of the greedy instead."""
import json

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the `kernels` extra (pip install triton)")

from vltok.kernels import dpp as kmod  # noqa: E402
from vltok.kernels.dpp import MAX_N, dpp_greedy_triton  # noqa: E402
from vltok.methods.dpp import dpp_greedy, dpp_greedy_torch, dpp_kernel, relevance  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_kernel(B, N, C, g, conditional=True, dev=DEV):
    """A relevance-weighted kernel as the dpp method builds it: random features [B, N, C] and random text."""
    x = torch.randn(B, N, C, generator=g)
    rel = relevance(x, [torch.randn(4, C, generator=g) for _ in range(B)]) if conditional else None
    return dpp_kernel(x.to(dev), None if rel is None else rel.to(dev))


def shortfall(L, order):
    """Replays each sample's picks in float64: the largest gap, over the steps, between the best remaining gain and
    the picked token's gain, relative to the largest diagonal entry (0: every pick was a greedy argmax). Also checks
    that no token is picked twice."""
    worst = 0.0
    for b in range(L.shape[0]):
        Lb = L[b].double().cpu()
        scale = float(Lb.diagonal().max())
        d2, cs = Lb.diagonal().clone(), []
        taken = torch.zeros(Lb.shape[0], dtype=torch.bool)
        for j in order[b].tolist():
            assert not taken[j], f"token {j} picked twice"
            worst = max(worst, float(d2.masked_fill(taken, float("-inf")).max() - d2[j]) / scale)
            row = Lb[j] - sum((c[j] * c for c in cs), torch.zeros_like(d2))
            e = row / d2[j].sqrt() if d2[j] > 1e-12 * scale else torch.zeros_like(d2)
            cs.append(e)
            d2 = d2 - e.square()
            taken[j] = True
    return worst


# -- the same picks as the torch loop --------------------------------------------------------------------------------
@pytest.mark.parametrize("B,N,C,k,conditional", [
    (1, 1, 4, 1, True),        # N = 1
    (2, 20, 32, 1, True),      # k = 1
    (2, 37, 48, 37, True),     # N not a power of two, k = N
    (2, 64, 96, 16, False),    # plain diversity (L = S)
    (1, 100, 128, 24, True),   # several c tiles per step
])
def test_same_picks_as_the_torch_loop(B, N, C, k, conditional):
    """Full-rank kernels (C > N): no near-equal gains, so the picks are the torch loop's, in the same order."""
    L = random_kernel(B, N, C, torch.Generator().manual_seed(N + k), conditional)
    want, want_order = dpp_greedy_torch(L, k, order=True)
    got, got_order = dpp_greedy_triton(L, k, order=True)
    assert got.dtype == torch.int64 and got.shape == (B, k)
    assert torch.equal(got_order, want_order)
    assert torch.equal(got, want) and torch.equal(got, got_order.sort(dim=1).values)
    assert torch.equal(dpp_greedy(L, k, impl="triton"), want)
    assert shortfall(L, got_order) == 0.0


def test_strided_and_low_precision_kernels():
    """L read through its strides (a transposed view, a slice of a bigger tensor) and in fp16 / bf16 / fp64 (computed
    in fp32, as the torch loop's L.float())."""
    g = torch.Generator().manual_seed(3)
    L = random_kernel(2, 24, 32, g)
    big = torch.zeros(2, 30, 40, device=DEV)
    big[:, 5:29, 10:34] = L
    for view in (L.transpose(1, 2), big[:, 5:29, 10:34]):
        assert not view.is_contiguous()
        assert torch.equal(dpp_greedy_triton(view, 8), dpp_greedy_torch(view, 8))
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        Lc = L.to(dtype)
        assert torch.equal(dpp_greedy_triton(Lc, 8), dpp_greedy_torch(Lc, 8))


def test_exact_ties_go_to_the_lower_index_in_both():
    """One-hot features with duplicates and dyadic relevance: every value is exact in fp32, so the gains tie exactly
    (duplicates of a picked token drop to 0, the rest keep r^2); both loops take the lowest index of a tie, up to
    k = N."""
    g = torch.Generator().manual_seed(0)
    B, N, groups = 2, 30, 7
    which = torch.randint(groups, (B, N), generator=g)
    x = torch.nn.functional.one_hot(which, groups).float()
    rel = torch.tensor([0.5, 1.0, 0.75])[torch.randint(3, (B, N), generator=g)]
    L = dpp_kernel(x.to(DEV), rel.to(DEV))
    for k in (1, groups + 5, N):
        want, want_order = dpp_greedy_torch(L, k, order=True)
        got, got_order = dpp_greedy_triton(L, k, order=True)
        assert torch.equal(got_order, want_order) and torch.equal(got, want)
    # the hand-checkable start: per sample, the first pick is the lowest index of relevance 1
    first = [int((rel[b] == 1).nonzero()[0]) for b in range(B)]
    assert dpp_greedy_triton(L, N, order=True)[1][:, 0].tolist() == first


@pytest.mark.parametrize("C", [3, 8])
def test_past_the_numerical_rank_both_are_valid_greedy_choices(C):
    """Features of rank C, k = N: after C picks every gain is fp32 rounding noise, which the two loops compute in a
    different order, so they may order the rest differently (documented). Both return k distinct tokens, agree on the
    first C picks, and every pick of either is a greedy argmax up to 1e-5 of the largest gain in a float64 replay."""
    g = torch.Generator().manual_seed(C)
    B, N = 2, 32
    L = random_kernel(B, N, C, g)
    want, want_order = dpp_greedy_torch(L, N, order=True)
    got, got_order = dpp_greedy_triton(L, N, order=True)
    ar = torch.arange(N, device=L.device).expand(B, N)
    assert torch.equal(got, ar) and torch.equal(want, ar)          # k = N: every token once
    assert torch.equal(got_order[:, :C], want_order[:, :C])
    assert shortfall(L, got_order) < 1e-5 and shortfall(L, want_order) < 1e-5
    k = C + 4                                                       # a set past the rank is a valid greedy one too
    got_k, order_k = dpp_greedy_triton(L, k, order=True)
    assert len(set(order_k[0].tolist())) == k and shortfall(L, order_k) < 1e-5


def test_nan_in_the_kernel_still_gives_distinct_tokens():
    L = random_kernel(2, 30, 40, torch.Generator().manual_seed(1))
    L[0, 3, :] = float("nan")
    L[1, :, 7] = float("nan")
    for fn in (dpp_greedy_torch, dpp_greedy_triton):
        out = fn(L, 20)
        assert all(len(set(r)) == 20 for r in out.tolist())
        assert all(0 <= i < 30 for r in out.tolist() for i in r)


# -- dispatch and refusals -------------------------------------------------------------------------------------------
def test_auto_runs_the_kernel_where_triton_runs(monkeypatch):
    calls = []
    real = kmod.dpp_greedy_triton
    monkeypatch.setattr(kmod, "dpp_greedy_triton", lambda L, k: calls.append(k) or real(L, k))
    L = random_kernel(2, 20, 32, torch.Generator().manual_seed(2))
    want = dpp_greedy_torch(L, 5)
    assert torch.equal(dpp_greedy(L, 5), want) and calls == [5]           # auto: CUDA, or the interpreter on CPU
    assert torch.equal(dpp_greedy(L, 5, impl="torch"), want) and calls == [5]
    monkeypatch.setenv("VLTOK_DISABLE_TRITON", "1")
    assert torch.equal(dpp_greedy(L, 5), want) and calls == [5]           # auto falls back to the torch loop
    with pytest.raises(RuntimeError, match="impl='torch'"):
        dpp_greedy(L, 5, impl="triton")                                     # forced: refused, the fix named
    monkeypatch.delenv("VLTOK_DISABLE_TRITON")
    calls.clear()
    huge = torch.eye(1, device=L.device)[None].expand(1, MAX_N + 1, MAX_N + 1)   # zero strides: no memory
    assert dpp_greedy(huge, 1).tolist() == [[0]] and calls == []           # N > MAX_N: auto takes the torch loop
    with pytest.raises(RuntimeError, match=f"N <= {MAX_N}"):
        dpp_greedy(huge, 1, impl="triton")
    with pytest.raises(RuntimeError, match="floating-point"):
        dpp_greedy_triton(torch.ones(1, 3, 3, dtype=torch.long, device=L.device), 1)


def test_bad_k_and_impl_refused_alike():
    L = random_kernel(1, 6, 8, torch.Generator().manual_seed(0))
    for impl in ("auto", "torch", "triton"):
        for k in (0, 7, -1):
            with pytest.raises(ValueError, match=rf"dpp: k={k} must be in \[1, 6\]"):
                dpp_greedy(L, k, impl=impl)
    with pytest.raises(ValueError, match="impl must be one of"):
        dpp_greedy(L, 2, impl="cuda")


def test_empty_batch():
    L = torch.zeros(0, 5, 5, device=DEV)
    assert dpp_greedy_triton(L, 2).shape == (0, 2) and dpp_greedy_torch(L, 2).shape == (0, 2)


# -- GPU: the sizes the method meets ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,N,C,k", [(8, 576, 1024, 92), (2, 2880, 4096, 460)])
def test_same_picks_at_llava_sizes_on_gpu(B, N, C, k):
    """LLaVA-1.5 keep 0.16 (576 -> 92) at batch 8 and LLaVA-NeXT keep 0.16 (2880 -> 460): random full-rank
    relevance-weighted kernels, the compiled kernel's picks equal the torch loop's (on a mismatch the message says
    whether the first differing step was a near tie in float64)."""
    L = random_kernel(B, N, C, torch.Generator().manual_seed(N), dev="cuda")
    want, want_order = dpp_greedy_torch(L, k, order=True)
    got, got_order = dpp_greedy_triton(L, k, order=True)
    assert torch.equal(dpp_greedy(L, k), got)                              # auto runs the kernel on CUDA
    if not torch.equal(got_order, want_order):
        pytest.fail(f"picks differ; float64 shortfall of the kernel's {shortfall(L, got_order):.3g}, of the torch "
                    f"loop's {shortfall(L, want_order):.3g} (near 0: a near tie)")
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_exact_ties_at_llava_next_size_on_gpu():
    g = torch.Generator().manual_seed(1)
    B, N, groups = 2, 2880, 300
    x = torch.nn.functional.one_hot(torch.randint(groups, (B, N), generator=g), groups).float().cuda()
    rel = torch.tensor([0.5, 1.0, 0.75, 0.25])[torch.randint(4, (B, N), generator=g)].cuda()
    L = dpp_kernel(x, rel)
    want, want_order = dpp_greedy_torch(L, 460, order=True)
    got, got_order = dpp_greedy_triton(L, 460, order=True)
    assert torch.equal(got_order, want_order) and torch.equal(got, want)


def test_speed_script_smoke(tmp_path, capsys):
    """eval/tools/dpp_kernel_speed.py at a tiny size (the interpreter on CPU): one row per case, same picks, the
    table and the JSON written under --out-dir."""
    from vltok.eval.tools import dpp_kernel_speed

    rows = dpp_kernel_speed.main(["--batch", "1", "2", "--n", "12", "--keep", "0.5", "--dim", "16", "--reps", "1",
                                  "--warmup", "0", "--out-dir", str(tmp_path)])
    assert [(r["B"], r["N"], r["k"]) for r in rows] == [(1, 12, 6), (2, 12, 6)]
    assert all(r["same_picks"] and r["torch_ms"] > 0 and r["triton_ms"] > 0 for r in rows)
    md = (tmp_path / "dpp-kernel-speed.md").read_text()
    assert "| 2 | 12 | 0.5 | 6 |" in md and "True" in md
    assert len(json.loads((tmp_path / "dpp-kernel-speed.json").read_text())["rows"]) == 2
