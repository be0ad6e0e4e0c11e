"""vltok.patch on tiny random LLaVA-1.5 and LLaVA-NeXT: identity, explicit references, generate, batching."""
import pytest
import torch

import vltok
from tiny import IMG, llava_inputs, llava_next_inputs, next_counts, tiny_llava, tiny_llava_next
from test_fourier import fft_reference
from vltok.methods.baselines import pool_grid, random_indices

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, 11, 12, 13, 14, -1, 15, 16, 17, 18]]
NEXT_SIZES = [[80, 120], [64, 64]]
NEXT_PROMPTS = [[1, -1, 5], [1, 6, 7, -1, 9, 10, 11]]


def clone_inputs(inp):
    return {k: v.clone() for k, v in inp.items()}


def assert_same_inputs(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), f"caller's {k} was modified"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["fourier", "pool", "random"])
def test_keep1_is_exact_and_unpatch_restores(attn, method):
    m = tiny_llava(attn)
    inp = llava_inputs(m, PROMPTS)
    ref = m(**inp).logits
    ref_gen = m.generate(**inp, max_new_tokens=4, do_sample=False)
    before = set(m.__dict__)
    h = vltok.patch(m, method, keep=1.0)
    assert torch.equal(m(**inp).logits, ref)
    assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), ref_gen)
    assert h.stats["tokens_in"] == h.stats["tokens_out"] == 2 * 64
    h.remove()
    assert set(m.__dict__) == before and "forward" not in m.__dict__
    assert torch.equal(m(**inp).logits, ref)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep1_is_exact_llava_next(attn):
    m = tiny_llava_next(attn)
    inp = llava_next_inputs(m, NEXT_PROMPTS, NEXT_SIZES)
    ref = m(**inp).logits
    with vltok.patched(m, "fourier", keep=1.0):
        assert torch.equal(m(**inp).logits, ref)
    with vltok.patched(m, "fourier", keep=0.3):
        assert m(**inp).logits.shape[1] < ref.shape[1]
    assert torch.equal(m(**inp).logits, ref)


def manual_llava(m, prompts, reduce_fn, k, padding="left", labels=False):
    """Explicit reference: the UNPATCHED model fed hand-reduced features through inputs_embeds."""
    full = llava_inputs(m, prompts, padding=padding)
    with torch.no_grad():
        hs = m.model.vision_tower(full["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = m.model.multi_modal_projector(reduce_fn(hs))
    red = llava_inputs(m, prompts, padding=padding, n_ph=k)
    ids = red["input_ids"]
    emb = m.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
    kw = dict(inputs_embeds=emb, attention_mask=red["attention_mask"])
    if labels:
        kw["labels"] = ids.masked_fill((ids == IMG) | (red["attention_mask"] == 0), -100)
    return m(**kw)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("method,keep,k,fn", [
    ("fourier", 0.25, 16, lambda x: fft_reference(x.double(), 8, 8, 4, 4, "resize").float()),
    ("fourier", 0.16, 9, lambda x: fft_reference(x.double(), 8, 8, 3, 3, "resize").float()),
    ("pool", 0.25, 16, lambda x: pool_grid(x, 8, 8, 4, 4)),
    ("random", 0.2, 13, lambda x: x[:, random_indices(64, 13, 0)]),
])
def test_reduced_logits_equal_explicit_reference(attn, padding, method, keep, k, fn):
    m = tiny_llava(attn)
    ref = manual_llava(m, PROMPTS, fn, k, padding=padding)
    inp = llava_inputs(m, PROMPTS, padding=padding)
    saved = clone_inputs(inp)
    with vltok.patched(m, method, keep=keep) as h:
        out = m(**inp)
    assert_same_inputs(inp, saved)
    assert out.logits.shape == ref.logits.shape
    valid = llava_inputs(m, PROMPTS, padding=padding, n_ph=k)["attention_mask"].bool()
    assert torch.allclose(out.logits[valid], ref.logits[valid], atol=1e-5)
    assert h.stats["tokens_out"] == 2 * k and h.stats["tokens_in"] == 2 * 64
    assert h.stats["images"][0]["tokens_out"] == k
    assert h.stats["keep_achieved"] == pytest.approx(k / 64)
    assert h.stats["seconds"] > 0


def test_labels_are_shrunk_with_the_ids():
    m = tiny_llava()
    fn = lambda x: fft_reference(x.double(), 8, 8, 4, 4, "resize").float()
    ref = manual_llava(m, PROMPTS, fn, 16, padding="right", labels=True)
    inp = llava_inputs(m, PROMPTS, padding="right")
    inp["labels"] = inp["input_ids"].masked_fill((inp["input_ids"] == IMG) | (inp["attention_mask"] == 0), -100)
    with vltok.patched(m, "fourier", keep=0.25):
        out = m(**inp)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)


def test_tokens_reaching_llm_equal_reported_count():
    m = tiny_llava()
    seen = []
    hook = m.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    inp = llava_inputs(m, PROMPTS[:1])
    n_text = int((inp["input_ids"] != IMG).sum())
    with vltok.patched(m, "fourier", keep=0.16) as h:
        m(**inp)
        assert seen[-1] == n_text + h.stats["llm_input_tokens"] == n_text + 9
        m.generate(**inp, max_new_tokens=3, do_sample=False)
        assert seen[-3] == n_text + 9 and seen[-1] == 1   # prefill, then one token per decode step
    hook.remove()


@pytest.mark.parametrize("factory,make", [(tiny_llava, lambda m: llava_inputs(m, PROMPTS)),
                                          (tiny_llava_next, lambda m: llava_next_inputs(m, NEXT_PROMPTS, NEXT_SIZES))])
def test_generate_with_and_without_cache_and_prompt_restored(factory, make):
    m = factory()
    inp = make(m)
    saved = clone_inputs(inp)
    with vltok.patched(m, "fourier", keep=0.25):
        a = m.generate(**inp, max_new_tokens=6, do_sample=False, use_cache=True)
        b = m.generate(**inp, max_new_tokens=6, do_sample=False, use_cache=False)
        d = m.generate(**inp, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        e = m.generate(**inp, max_length=inp["input_ids"].shape[1] + 6, do_sample=False)
    assert_same_inputs(inp, saved)
    assert torch.equal(a, b) and torch.equal(a, d.sequences) and torch.equal(a, e)
    L = inp["input_ids"].shape[1]
    assert a.shape == (2, L + 6) and torch.equal(a[:, :L], inp["input_ids"])


@pytest.mark.parametrize("method", ["fourier", "random", "pool"])
def test_batch_equals_singles_with_same_pixels(method):
    """Left-padded batch of 2 with different prompts == two batch-1 calls on the same images."""
    m = tiny_llava()
    batch = llava_inputs(m, PROMPTS, padding="left")
    pv = batch["pixel_values"]
    with vltok.patched(m, method, keep=0.16):
        out = m.generate(**batch, max_new_tokens=6, do_sample=False)
        for i, p in enumerate(PROMPTS):
            one = llava_inputs(m, [p])
            one["pixel_values"] = pv[i:i + 1]
            s = m.generate(**one, max_new_tokens=6, do_sample=False)
            assert torch.equal(out[i, -6:], s[0, -6:])


def test_next_batch_mixed_sizes_equals_singles_and_reference():
    m = tiny_llava_next()
    batch = llava_next_inputs(m, NEXT_PROMPTS, NEXT_SIZES)
    with vltok.patched(m, "fourier", keep=0.25) as h:
        out = m.generate(**batch, max_new_tokens=5, do_sample=False)
        counts = [im["tokens_out"] for im in h.stats["images"]]
        for i, p in enumerate(NEXT_PROMPTS):
            one = llava_next_inputs(m, [p], [NEXT_SIZES[i]])
            one["pixel_values"] = batch["pixel_values"][i:i + 1, : one["pixel_values"].shape[1]]
            s = m.generate(**one, max_new_tokens=5, do_sample=False)
            assert torch.equal(out[i, -5:], s[0, -5:])
    # 80x120 image: base 8x8 -> 4x4, unpadded map 10x16 -> 5x8 plus 5 newlines; 64x64: 8x8 -> 4x4 twice
    assert counts == [16 + 5 * 9, 16 + 4 * 5]
    assert next_counts(m, NEXT_SIZES) == [64 + 10 * 17, 64 + 8 * 9]


def next_reference(m, inp, reduce_tile, reduce_map):
    """The unpatched tiny LLaVA-NeXT (NEXT_PROMPTS / NEXT_SIZES, right padding) fed hand-reduced packed features:
    ``reduce_tile(tile [64, C])`` and ``reduce_map(grid [h_u, w_u, C], newline [C])`` (newlines included) give the
    rows of each image. Returns (logits, attention_mask, rows per image)."""
    with torch.no_grad():
        packed = m.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output
    reduced = []
    for f, (h_u, w_u) in zip(packed, [(10, 16), (8, 8)]):
        grid = f[64:].view(h_u, w_u + 1, -1)[:, :w_u]
        reduced.append(torch.cat([reduce_tile(f[:64]), reduce_map(grid, m.model.image_newline)]))
    counts = [r.shape[0] for r in reduced]
    red = llava_next_inputs(m, NEXT_PROMPTS, NEXT_SIZES, padding="right", counts=counts)
    ids = red["input_ids"]
    emb = m.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = torch.cat(reduced)
    return m(inputs_embeds=emb, attention_mask=red["attention_mask"]).logits, red["attention_mask"], counts


def test_next_reduction_equals_explicit_reference():
    m = tiny_llava_next()
    inp = llava_next_inputs(m, NEXT_PROMPTS, NEXT_SIZES, padding="right")

    def pool_map(grid, newline):
        h_u, w_u, C = grid.shape
        mp = pool_grid(grid.reshape(1, h_u * w_u, C), h_u, w_u, h_u // 2, w_u // 2)[0].view(h_u // 2, w_u // 2, C)
        return torch.cat([mp, newline.expand(h_u // 2, 1, C)], 1).reshape(-1, C)

    ref, am, _ = next_reference(m, inp, lambda t: pool_grid(t[None], 8, 8, 4, 4)[0], pool_map)
    with vltok.patched(m, "pool", keep=0.25):
        out = m(**inp).logits
    valid = am.bool()
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)


def test_next_random_keeps_every_row_newline():
    m = tiny_llava_next()
    inp = llava_next_inputs(m, NEXT_PROMPTS[:1], NEXT_SIZES[:1])
    captured = {}
    orig = m.model.get_placeholder_mask

    def spy(input_ids, inputs_embeds, image_features):
        captured["f"] = image_features
        return orig(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)

    m.model.get_placeholder_mask = spy
    with vltok.patched(m, "random", keep=0.25) as h:
        m(**inp)
    del m.model.get_placeholder_mask
    f = captured["f"]
    is_nl = (f == m.model.image_newline).all(-1)
    assert int(is_nl.sum()) == 10  # one per unpadded row
    assert f.shape[0] == h.stats["tokens_out"] == 16 + round(0.25 * 160) + 10
    assert bool(is_nl[-1])


def test_repeated_calls_identical_and_handle_stats_reset():
    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "fourier", keep=0.25) as h:
        a = m(**inp).logits
        b = m(**inp).logits
        assert torch.equal(a, b)
        assert len(h.stats["images"]) == 2
        m.generate(**inp, max_new_tokens=3, do_sample=False)
        assert len(h.stats["images"]) == 2 and h.stats["seq_len_in"] > h.stats["seq_len_out"]
