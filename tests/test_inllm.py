"""The in-LLM engine (vltok.inllm) with FastV and FEATHER on tiny random LLaVA-1.5 / LLaVA-NeXT.

The explicit reference is the UNPATCHED model run without a cache on the full sequence, with the dropped visual
keys masked out per layer (a custom 4-D mask fed to every decoder layer): from the cut on, a layer's queries see
only the columns the pruned model keeps in that layer.
"""
import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vltok
from tiny import CLIPV, IMG, LLAMA, llava_inputs, llava_next_inputs, tiny_llava_next

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, 11, 12, 13, 14, -1, 15, 16, 17, 18]]
METHODS = [("fastv", dict(keep=0.5, K=2)), ("feather", dict(keep=0.5))]


def tiny_llava_deep(attn="sdpa", layers=6, seed=0):
    """tests/tiny.py's LLaVA-1.5 with a deeper LLM (6 layers) so cuts can sit at several depths."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPV, text_config=dict(LLAMA, num_hidden_layers=layers), image_token_index=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=64)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def batch(m, kind):
    if kind == "b1":
        return llava_inputs(m, PROMPTS[1:])
    return llava_inputs(m, PROMPTS, padding="left" if kind == "b2-left" else "right")


def masked_reference(m, inp, columns, extra=0, position_ids=None, decode_columns=None, dead=None):
    """Unpatched model, no cache, full sequence; layer l's keys restricted to ``columns[l]`` [B, S_l] (prefill
    columns) plus every column >= the prompt length (generated tokens). Rows of generated tokens use
    ``decode_columns`` instead when given (a decode stage that evicted cache entries). ``dead[l]`` [B, S_l] marks
    filler columns (kept only so the batch stays rectangular): masked too. Returns the logits."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    B, S = ids.shape[0], ids.shape[1] - extra
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    base = causal[None] & am.bool()[:, None, :]
    masks = {}
    neg = torch.finfo(torch.float32).min
    decode_columns = columns if decode_columns is None else decode_columns
    full_cols = torch.arange(T).expand(B, T)
    for l in set(columns) | set(decode_columns):
        seen = []
        for cols in (columns.get(l, full_cols), decode_columns.get(l, full_cols)):
            vis = torch.zeros(B, T, dtype=torch.bool)
            vis[torch.arange(B)[:, None], cols] = True
            if dead is not None and l in dead and cols is not full_cols:
                vis[torch.arange(B)[:, None].expand_as(cols)[dead[l]], cols[dead[l]]] = False
            vis[:, S:] = True
            seen.append(vis)
        rows_gen = (torch.arange(T) >= S)[None, :, None]
        vis = torch.where(rows_gen, seen[1][:, None, :], seen[0][:, None, :])
        masks[l] = torch.zeros(B, 1, T, T).masked_fill(~(base & vis)[:, None], neg)
    full = torch.zeros(B, 1, T, T).masked_fill(~base[:, None], neg)

    def hook(i):
        def pre(module, args, kwargs):
            return args, dict(kwargs, attention_mask=masks.get(i, full))
        return pre

    hooks = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
             for i, layer in enumerate(m.model.language_model.layers)]
    try:
        with torch.no_grad():
            return m(**inp, position_ids=position_ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


def reference_greedy(m, inp, columns, steps, decode_columns=None, dead=None):
    """Greedy decoding with the masked reference, positions as generate() makes them (cumsum of the mask)."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    for t in range(steps):
        cur = dict(inp, input_ids=ids, attention_mask=am)
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        logits = masked_reference(m, cur, columns, extra=t, position_ids=pos, decode_columns=decode_columns,
                                  dead=dead)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        am = torch.cat([am, torch.ones_like(nxt)], 1)
    return ids[:, -steps:]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method,kw", METHODS)
def test_keep1_is_bit_identical_and_remove_restores(attn, method, kw):
    m = tiny_llava_deep(attn)
    inp = batch(m, "b2-left")
    ref = m(**inp).logits
    ref_gen = m.generate(**inp, max_new_tokens=4, do_sample=False)
    before = set(m.__dict__)
    h = vltok.patch(m, method, **dict(kw, keep=1.0))
    assert torch.equal(m(**inp).logits, ref)
    assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), ref_gen)
    h.remove()
    assert set(m.__dict__) == before
    assert all(not layer._forward_pre_hooks for layer in m.model.language_model.layers)
    with vltok.patched(m, method, **kw):
        assert m(**inp).logits.shape[1] < ref.shape[1]
    assert torch.equal(m(**inp).logits, ref)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["b1", "b2-left", "b2-right"])
@pytest.mark.parametrize("method,kw", METHODS)
def test_pruned_logits_equal_masked_reference(attn, kind, method, kw):
    m = tiny_llava_deep(attn)
    inp = batch(m, kind)
    saved = {k: v.clone() for k, v in inp.items()}
    with vltok.patched(m, method, **kw) as h:
        out = m(**inp).logits
        cols = h.inllm_prefill_columns
        final = h.inllm_kept_columns
    for k in inp:
        assert torch.equal(inp[k], saved[k])
    assert cols and out.shape[1] == final.shape[1] < inp["input_ids"].shape[1]
    ref = masked_reference(m, inp, cols)
    ref_kept = ref[torch.arange(ref.shape[0])[:, None], final]
    real = inp["attention_mask"].gather(1, final).bool()
    assert (out[real] - ref_kept[real]).abs().max() < 1e-5
    # every sample keeps the same count; all text columns survive; kept columns ascending
    assert torch.equal(final.diff(dim=1) > 0, torch.ones_like(final[:, 1:], dtype=torch.bool))
    for b in range(final.shape[0]):
        assert (inp["input_ids"][b, final[b]] != IMG).sum() == (inp["input_ids"][b] != IMG).sum()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["b1", "b2-left"])
@pytest.mark.parametrize("method,kw", METHODS)
def test_generate_with_cache_equals_masked_reference(attn, kind, method, kw):
    m = tiny_llava_deep(attn)
    inp = batch(m, kind)
    with vltok.patched(m, method, **kw) as h:
        out = m.generate(**inp, max_new_tokens=5, do_sample=False, use_cache=True)
        cols = h.inllm_layer_columns
        L = inp["input_ids"].shape[1]
        assert torch.equal(out[:, :L], inp["input_ids"])
    ref = reference_greedy(m, inp, cols, 5)
    assert_same_until_eos(out[:, L:], ref)


def assert_same_until_eos(out, ref, eos=2):
    """generate() pads a row after its EOS; the reference loop does not stop."""
    for o, r in zip(out, ref):
        n = int((r == eos).nonzero()[0]) + 1 if (r == eos).any() else r.numel()
        assert o.numel() >= n and torch.equal(o[:n], r[:n])


@pytest.mark.parametrize("method,kw", METHODS)
def test_cache_lengths_per_layer_and_decode_positions(method, kw):
    m = tiny_llava_deep("eager")
    inp = batch(m, "b2-left")
    S = inp["input_ids"].shape[1]
    seen = []
    hook = m.model.language_model.register_forward_pre_hook(
        lambda mod, a, k: seen.append(k.get("position_ids")), with_kwargs=True)
    with vltok.patched(m, method, **kw) as h:
        out = m(**inp, use_cache=True)
        cuts = h.stats["prune_layers"]
        counts = h.stats["tokens_per_layer"]
        lens = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        m.generate(**inp, max_new_tokens=3, do_sample=False)
    hook.remove()
    n_text = S - 64
    assert lens == [n_text + n for n in counts]
    assert lens[:cuts[0]] == [S] * cuts[0] and lens[-1] < S
    # decode steps continue from the unpruned length (left padding: cumsum positions)
    am = inp["attention_mask"]
    assert torch.equal(seen[-2][:, -1], am.sum(1))
    assert torch.equal(seen[-1][:, -1], am.sum(1) + 1)


def test_batch_equals_singles():
    m = tiny_llava_deep()
    inp = batch(m, "b2-left")
    for method, kw in METHODS:
        with vltok.patched(m, method, **kw):
            both = m.generate(**inp, max_new_tokens=5, do_sample=False)
            for i, p in enumerate(PROMPTS):
                one = llava_inputs(m, [p])
                one["pixel_values"] = inp["pixel_values"][i:i + 1]
                single = m.generate(**one, max_new_tokens=5, do_sample=False)[0, one["input_ids"].shape[1]:]
                new = both[i, inp["input_ids"].shape[1]:]
                assert torch.equal(new[:single.numel()], single) and (new[single.numel():] == 0).all()
            again = m.generate(**inp, max_new_tokens=5, do_sample=False)
            assert torch.equal(both, again)


def test_qk_hook_scores_equal_eager_output_attentions():
    """FastV's scores (RoPE, softmax over all keys) = the unpatched eager attention row of the last token at layer
    K-1; FEATHER's (no RoPE, softmax over the image keys) = the same computation from the layer's hidden input."""
    m = tiny_llava_deep("eager")
    inp = batch(m, "b2-left")
    ids = inp["input_ids"]
    with torch.no_grad():
        ref = m(**inp, output_attentions=True, output_hidden_states=True)
    img = [(ids[b] == IMG).nonzero().flatten() for b in range(2)]
    for method, kw, K in [("fastv", dict(keep=0.5, K=2), 2), ("feather", dict(keep=0.7, layers=(3, 4)), 3)]:
        got = []
        with vltok.patched(m, method, **kw) as h:
            sel = h.method.in_llm.select

            def spy(cut, view, scores):
                if cut.stage == 0:
                    got.append(scores.clone())
                return sel(cut, view, scores)

            h.method.in_llm.select = spy
            m.model.set_attn_implementation("sdpa")   # the pruned model itself may run any backend
            m(**inp)
            m.model.set_attn_implementation("eager")
        assert len(got) == 2
        for b in range(2):
            if method == "fastv":
                want = ref.attentions[K - 1][b, :, -1, img[b]].mean(0)
            else:
                layer = m.model.language_model.layers[K - 1]
                x = layer.input_layernorm(ref.hidden_states[K - 1][b])
                q = layer.self_attn.q_proj(x[-1]).view(4, 8)
                k = layer.self_attn.k_proj(x[img[b]]).view(-1, 2, 8).repeat_interleave(2, 1)
                want = torch.softmax(torch.einsum("hd,khd->hk", q, k) / 8 ** 0.5, -1).mean(0)
            assert (got[b][0] - want).abs().max() < 1e-4


def test_stats():
    m = tiny_llava_deep()
    inp = batch(m, "b2-left")
    with vltok.patched(m, "fastv", keep=0.5, K=2) as h:
        m(**inp)
        s = h.stats
    n = round((0.5 * 6 - 2) * 64 / 4)   # FLOPs-matched count, spec §6.2
    assert s["tokens_per_layer"] == [64, 64] + [n] * 4 and s["prune_layers"] == [2]
    assert s["flops_keep"] == pytest.approx((2 * 64 + 4 * n) / (6 * 64)) and abs(s["flops_keep"] - 0.5) < 0.01
    assert s["tokens_in"] == 128 and s["tokens_out"] == 2 * n and s["seconds_scoring"] > 0
    assert [im["tokens_out"] for im in s["images"]] == [n, n]


def test_qk_capture_hooks_live_only_on_the_cut_layers_during_a_prefill():
    m = tiny_llava_deep()
    inp = batch(m, "b2-left")
    layers = m.model.language_model.layers
    projs = lambda: [i for i, l in enumerate(layers) if l.self_attn.q_proj._forward_hooks or   # noqa: E731
                     l.self_attn.k_proj._forward_hooks]
    during = []
    probe = layers[-1].register_forward_pre_hook(lambda mod, args: during.append(projs()))
    try:
        with vltok.patched(m, "feather", keep=0.5, layers=(2, 4)) as h:
            m(**inp)
            assert during == [[1, 3]] and projs() == []   # read by the cuts before layers 2 and 4, then removed
            assert h.stats["prune_layers"] == [2, 4]
            assert h.stats["seconds"] >= h.stats["seconds_scoring"] > 0
            m.generate(**inp, max_new_tokens=2, do_sample=False)
            assert projs() == []
        assert projs() == []
    finally:
        probe.remove()


def test_refusals_are_clear_and_leave_nothing_half_applied():
    m = tiny_llava_deep()
    inp = batch(m, "b1")
    with pytest.raises(vltok.VltokError, match="floor"):
        vltok.patch(m, "fastv", keep=0.2, K=2)
    assert vltok.get_handle(m) is None and "forward" not in m.__dict__
    assert all(not l._forward_pre_hooks for l in m.model.language_model.layers)
    with vltok.patched(m, "feather", keep=0.5):
        with pytest.raises(vltok.VltokError, match="labels"):
            m(**inp, labels=inp["input_ids"])
        with pytest.raises(vltok.VltokError, match="DynamicCache"):
            m.generate(**inp, max_new_tokens=2, cache_implementation="static")


def test_llava_next_two_grids_match_masked_reference():
    m = tiny_llava_next("sdpa")
    inp = llava_next_inputs(m, [[1, -1, 5, 6]], [[80, 120]])
    ids = inp["input_ids"]
    with vltok.patched(m, "fastv", keep=0.75, K=1, keep_mode="final") as h:
        out = m(**inp).logits
        cols, final = h.inllm_prefill_columns, h.inllm_kept_columns
        # one image: base tile 64 + unpadded map 160 + 10 newlines (never pruned)
        assert [im["tokens_in"] for im in h.stats["images"]] == [64 + 160 + 10]
        assert [im["tokens_out"] for im in h.stats["images"]] == [48 + 120 + 10]
        assert h.stats["llm_input_tokens"] == 234 and h.stats["tokens_per_layer"][0] == 234
    kept = ids[0, final[0]]
    assert int((ids == IMG).sum()) - int((kept == IMG).sum()) == 16 + 40
    # newline columns (the last of each unpadded row) are never pruned
    run = (ids[0] == IMG).nonzero().flatten()
    newlines = run[64:].view(10, 17)[:, -1]
    assert torch.isin(newlines, final[0]).all()
    ref = masked_reference(m, inp, cols)
    assert (out[0] - ref[0, final[0]]).abs().max() < 1e-5
    # samples with different grids: the one that keeps fewer columns is padded with masked filler columns
    two = llava_next_inputs(m, [[1, -1, 5], [1, 6, 7, -1, 9]], [[80, 120], [64, 64]], padding="left")
    with vltok.patched(m, "fastv", keep=0.75, K=1, keep_mode="final") as h:
        out = m(**two).logits
        cols, final, dead = h.inllm_prefill_columns, h.inllm_kept_columns, h.inllm_dead_columns
        gen = m.generate(**two, max_new_tokens=4, do_sample=False)
        dcols, ddead = h.inllm_layer_columns, h.inllm_dead_columns
    assert dead and bool(dead[1][0].any()) and not bool(dead[1][1].any())   # the bigger image dropped more
    ref = masked_reference(m, two, cols, dead=dead)
    real = two["attention_mask"].gather(1, final).bool() & ~dead[1]
    assert (out[real] - ref[torch.arange(2)[:, None], final][real]).abs().max() < 1e-5
    S = two["input_ids"].shape[1]
    assert_same_until_eos(gen[:, S:], reference_greedy(m, two, dcols, 4, dead=ddead))


def test_a_failed_call_leaves_nothing_pending_and_generate_without_cache():
    m = tiny_llava_deep()
    inp = batch(m, "b1")
    text = dict(input_ids=inp["input_ids"].masked_fill(inp["input_ids"] == IMG, 5), attention_mask=inp["attention_mask"])
    ref = m(**text).logits
    with vltok.patched(m, "fastv", keep=0.5, K=2) as h:
        with pytest.raises(Exception):
            m(**dict(inp, pixel_values=inp["pixel_values"][:, :2]))   # fails in the vision tower, after prepare
        assert torch.equal(m(**text).logits, ref)                      # same length, no images: not pruned
        cached = m.generate(**inp, max_new_tokens=3, do_sample=False)
        uncached = m.generate(**inp, max_new_tokens=3, do_sample=False, use_cache=False)
        # without a cache every step re-prunes with the current last token, so only the first token must agree
        assert torch.equal(cached[:, :-2], uncached[:, :-2]) and h.stats["prune_layers"] == [2]
