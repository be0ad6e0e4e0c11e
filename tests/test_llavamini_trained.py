"""LLaVA-Mini trained mode (vltok/methods/llavamini_trained.py): compressor + pre-fusion + assembly, checked against
an explicit reference written out here, plus save / load, generate, training and refusals."""
import pytest
import torch

import vltok
from tiny import IMG, llava_inputs, tiny_llava, tiny_llava_next
from vltok.methods.baselines import pool_grid
from vltok.methods.llavamini_trained import Compressor, MiniModule, build_module, load_module, save_module

KEEP = 0.16   # tiny grid 8x8: C = round(sqrt(0.16 * 64)) = 3


def perturbed(model, layers=2, seed=1, **kw):
    """A bound module with every parameter moved off its step-0 value (so every part of the assembly matters)."""
    mod = build_module(model, KEEP, prefusion_layers=layers, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return mod


def reference_logits(model, mod, row, pv, answer=()):
    """One sample written out, no batching / padding / masks: V -> compressor -> projector; pre-fusion over
    [Hv, Hc, instruction text] (answer columns left out: they are neither keys nor fused) with positions 0..T-1
    and a causal mask; gated hand-over raw + tanh(g) (fused - raw); LLM input = text rows (fused, or raw for
    answers) with the fused Hc rows at each image."""
    inner = model.model
    c2 = mod.c ** 2
    with torch.no_grad():
        hs = inner.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]   # CLS dropped
        h = w = int(hs.shape[1] ** 0.5)
        proj = mod.projector if mod.projector is not None else inner.multi_modal_projector
        hv, hc = proj(hs), proj(mod.compressor(hs, h, w))
        emb = inner.language_model.embed_tokens
        text = [(i, t) for i, t in enumerate(row) if t != -1 and i not in answer]
        raw = torch.cat([hv.flatten(0, 1), hc.flatten(0, 1), emb(torch.tensor([t for _, t in text]))])[None]
        x = raw
        T = x.shape[1]
        pos = torch.arange(T)[None]
        mask = torch.full((T, T), torch.finfo(x.dtype).min).triu(1)[None, None]
        pe = inner.language_model.rotary_emb(x, pos)
        for layer in mod.prefusion:
            x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        if mod.gate is not None:
            x = raw + mod.gate.tanh() * (x - raw)
        n_img = hv.shape[0]
        fused_c = x[0, n_img * hv.shape[1]:n_img * hv.shape[1] + n_img * c2].view(n_img, c2, -1)
        fused_t = dict(zip([i for i, _ in text], x[0, n_img * (hv.shape[1] + c2):]))
        rows, j = [], 0
        for i, t in enumerate(row):
            if t == -1:
                rows.append(fused_c[j])
                j += 1
            else:
                rows.append((fused_t[i] if i in fused_t else emb(torch.tensor(t)))[None])
        llm_in = torch.cat(rows)[None]
        return model(inputs_embeds=llm_in).logits[0]


def compressed_ids(row, c2):
    out = []
    for t in row:
        out += [IMG] * c2 if t == -1 else [t]
    return out


def test_compressor_step0_equals_pooling():
    torch.manual_seed(0)
    x = torch.randn(2, 8 * 6, 32)
    for c in (1, 2, 3, 5):
        comp = Compressor(32, c, heads=4)
        y, attn = comp(x, 8, 6, return_attention=True)
        torch.testing.assert_close(y, pool_grid(x, 8, 6, c, c), atol=1e-6, rtol=0)   # mode="pool" on a C x C grid
        assert attn.shape == (2, 4, c * c, 48)
        # global (the paper's): every query is the mean over all tokens at step 0
        torch.testing.assert_close(Compressor(32, c, heads=4, local=False)(x, 8, 6),
                                   x.mean(1, keepdim=True).expand(2, c * c, 32), atol=1e-6, rtol=0)
    # after training the keys matter: no longer a window mean
    comp = Compressor(32, 3, heads=4)
    with torch.no_grad():
        comp.k_proj.weight.normal_()
    assert (comp(x, 8, 6) - pool_grid(x, 8, 6, 3, 3)).abs().max() > 1e-3


def test_step0_equals_pool_mode():
    """Step 0 (zero gate, window compressor, projector copy): the whole model equals mode='pool' (3x3 here too);
    without the gate the copied layers change the LLM input at step 0."""
    model = tiny_llava()
    inputs = llava_inputs(model, [[5, 6, -1, 7, 8, 9], [5, -1, 7]])
    mod = build_module(model, KEEP, prefusion_layers=2)
    with torch.no_grad(), vltok.patched(model, "llavamini", keep=KEEP) as h:
        ref = model(**inputs).logits
        assert h.stats["images"][0]["grids_out"] == [[3, 3]]
    with torch.no_grad(), vltok.patched(model, "llavamini", keep=KEEP, mode="trained", weights=mod) as h:
        got = model(**inputs).logits
        assert h.stats["tokens_out"] == 18 and h.method.params["C"] == 3
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with torch.no_grad(), vltok.patched(model, "llavamini", keep=KEEP, mode="trained",
                                        weights=build_module(model, KEEP, prefusion_layers=2, gate=False)):
        assert (model(**inputs).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("padding", ["left", "right"])
def test_matches_explicit_reference(padding):
    model = tiny_llava()
    mod = perturbed(model)
    prompts = [[5, 6, -1, 7, 8, 9, 10], [-1, 4, 11], [3, -1, 12, -1, 13]]
    inputs = llava_inputs(model, prompts, padding=padding)
    pvs = inputs["pixel_values"].split([p.count(-1) for p in prompts])
    with torch.no_grad(), vltok.patched(model, "llavamini", keep=KEEP, mode="trained", weights=mod) as h:
        batch = model(**inputs).logits
        assert h.stats["tokens_out"] == 9 * 4
        single = model(**llava_inputs(model, prompts[:1])).logits[0]
    for b, (row, pv) in enumerate(zip(prompts, pvs)):
        ref = reference_logits(model, mod, row, pv)
        n = len(compressed_ids(row, 9))
        L = batch.shape[1]
        cols = slice(L - n, L) if padding == "left" else slice(0, n)
        torch.testing.assert_close(batch[b, cols], ref, atol=2e-5, rtol=1e-4)
        if b == 0:
            torch.testing.assert_close(single, ref, atol=2e-5, rtol=1e-4)


def test_answers_are_not_fused_and_loss_matches():
    """With labels, answer columns are neither keys nor fused (§2 detail 3); the loss is the reference's."""
    model = tiny_llava()
    mod = perturbed(model, seed=3)
    row = [5, 6, -1, 7, 8, 20, 21, 9, 22]
    answer = {5, 6, 8}   # columns of the caller's row (20, 21, 22 are answer tokens; 9 follows an answer)
    inputs = llava_inputs(model, [row])
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    n_ph = 64
    for i in answer:   # column in the native (64-placeholder) layout
        col = i + n_ph - 1 if i > row.index(-1) else i
        labels[0, col] = ids[0, col]
    ref = reference_logits(model, mod, row, inputs["pixel_values"], answer=answer)
    with torch.no_grad(), vltok.patched(model, "llavamini", keep=KEEP, mode="trained", weights=mod):
        out = model(**inputs, labels=labels)
        plain = model(**inputs).logits[0]
    torch.testing.assert_close(out.logits[0], ref, atol=2e-5, rtol=1e-4)
    assert (plain - ref).abs().max() > 1e-4   # without labels every text token is fused: a different input
    new_labels = torch.full((len(compressed_ids(row, 9)),), -100)
    for r in answer:   # after the image: 9 compressed columns replace 1 placeholder
        new_labels[r + 8] = row[r]
    ref_loss = torch.nn.functional.cross_entropy(ref[:-1], new_labels[1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_generate_cache_equals_no_cache_and_prompt_only_fusion():
    model = tiny_llava()
    mod = perturbed(model, seed=5)
    inputs = llava_inputs(model, [[5, 6, -1, 7, 8, 9], [5, -1, 7]], padding="left")
    with torch.no_grad(), vltok.patched(model, "llavamini", keep=KEEP, mode="trained", weights=mod):
        kw = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[IMG])   # (a random tiny LM may emit it)
        a = model.generate(**inputs, **kw)
        b = model.generate(**inputs, **kw, use_cache=False)
        first = model(**inputs).logits[:, -1].index_fill(-1, torch.tensor([IMG]), float("-inf")).argmax(-1)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])   # the caller's prompt returned
    assert torch.equal(a[:, inputs["input_ids"].shape[1]], first)


def test_save_load_round_trip_and_bad_checkpoints(tmp_path):
    model = tiny_llava()
    mod = perturbed(model, seed=7)
    path = str(tmp_path / "mini.safetensors")
    save_module(mod, path)
    loaded = load_module(path)
    assert not loaded.bound and loaded.c == 3
    inputs = llava_inputs(model, [[5, 6, -1, 7, 8, 9]])
    with torch.no_grad():
        with vltok.patched(model, "llavamini", keep=KEEP, mode="trained", weights=mod):
            ref = model(**inputs).logits
        with vltok.patched(model, "llavamini", keep=KEEP, mode="trained", weights=path):
            got = model(**inputs).logits
    assert torch.equal(got, ref)
    with pytest.raises(vltok.InvalidOptionError, match="keep=0.5 conflicts with weights=.*3x3 compressor.*keep 0.1406"):
        vltok.patch(model, "llavamini", keep=0.5, mode="trained", weights=path)
    with torch.no_grad(), vltok.patched(model, "llavamini", mode="trained", weights=path) as h:   # no keep: C decides
        assert torch.equal(model(**inputs).logits, ref) and h.keep == 9 / 64 and h.keep_set_by == "weights=..."
    with pytest.raises(ValueError, match="needs weights"):
        vltok.patch(model, "llavamini", keep=KEEP, mode="trained")
    with pytest.raises(ValueError, match="mode='trained' only"):
        vltok.patch(model, "llavamini", keep=KEEP, weights=path)
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tiny import CLIPV, LLAMA
    other = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPV, text_config={**LLAMA, "hidden_size": 48}, image_token_index=IMG,
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=64)).eval()
    with pytest.raises(vltok.IncompatibleError, match="does not fit this model"):
        vltok.patch(other, "llavamini", keep=KEEP, mode="trained", weights=path)
    assert vltok.get_handle(other) is None and "forward" not in other.__dict__   # nothing half-applied
    with pytest.raises(vltok.IncompatibleError, match="LLaVA-1.5 only"):
        vltok.patch(tiny_llava_next(), "llavamini", keep=KEEP, mode="trained", weights=path)
    with pytest.raises(vltok.IncompatibleError, match="LlavaForConditionalGeneration"):
        build_module(tiny_llava_next(), KEEP)
    with pytest.raises(vltok.IncompatibleError, match="pre-fusion layers requested"):
        build_module(model, KEEP, prefusion_layers=3)
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a vltok llavamini checkpoint"):
        vltok.patch(model, "llavamini", keep=KEEP, mode="trained", weights=str(tmp_path / "plain.safetensors"))


def test_remove_restores_exactly_and_keep1_identity():
    model = tiny_llava()
    inputs = llava_inputs(model, [[5, 6, -1, 7, 8, 9], [5, -1, 7]])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(**inputs).logits
        mod = perturbed(model, seed=9)
        h = vltok.patch(model, "llavamini", keep=KEEP, mode="trained", weights=mod)
        assert (model(**inputs).logits.shape[1] < ref.shape[1])
        h.remove()
        assert torch.equal(model(**inputs).logits, ref)
        with vltok.patched(model, "llavamini", keep=1.0, mode="trained", weights=mod):
            assert torch.equal(model(**inputs).logits, ref)
    assert set(model.state_dict()) == set(sd) and all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert not any(k in model.__dict__ for k in ("forward", "generate"))
    assert not model.model.language_model._forward_pre_hooks and not model.model.multi_modal_projector._forward_pre_hooks


def test_train_reduces_loss_and_resume_continues(tmp_path):
    from vltok.train import train

    model = tiny_llava()
    g = torch.Generator().manual_seed(0)
    row = [5, 6, -1, 7, 8, 30, 31, 32]
    inputs = llava_inputs(model, [row, row])
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    batch = {**inputs, "labels": labels, "pixel_values": torch.randn(inputs["pixel_values"].shape, generator=g)}
    flags = [p.requires_grad for p in model.parameters()]
    kw = dict(steps=8, lr=3e-3, save_every=4, log=lambda *a: None, prefusion_layers=1)
    full = train(model, "llavamini", KEEP, lambda s: batch, out=tmp_path / "a", **kw)
    assert full["losses"][-1] < full["losses"][0] - 0.1
    assert [p.requires_grad for p in model.parameters()] == flags and vltok.get_handle(model) is None
    assert {n.split(".")[0] for n, p in full["module"].named_parameters()} == {"compressor", "prefusion", "projector",
                                                                              "gate"}
    # the final checkpoint serves the method
    with torch.no_grad(), vltok.patched(model, "llavamini", keep=KEEP, mode="trained", weights=str(full["path"])):
        assert model(**batch).loss < full["losses"][0]
    part = train(model, "llavamini", KEEP, lambda s: batch, out=tmp_path / "b", **{**kw, "steps": 4})
    rest = train(model, "llavamini", KEEP, lambda s: batch, out=tmp_path / "b", resume=True, **kw)
    assert len(rest["losses"]) == 4
    torch.testing.assert_close(torch.tensor(part["losses"] + rest["losses"]), torch.tensor(full["losses"]),
                               atol=1e-4, rtol=1e-4)


def test_module_meta_round_trip(tmp_path):
    m = MiniModule(32, 2, heads=4, local=False, prefusion_layers=1, train_projector=False, grid=(8, 8))
    model = tiny_llava()
    m.bind(model.model.language_model.layers, model.model.multi_modal_projector)
    assert m.projector is None and len(m.prefusion) == 1
    save_module(m, str(tmp_path / "m.safetensors"))
    l2 = load_module(str(tmp_path / "m.safetensors"))
    assert l2.meta()["local"] is False and l2.meta()["train_projector"] is False and l2.c == 2 and l2.use_gate
    l2.bind(model.model.language_model.layers, model.model.multi_modal_projector)
    assert all(torch.equal(a, b) for a, b in zip(l2.state_dict().values(), m.state_dict().values()))
