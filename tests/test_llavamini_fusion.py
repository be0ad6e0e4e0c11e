"""LLaVA-Mini ``mode="early_fusion"`` (vltok/methods/llavamini.py) on tiny random LLaVA-1.5 (6-layer LLM).

References: "attn" / "drop" = the UNPATCHED model with the dropped visual keys masked out from layer K on
(tests/test_inllm.py's masked reference); "pool" = a decoder loop written here by hand: layers 0..K-1 of the unpatched
decoder on the full sequence, then each image's 8x8 visual hidden rows replaced by window means (windows and centre
tokens from explicit bin formulas), the sequence shortened to text + one column per window (the window centre's
original position id and mask row/column), then layers K..L-1, the final norm and the LM head.
"""
import math

import pytest
import torch

import vltok
from test_inllm import assert_same_until_eos, batch, masked_reference, reference_greedy, tiny_llava_deep
from tiny import IMG
from vltok.inllm import BatchView, Cut, ImageView, Merge
from vltok.methods.llavamini import EarlyFusion, window_centres

EF = dict(mode="early_fusion")


def _bins(n, r):
    """Adaptive pooling bins, written out: window i covers [floor(i*n/r), ceil((i+1)*n/r))."""
    return [(math.floor(i * n / r), math.ceil((i + 1) * n / r)) for i in range(r)]


def pooled_reference(m, inp, K, grid, position_ids=None):
    """The hand-written early-fusion "pool" forward (module docstring): logits [B, S', V] and kept columns [B, S']."""
    lm = m.model.language_model
    seen = {}
    hk = lm.register_forward_pre_hook(lambda mod, a, kw: seen.update(emb=kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        m(**inp, use_cache=False)
    hk.remove()
    x = seen["emb"]
    ids, am = inp["input_ids"], inp["attention_mask"]
    B, S = ids.shape
    pos = torch.arange(S).expand(B, S) if position_ids is None else position_ids
    allowed = torch.ones(S, S, dtype=torch.bool).tril()[None] & am.bool()[:, None, :]
    neg = torch.finfo(torch.float32).min
    with torch.no_grad():
        for layer in lm.layers[:K]:
            mask = torch.zeros(B, 1, S, S).masked_fill(~allowed[:, None], neg)
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=lm.rotary_emb(x, pos))
        (h, w), (r_h, r_w) = (8, 8), grid
        xs, poss, allows, cols = [], [], [], []
        for b in range(B):
            vis = (ids[b] == IMG).nonzero().flatten()          # one 8x8 image, raster order
            rows, centres = [], []
            for y0, y1 in _bins(h, r_h):
                for x0, x1 in _bins(w, r_w):
                    win = [vis[yy * w + xx] for yy in range(y0, y1) for xx in range(x0, x1)]
                    rows.append(x[b, torch.stack(win)].float().mean(0))
                    centres.append(vis[((y0 + y1 - 1) // 2) * w + (x0 + x1 - 1) // 2])
            centres = torch.stack(centres)
            keep = torch.cat([(ids[b] != IMG).nonzero().flatten(), centres]).sort().values
            xb = x[b].clone()
            xb[centres] = torch.stack(rows).to(x.dtype)
            xs.append(xb[keep])
            poss.append(pos[b, keep])
            allows.append(allowed[b][keep][:, keep])
            cols.append(keep)
        x, pos2, allowed2 = torch.stack(xs), torch.stack(poss), torch.stack(allows)
        for layer in lm.layers[K:]:
            mask = torch.zeros(B, 1, *allowed2.shape[1:]).masked_fill(~allowed2[:, None], neg)
            x = layer(x, attention_mask=mask, position_ids=pos2, position_embeddings=lm.rotary_emb(x, pos2))
        return m.lm_head(lm.norm(x)), torch.stack(cols)


def pooled_greedy(m, inp, K, grid, steps):
    """Greedy decoding with the hand-written reference (no cache), positions as generate() makes them."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    for _ in range(steps):
        cur = dict(inp, input_ids=ids, attention_mask=am)
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        logits, _ = pooled_reference(m, cur, K, grid, position_ids=pos)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        am = torch.cat([am, torch.ones_like(nxt)], 1)
    return ids[:, -steps:]


# (reduce, keep, K, pooled grid): 6 layers, N = 64: k = round((keep*6 - K) * 64 / (6 - K))
CASES = [("pool", 0.5, 2, (4, 4)), ("pool", 0.4271, 2, (3, 3)), ("pool", 0.6, 3, (4, 3)),
         ("attn", 0.5, 2, None), ("attn", 0.6, 3, None), ("drop", None, 2, None), ("drop", None, 3, None)]
# (reduce="drop" with K fixes the budget itself, K/L: no keep is given, vltok.api.resolve_keep)


@pytest.mark.parametrize("attn,reduce", [("eager", "pool"), ("sdpa", "attn"), ("sdpa", "drop")])
def test_keep1_is_bit_identical(attn, reduce):   # (drop: without K, which would fix the budget, K=floor(keep*L))
    m = tiny_llava_deep(attn)
    inp = batch(m, "b2-left")
    with torch.no_grad():
        ref = m(**inp).logits
        ref_gen = m.generate(**inp, max_new_tokens=4, do_sample=False)
        K = {} if reduce == "drop" else {"K": 2}
        with vltok.patched(m, "llavamini", keep=1.0, reduce=reduce, **K, **EF) as h:
            assert torch.equal(m(**inp).logits, ref)
            assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), ref_gen)
            assert h.stats["prune_layers"] == [] and h.stats["flops_keep"] == 1.0
        assert torch.equal(m(**inp).logits, ref)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["b1", "b2-left", "b2-right"])
@pytest.mark.parametrize("reduce,keep,K,grid", CASES)
def test_logits_equal_reference(attn, kind, reduce, keep, K, grid):
    m = tiny_llava_deep(attn)
    inp = batch(m, kind)
    saved = {k: v.clone() for k, v in inp.items()}
    with torch.no_grad(), vltok.patched(m, "llavamini", keep=keep, reduce=reduce, K=K, **EF) as h:
        out = m(**inp).logits
        final, cols, s = h.inllm_kept_columns, h.inllm_prefill_columns, h.stats
    for k in inp:
        assert torch.equal(inp[k], saved[k])
    n = 0 if reduce == "drop" else (grid[0] * grid[1] if grid else round((keep * 6 - K) * 64 / (6 - K)))
    assert s["tokens_per_layer"] == [64] * K + [n] * (6 - K) and s["prune_layers"] == [K]
    assert s["flops_keep"] == pytest.approx((K * 64 + (6 - K) * n) / (6 * 64))
    assert [im["tokens_out"] for im in s["images"]] == [n] * final.shape[0]
    if reduce == "pool":
        ref, ref_cols = pooled_reference(m, inp, K, grid)
        assert torch.equal(final, ref_cols)
        real = inp["attention_mask"].gather(1, final).bool()
        assert (out[real] - ref[real]).abs().max() < 1e-5
        return
    ref = masked_reference(m, inp, cols)
    ref_kept = ref[torch.arange(ref.shape[0])[:, None], final]
    real = inp["attention_mask"].gather(1, final).bool()
    assert (out[real] - ref_kept[real]).abs().max() < 1e-5
    for b in range(final.shape[0]):   # every text column survives, and n visual ones
        assert (inp["input_ids"][b, final[b]] == IMG).sum() == n
        assert (inp["input_ids"][b, final[b]] != IMG).sum() == (inp["input_ids"][b] != IMG).sum()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["b1", "b2-left"])
@pytest.mark.parametrize("reduce,keep,K,grid", [CASES[1], CASES[3], CASES[6]])
def test_generate_with_cache_equals_reference(attn, kind, reduce, keep, K, grid):
    m = tiny_llava_deep(attn)
    inp = batch(m, kind)
    S = inp["input_ids"].shape[1]
    with torch.no_grad(), vltok.patched(m, "llavamini", keep=keep, reduce=reduce, K=K, **EF) as h:
        out = m.generate(**inp, max_new_tokens=5, do_sample=False, use_cache=True)
        cols = h.inllm_layer_columns
    assert torch.equal(out[:, :S], inp["input_ids"])
    ref = pooled_greedy(m, inp, K, grid, 5) if reduce == "pool" else reference_greedy(m, inp, cols, 5)
    assert_same_until_eos(out[:, S:], ref)


def test_cache_lengths_per_layer():
    m = tiny_llava_deep("eager")
    inp = batch(m, "b2-left")
    S = inp["input_ids"].shape[1]
    for reduce, n in [("pool", 16), ("drop", 0)]:
        keep = None if reduce == "drop" else 0.5
        with torch.no_grad(), vltok.patched(m, "llavamini", keep=keep, reduce=reduce, K=2, **EF):
            out = m(**inp, use_cache=True)
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [S] * 2 + [S - 64 + n] * 4


def test_attn_scores_equal_eager_attention_rows():
    """reduce="attn" scores an image by the layer K-1 attention (RoPE, softmax over every key) its tokens receive
    from the text rows after it, summed over those rows: the unpatched eager output_attentions, head mean."""
    m = tiny_llava_deep("eager")
    inp = batch(m, "b2-left")
    ids, am = inp["input_ids"], inp["attention_mask"]
    with torch.no_grad():
        att = m(**inp, output_attentions=True).attentions[1]   # layer K-1 = 1
    got = []
    with torch.no_grad(), vltok.patched(m, "llavamini", keep=0.5, reduce="attn", K=2, **EF) as h:
        sel = h.method.in_llm.select

        def spy(cut, view, scores):
            got.append(scores.clone())
            return sel(cut, view, scores)

        h.method.in_llm.select = spy   # an instance select(): the engine takes the per-sample path
        m.model.set_attn_implementation("sdpa")
        m(**inp)
        m.model.set_attn_implementation("eager")
    assert len(got) == 2
    for b in range(2):
        img = (ids[b] == IMG).nonzero().flatten()
        text = [c for c in range(int(img.max()) + 1, ids.shape[1]) if am[b, c]]
        want = att[b, :, text][:, :, img].mean(0)             # [R, 64]
        assert got[b].shape == want.shape and (got[b] - want).abs().max() < 1e-4
    # the batched path picks the same tokens as the per-sample one
    with torch.no_grad(), vltok.patched(m, "llavamini", keep=0.5, reduce="attn", K=2, **EF) as h:
        m(**inp)
        batched = h.inllm_kept_columns
        h.method.in_llm.select = h.method.in_llm.select
        m(**inp)
        assert torch.equal(h.inllm_kept_columns, batched)


def test_pure_functions():
    # centres of adaptive windows: 8 -> 3 bins [0,3) [2,6) [5,8) -> rows 1, 3, 6
    assert window_centres(8, 8, 3, 3).tolist() == [y * 8 + x for y in (1, 3, 6) for x in (1, 3, 6)]
    assert window_centres(24, 24, 24, 24).tolist() == list(range(576))
    # spec §6: keep 0.16 on 576 tokens, 32 layers -> 60 tokens at K = 2, 42 at K = 3; K defaults
    assert EarlyFusion(0.16, 2, "attn", "nearest").count(576, 32) == 60
    assert EarlyFusion(0.16, 3, "attn", "nearest").count(576, 32) == 42
    assert EarlyFusion(0.16, None, "pool", "nearest").depth(32) == 3
    assert EarlyFusion(0.25, None, "pool", "nearest").depth(32) == 2
    assert EarlyFusion(0.16, None, "drop", "nearest").depth(32) == 5
    # pool: the window means of the hidden rows, at the window centres; batched = per image
    ef = EarlyFusion(0.5, 2, "pool", "nearest")
    x = torch.randn(3, 64, 5)
    cut = ef.plan(6, [(64, (8, 8))])[0]
    assert cut == Cut(2, rope=True, query="text", softmax="all", params=(6,), scores=False, hidden=True)
    one = ef.select(cut, ImageView((8, 8), 64, torch.arange(64), hidden=x[1]), None)
    assert isinstance(one, Merge) and one.indices.tolist() == [y * 8 + x_ for y in (0, 2, 4, 6) for x_ in (0, 2, 4, 6)]
    want = x[1].view(4, 2, 4, 2, 5).mean((1, 3)).reshape(16, 5)
    assert torch.allclose(one.rows, want, atol=1e-6)
    many = ef.select_batch(cut, BatchView((8, 8), 64, torch.arange(64).expand(3, 64), hidden=x), None)
    assert torch.equal(many.indices[1], one.indices) and torch.allclose(many.rows[1], one.rows)
    # a grid without a layout pools as one row
    none = ef.select(cut, ImageView(None, 64, torch.arange(64), hidden=x[0]), None)
    assert none.indices.tolist() == [4 * i + 1 for i in range(16)]
    assert torch.allclose(none.rows, x[0].view(16, 4, 5).mean(1), atol=1e-6)


def test_refusals_are_clear_and_leave_nothing_half_applied():
    m = tiny_llava_deep()
    with pytest.raises(vltok.VltokError, match="floor is 0.333"):
        vltok.patch(m, "llavamini", keep=0.3, K=2, **EF)
    with pytest.raises(vltok.InvalidOptionError, match="conflicts with reduce='drop', K=2.*drop K=... to let"):
        vltok.patch(m, "llavamini", keep=0.3, K=2, reduce="drop", **EF)
    with pytest.raises(vltok.VltokError, match="lower K or raise keep"):   # the factory's own rule
        EarlyFusion(0.3, 2, "drop", "nearest").validate(6)
    with pytest.raises(vltok.VltokError, match="raise keep to at least 0.167"):
        vltok.patch(m, "llavamini", keep=0.1, reduce="drop", **EF)
    with pytest.raises(vltok.VltokError, match=r"K=6 must lie in 1\.\.5"):
        vltok.patch(m, "llavamini", keep=0.9, K=6, **EF)
    with pytest.raises(ValueError, match="reduce must be one of"):
        vltok.patch(m, "llavamini", keep=0.5, reduce="mean", **EF)
    with pytest.raises(ValueError, match="early_fusion' only"):
        vltok.patch(m, "llavamini", keep=0.5, K=2)
    assert vltok.get_handle(m) is None and "forward" not in m.__dict__
    inp = batch(m, "b1")
    with pytest.raises(vltok.VltokError, match="labels"), \
            vltok.patched(m, "llavamini", keep=0.5, K=2, **EF):
        m(**inp, labels=inp["input_ids"])


def test_llava_next_ragged_batch_per_sample_path():
    """LLaVA-NeXT, two images of different sizes (per-sample engine path, filler columns): "drop" (0 survivors per
    grid; newlines stay) and "attn" equal the masked reference; "pool" (Merge on the per-sample path) gives each
    sample the logits it gets alone (batched path)."""
    from tiny import llava_next_inputs, tiny_llava_next

    m = tiny_llava_next("sdpa")
    two = llava_next_inputs(m, [[1, -1, 5], [1, 6, 7, -1, 9]], [[80, 120], [64, 64]], padding="left")
    for reduce in ("drop", "attn"):
        keep = None if reduce == "drop" else 0.75   # drop with K: K fixes the budget
        with torch.no_grad(), vltok.patched(m, "llavamini", keep=keep, K=1, reduce=reduce, **EF) as h:
            out = m(**two).logits
            cols, final, dead = h.inllm_prefill_columns, h.inllm_kept_columns, h.inllm_dead_columns
            if reduce == "drop":   # only the NeXT newline tokens (never pruned) are left of each image
                assert [im["tokens_out"] for im in h.stats["images"]] == [10, 8]
        ref = masked_reference(m, two, cols, dead=dead)
        real = two["attention_mask"].gather(1, final).bool()
        if dead:
            real &= ~dead[1]
        assert (out[real] - ref[torch.arange(2)[:, None], final][real]).abs().max() < 1e-5
    with torch.no_grad(), vltok.patched(m, "llavamini", keep=0.75, K=1, reduce="pool", **EF) as h:
        both = m(**two).logits
        final, dead = h.inllm_kept_columns, h.inllm_dead_columns[1]
        assert bool(dead.any())   # one sample keeps fewer columns: masked filler columns pad it
        for b, (p, size) in enumerate([([1, -1, 5], [80, 120]), ([1, 6, 7, -1, 9], [64, 64])]):
            one = llava_next_inputs(m, [p], [size])
            one["pixel_values"] = two["pixel_values"][b:b + 1, :one["pixel_values"].shape[1]]   # the same pixels
            alone = m(**one).logits[0]
            got = both[b][two["attention_mask"][b].gather(0, final[b]).bool() & ~dead[b]]
            assert got.shape == alone.shape and (got - alone).abs().max() < 1e-5
