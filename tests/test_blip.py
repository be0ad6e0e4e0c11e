"""BLIP / BLIP-2: the ViT tokens the text model (BLIP) or the Q-Former (BLIP-2) cross-attends to are reduced;
checked against the unpatched sub-modules fed hand-reduced ViT tokens; generate() goes through the same hook."""
import pytest
import torch

import vltok
from test_fourier import fft_reference
from tiny import IMG, biased_attention, merge_ref
from tiny_families import blip_inputs, tiny_blip, tiny_blip2
from vltok.methods.baselines import pool_grid, random_indices

REDUCE = {   # 4x4 patch grid (+ CLS kept)
    "fourier": (0.25, lambda x: fft_reference(x.double(), 4, 4, 2, 2, "resize").float()),
    "pool": (0.25, lambda x: pool_grid(x, 4, 4, 2, 2)),
    "random": (0.25, lambda x: x[:, random_indices(16, 4, 0)]),
}


def reduced_vit(m, pv, fn):
    with torch.no_grad():
        x = m.vision_model(pixel_values=pv).last_hidden_state
    return torch.cat([x[:, :1], fn(x[:, 1:])], dim=1)


@pytest.mark.parametrize("method", list(REDUCE))
def test_blip_caption_equals_text_decoder_on_reduced_memory(method):
    m = tiny_blip("caption")
    inp = blip_inputs(m, [[1, 5, 6, 7], [1, 8, 9]])
    saved = {k: v.clone() for k, v in inp.items()}
    keep, fn = REDUCE[method]
    mem = reduced_vit(m, inp["pixel_values"], fn)
    with torch.no_grad():
        ref = m.text_decoder(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                             encoder_hidden_states=mem).logits
    with vltok.patched(m, method, keep=keep) as h:
        out = m(**inp)
        gen = m.generate(pixel_values=inp["pixel_values"], max_new_tokens=4, do_sample=False)
    for k in inp:
        assert torch.equal(inp[k], saved[k])
    assert torch.allclose(out.logits, ref, atol=1e-5)
    assert h.stats["tokens_in"] == 2 * 17 and h.stats["tokens_out"] == 2 * 5   # last call: generate, 2 images
    # generate: greedy decoding over the reduced memory == the text decoder's own greedy loop on that memory
    ids = gen[:, :1]
    for _ in range(gen.shape[1] - 1):
        with torch.no_grad():
            nxt = m.text_decoder(input_ids=ids, encoder_hidden_states=mem).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    finished = (gen == m.config.text_config.sep_token_id).cumsum(1) > 0
    assert torch.equal(ids[~finished], gen[~finished])


def test_blip_vqa_memory_reaching_text_encoder_is_reduced_and_keep1_exact():
    m = tiny_blip("vqa")
    inp = blip_inputs(m, [[1, 5, 6, 7], [1, 8, 9]])
    labels = torch.tensor([[1, 4, 2], [1, 5, 2]])
    ref = m(**inp, labels=labels).loss
    ref_gen = m.generate(**inp, max_new_tokens=3)
    seen = []
    hk = m.text_encoder.register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    with vltok.patched(m, "fourier", keep=1.0):
        assert torch.equal(m(**inp, labels=labels).loss, ref)
        assert torch.equal(m.generate(**inp, max_new_tokens=3), ref_gen)
    with vltok.patched(m, "fourier", keep=0.25) as h:
        m(**inp, labels=labels)
        m.generate(**inp, max_new_tokens=3)
    hk.remove()
    mem = reduced_vit(m, inp["pixel_values"], REDUCE["fourier"][1])
    assert torch.allclose(seen[-2], mem, atol=1e-5) and torch.allclose(seen[-1], mem, atol=1e-5)
    assert h.stats["images"][0] == {"tokens_in": 17, "tokens_out": 5, "grids_in": [[4, 4]], "grids_out": [[2, 2]]}


@pytest.mark.parametrize("method", list(REDUCE))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_blip2_equals_qformer_and_lm_on_reduced_vit_tokens(method, padding):
    """Reference: the unpatched Q-Former on hand-reduced ViT tokens, projected, spliced into the placeholders,
    then the unpatched language model."""
    m = tiny_blip2()
    inp = blip_inputs(m, [[-1, 1, 5, 6, 7], [-1, 1, 8]], padding=padding)
    keep, fn = REDUCE[method]
    mem = reduced_vit(m, inp["pixel_values"], fn)
    with torch.no_grad():
        q = m.qformer(query_embeds=m.query_tokens.expand(2, -1, -1), encoder_hidden_states=mem,
                      encoder_attention_mask=torch.ones(mem.shape[:2], dtype=torch.long)).last_hidden_state
        feats = m.language_projection(q)
        ids = inp["input_ids"]
        emb = m.get_input_embeddings()(ids).clone()
        emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
        ref = m.language_model(inputs_embeds=emb, attention_mask=inp["attention_mask"]).logits
    with vltok.patched(m, method, keep=keep) as h:
        out = m(**inp)
        assert h.stats["tokens_out"] == 2 * 5
        a = m.generate(**inp, max_new_tokens=4, do_sample=False)
        b = m.generate(**inp, max_new_tokens=4, do_sample=False, use_cache=False)
    valid = inp["attention_mask"].bool()
    assert torch.allclose(out.logits[valid], ref[valid], atol=1e-5)
    assert torch.equal(a, b)


def test_blip2_keep1_exact_and_llm_methods_refused_with_reason():
    m = tiny_blip2()
    inp = blip_inputs(m, [[-1, 1, 5, 6, 7]])
    ref = m(**inp).logits
    ref_gen = m.generate(**inp, max_new_tokens=4, do_sample=False)
    for method in REDUCE:
        with vltok.patched(m, method, keep=1.0):
            assert torch.equal(m(**inp).logits, ref)
            assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), ref_gen)
    in_llm = [n for n, i in vltok.methods().items() if "in_llm" in i.stages]
    for name in in_llm:
        with pytest.raises(vltok.IncompatibleError, match="non-spatial Q-Former queries"):
            vltok.patch(m, name, keep=0.5)
        assert vltok.get_handle(m) is None
    assert torch.equal(m(**inp).logits, ref)


def vit_merge_reference(vm, pv, merger, schedule):
    """Explicit reference for a BLIP / BLIP-2 ViT with token merging: the layers written out (fused qkv, eager
    softmax with log(size) added to the logits by hand), CLS protected, then the post-LayerNorm."""
    h = vm.embeddings(pv)
    size = pos = None
    for i, layer in enumerate(vm.encoder.layers):
        a = layer.self_attn
        y = layer.layer_norm1(h)
        B, N, C = y.shape
        q, k, v = a.qkv(y).view(B, N, 3, a.num_heads, -1).unbind(2)
        h = h + a.projection(biased_attention(q, k, v, a.scale, size))
        if schedule[i]:
            h, size, pos = merge_ref(merger, h, size, pos, k, q[:, 0], schedule[i], 1)
        h = h + layer.mlp(layer.layer_norm2(h))
    return vm.post_layernorm(h)


@pytest.mark.parametrize("family", ["blip", "blip2"])
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_vit_merging_equals_explicit_reference_and_reaches_the_text_side(family, method):
    from vltok.methods.tome import spread_schedule

    m = tiny_blip() if family == "blip" else tiny_blip2()
    inp = blip_inputs(m, [[1, 5, 6, 7]] if family == "blip" else [[-1, 1, 5, 6, 7]])
    vm = m.vision_model
    with torch.no_grad():
        ref_vit = vm(inp["pixel_values"]).last_hidden_state
        ref = m(**inp).logits
        with vltok.patched(m, method, keep=1.0):
            assert torch.equal(m(**inp).logits, ref)
        with vltok.patched(m, method, keep=0.5) as h:
            got = vm(inp["pixel_values"]).last_hidden_state
            exp = vit_merge_reference(vm, inp["pixel_values"], h.method.vision, spread_schedule(16, 0.5, 2))
            assert got.shape[1] == 1 + 8 and torch.allclose(got, exp, atol=1e-5), (got - exp).abs().max()
            seen = []
            text = m.text_decoder if family == "blip" else m.qformer
            hk = text.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]),
                                                with_kwargs=True)
            try:
                out = m(**inp).logits
            finally:
                hk.remove()
            assert seen == [9]   # the merged ViT output is the text side's cross-attention memory
            assert h.stats["tokens_out"] == 9 and h.stats["vision_tokens_per_layer"][-1] == 9
        if family == "blip2":
            assert not torch.allclose(out, ref, atol=1e-4)
        assert torch.equal(m(**inp).logits, ref) and torch.equal(vm(inp["pixel_values"]).last_hidden_state, ref_vit)
        assert all("forward" not in layer.__dict__ for layer in vm.encoder.layers)
