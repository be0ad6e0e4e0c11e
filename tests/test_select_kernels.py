"""vltok.kernels.select: the Triton in-LLM cut kernels against their torch references (CPU: TRITON_INTERPRET=1,
set by conftest.py; GPU: the real kernels). Scores match to fp32 rounding, indices exactly."""
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the `kernels` extra (pip install triton)")

from vltok.kernels.select import (cut_columns, cut_columns_torch, cut_columns_triton, last_row_scores,  # noqa: E402
                                  last_row_scores_torch, last_row_scores_triton, topk_rows, topk_rows_torch,
                                  topk_rows_triton)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def cut_state(B, Sc, S, K, g, left_pad=(), right_pad=()):
    """A pruned sequence as the engine holds it: prev [B, Sc] ascending absolute columns out of S, am [B, S] with
    left padding (real tokens after the pad), rows [B] the last real current column (right padding: earlier),
    keys [B, K] real current columns <= rows in random order."""
    prev = torch.stack([torch.randperm(S, generator=g)[:Sc].sort().values for _ in range(B)])
    am = torch.ones(B, S, dtype=torch.long)
    rows = torch.full((B,), Sc - 1)
    for b, pad in left_pad:
        am[b, :prev[b, pad]] = 0          # the first `pad` current columns are padding
    for b, pad in right_pad:
        rows[b] = Sc - 1 - pad
    keys = []
    for b in range(B):
        real = [j for j in range(int(rows[b])) if am[b, prev[b, j]] != 0]
        keys.append(torch.tensor(real)[torch.randperm(len(real), generator=g)[:K]])
    return prev, am, rows, torch.stack(keys)


def qk_views(B, Sc, H, Hkv, hd, layout, dtype, g):
    """q [B, Sc, H, hd] and k [B, Sc, Hkv, hd] as the engine sees them: views of projections."""
    if layout == "proj":        # q_proj / k_proj outputs viewed per head (contiguous)
        q = torch.randn(B, Sc, H * hd, generator=g).view(B, Sc, H, hd)
        k = torch.randn(B, Sc, Hkv * hd, generator=g).view(B, Sc, Hkv, hd)
    elif layout == "fused":     # slices of one fused qkv projection (strided rows)
        qkv = torch.randn(B, Sc, (H + 2 * Hkv) * hd, generator=g)
        q = qkv[..., :H * hd].view(B, Sc, H, hd)
        k = qkv[..., H * hd:(H + Hkv) * hd].view(B, Sc, Hkv, hd)
    else:                       # head-major storage transposed to [B, Sc, H, hd]
        q = torch.randn(B, H, Sc, hd, generator=g).transpose(1, 2)
        k = torch.randn(B, Hkv, Sc, hd, generator=g).transpose(1, 2)
    return q.to(dtype).to(DEV), k.to(dtype).to(DEV)


def close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("H,Hkv,hd,layout,dtype", [(8, 2, 16, "proj", torch.float32),
                                                   (4, 4, 32, "fused", torch.float32),
                                                   (8, 2, 16, "heads", torch.float16)])
@pytest.mark.parametrize("rope", [None, "broadcast", "per_sample"])
@pytest.mark.parametrize("norm_all", [False, True])
def test_last_row_scores_matches_reference(H, Hkv, hd, layout, dtype, rope, norm_all):
    g = torch.Generator().manual_seed(H * hd + (rope is None) + 2 * norm_all)
    B, Sc, S, K = 2, 37, 45, 11
    q, k = qk_views(B, Sc, H, Hkv, hd, layout, dtype, g)
    prev, am, rows, keys = cut_state(B, Sc, S, K, g, left_pad=[(0, 4)], right_pad=[(1, 5)])
    prev, am, rows, keys = (t.to(DEV) for t in (prev, am, rows, keys))
    cos = sin = None
    if rope is not None:
        cb = 1 if rope == "broadcast" else B
        cos, sin = (torch.randn(cb, S, hd, generator=g).to(dtype).to(DEV) for _ in range(2))
    args = (q, k, rows, keys, hd ** -0.5, norm_all, prev, am, cos, sin)
    want = last_row_scores_torch(*args)
    close(last_row_scores_triton(*args), want)
    close(last_row_scores(*args, impl="triton"), want)
    if norm_all:   # the key set really differs: without the padding mask the scores change
        assert not torch.allclose(last_row_scores_torch(q, k, rows, keys, hd ** -0.5, True, prev, None, cos, sin), want)


@pytest.mark.parametrize("B,H,Hkv,Sc,K", [(2, 4, 2, 150, 70), (1, 2, 1, 1100, 40)])
def test_last_row_scores_split_key_sets(B, H, Hkv, Sc, K):
    """hd=128 (32-key blocks) and few heads: each head's key set runs in several chunks (up to the 32-chunk cap, the
    second case), some of them empty after a right-padded row; the combined softmax is the reference's."""
    g = torch.Generator().manual_seed(Sc)
    hd = 128
    q, k = qk_views(B, Sc, H, Hkv, hd, "fused", torch.float32, g)
    prev, am, rows, keys = cut_state(B, Sc, Sc + 20, K, g, left_pad=[(0, 3)], right_pad=[(B - 1, 60)])
    prev, am, rows, keys = (t.to(DEV) for t in (prev, am, rows, keys))
    cos, sin = (torch.randn(1, Sc + 20, hd, generator=g).to(DEV) for _ in range(2))
    for norm_all in (False, True):
        args = (q, k, rows, keys, hd ** -0.5, norm_all, prev, am, cos, sin)
        close(last_row_scores_triton(*args), last_row_scores_torch(*args))


@pytest.mark.parametrize("am_dtype", [torch.bool, torch.int32])
def test_last_row_scores_norm_all_without_prev_and_odd_keys(am_dtype):
    """am indexed by current column when prev is None (am wider than Sc); keys outside the softmax set (padding,
    after the row) score 0 as in the reference; a key repeated."""
    g = torch.Generator().manual_seed(3)
    B, Sc, H, hd = 2, 20, 2, 16
    q, k = qk_views(B, Sc, H, H, hd, "proj", torch.float32, g)
    am = torch.ones(B, Sc + 3, dtype=am_dtype)
    am[0, :3] = 0
    rows = torch.tensor([19, 14])
    keys = torch.tensor([[1, 5, 5, 19, 7], [2, 16, 3, 14, 0]])
    args = (q, k, rows.to(DEV), keys.to(DEV), 0.3, True, None, am.to(DEV))
    want = last_row_scores_torch(*args)
    assert want[0, 0] == 0 and want[1, 1] == 0
    close(last_row_scores_triton(*args), want)
    args = (q, k, rows.to(DEV), keys.to(DEV), 0.3, True)          # no mask at all
    close(last_row_scores_triton(*args), last_row_scores_torch(*args))


def test_last_row_scores_empty_and_unfit_inputs():
    g = torch.Generator().manual_seed(4)
    q, k = qk_views(2, 9, 4, 2, 16, "proj", torch.float32, g)
    rows = torch.tensor([8, 8], device=DEV)
    out = last_row_scores_triton(q, k, rows, torch.zeros(2, 0, dtype=torch.long, device=DEV), 0.25)
    assert out.shape == (2, 0) and out.dtype == torch.float32
    out = last_row_scores_triton(q[:0], k[:0], rows[:0], torch.zeros(0, 3, dtype=torch.long, device=DEV), 0.25)
    assert out.shape == (0, 3)
    keys = torch.tensor([[0, 3], [1, 2]], device=DEV)
    with pytest.raises(ValueError, match="need prev"):
        last_row_scores_triton(q, k, rows, keys, 0.25, cos=q[:, :, 0], sin=q[:, :, 0])
    q96, k96 = qk_views(2, 9, 4, 2, 96, "proj", torch.float32, g)     # hd not a power of two
    with pytest.raises(RuntimeError, match="impl='torch'"):
        last_row_scores(q96, k96, rows, keys, 0.1, impl="triton")
    with pytest.raises(RuntimeError, match="impl='torch'"):
        last_row_scores(q.double(), k.double(), rows, keys, 0.25, impl="triton")
    # auto takes the reference for what the kernel does not take
    want = last_row_scores_torch(q96, k96, rows, keys, 0.1)
    assert torch.equal(last_row_scores(q96, k96, rows, keys, 0.1), want)


def rounded_scores(G, n, g, levels=4):
    return torch.randint(0, levels, (G, n), generator=g).float() / levels     # many ties


@pytest.mark.parametrize("G,n", [(1, 37), (5, 130)])
@pytest.mark.parametrize("n_forced", [0, 3, 50])
def test_topk_rows_matches_reference_with_ties_and_force(G, n, n_forced):
    g = torch.Generator().manual_seed(G * n + n_forced)
    scores = rounded_scores(G, n, g)
    scores[0, :3] = float("-inf")
    force = None
    if n_forced:
        force = torch.zeros(n, dtype=torch.bool)
        force[torch.randperm(n, generator=g)[:min(n_forced, n - 2)]] = True
        force = force.to(DEV)
    scores = scores.to(DEV)
    for k in (0, 10, n - 1, n + 4, -2):
        want = topk_rows_torch(scores, k, force)
        got = topk_rows_triton(scores, k, force)
        assert got.dtype == torch.int64 and torch.equal(got, want), (k, got, want)
    assert torch.equal(topk_rows(scores, 10, force, impl="triton"), topk_rows_torch(scores, 10, force))


def test_topk_rows_half_precision_strided_and_unfit():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(70, 3, generator=g).round(decimals=1).half().to(DEV)
    scores = base.t()                 # [3, 70], column-strided
    for k in (5, 33):
        assert torch.equal(topk_rows_triton(scores, k), topk_rows_torch(scores, k))
    with pytest.raises(RuntimeError, match="impl='torch'"):
        topk_rows(scores.double(), 5, impl="triton")
    assert torch.equal(topk_rows(scores.double(), 5), topk_rows_torch(scores.double(), 5))   # auto: torch


def slots_cut(B, Sc, sizes, g):
    """Two visual slots per row at different offsets; drop = slot 2's columns then slot 1's (each ascending),
    keep = a random subset of each, shuffled: neither globally sorted."""
    (n1, n2), (k1, k2) = sizes
    drops, keeps = [], []
    for _ in range(B):
        a = int(torch.randint(0, 4, (1,), generator=g))
        c = int(torch.randint(a + n1, Sc - n2 + 1, (1,), generator=g))
        s1, s2 = torch.arange(a, a + n1), torch.arange(c, c + n2)
        kept = torch.cat([s1[torch.randperm(n1, generator=g)[:k1]], s2[torch.randperm(n2, generator=g)[:k2]]])
        drops.append(torch.cat([s2, s1]))
        keeps.append(kept[torch.randperm(k1 + k2, generator=g)])
    prev = torch.stack([torch.randperm(3 * Sc, generator=g)[:Sc].sort().values for _ in range(B)])
    return prev.to(DEV), torch.stack(drops).to(DEV), torch.stack(keeps).to(DEV), Sc - n1 - n2 + k1 + k2


@pytest.mark.parametrize("B,Sc,sizes", [(1, 30, ((9, 8), (3, 2))), (3, 1500, ((600, 500), (100, 0))),
                                        (3, 40, ((10, 12), (0, 12)))])
def test_cut_columns_matches_reference(B, Sc, sizes):
    g = torch.Generator().manual_seed(B * Sc)
    prev, drop, keep, n_out = slots_cut(B, Sc, sizes, g)
    want = cut_columns_torch(prev, drop, keep, n_out)
    for got in (cut_columns_triton(prev, drop, keep, n_out), cut_columns(prev, drop, keep, n_out, impl="triton")):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rel, new = cut_columns_triton(prev, drop[:, :0], keep[:, :0], Sc)      # nothing dropped: every column
    assert torch.equal(rel, torch.arange(Sc, device=DEV).expand(B, Sc)) and torch.equal(new, prev)
    with pytest.raises(RuntimeError, match="impl='torch'"):
        cut_columns(prev.float(), drop, keep, n_out, impl="triton")


@pytest.mark.parametrize("method,kw,kind", [("fastv", dict(keep=0.5, K=2), "b2-left"),
                                            ("feather", dict(keep=0.5), "b2-right")])
def test_engine_with_the_triton_select_equals_torch(monkeypatch, method, kw, kind):
    """The in-LLM engine's own calls (q / k views from its hooks, RoPE cos / sin, padded batches) through the
    Triton kernels select the same columns as through the references."""
    import vltok
    import vltok.inllm as inllm
    import vltok.kernels.select as ks
    from test_inllm import batch, tiny_llava_deep

    m = tiny_llava_deep("sdpa").to(DEV)
    inp = {key: v.to(DEV) for key, v in batch(m, kind).items()}
    calls = []

    def forced(fn, impl):
        def call(*a, **k):
            calls.append((fn.__name__, impl))
            return fn(*a, **dict(k, impl=impl))
        return call

    out, orig = {}, {name: getattr(ks, name) for name in ("last_row_scores", "cut_columns", "topk_rows")}
    for impl in ("torch", "triton"):
        for mod, name in ((inllm, "last_row_scores"), (inllm, "cut_columns"), (ks, "topk_rows")):
            monkeypatch.setattr(mod, name, forced(orig[name], impl))
        with vltok.patched(m, method, **kw) as h:
            out[impl] = (m(**inp).logits, h.inllm_prefill_columns)
    assert {c for c in calls if c[1] == "triton"} == {(n, "triton") for n in ("last_row_scores", "cut_columns",
                                                                              "topk_rows")}
    (want, cols_want), (got, cols_got) = out["torch"], out["triton"]
    assert cols_got.keys() == cols_want.keys() and len(cols_want) >= 2
    for layer in cols_want:
        assert torch.equal(cols_got[layer], cols_want[layer])
    assert (got - want).abs().max() < 1e-5


@pytest.mark.skipif(DEV != "cuda", reason="bf16 through the CPU interpreter (numpy) is not supported")
def test_bf16_on_gpu():
    g = torch.Generator().manual_seed(9)
    q, k = qk_views(2, 300, 32, 8, 128, "fused", torch.bfloat16, g)
    prev, am, rows, keys = (t.to(DEV) for t in cut_state(2, 300, 320, 200, g, left_pad=[(0, 7)]))
    cos, sin = torch.randn(1, 320, 128, device=DEV).bfloat16(), torch.randn(1, 320, 128, device=DEV).bfloat16()
    for norm_all in (False, True):
        args = (q, k, rows, keys, 128 ** -0.5, norm_all, prev, am, cos, sin)
        close(last_row_scores(*args), last_row_scores_torch(*args))
    s = torch.randn(4, 576, device=DEV).bfloat16()
    assert torch.equal(topk_rows(s, 60), topk_rows_torch(s, 60))
