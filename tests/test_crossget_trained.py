"""CrossGET's trained variant: the learned cross token (cross_tokens=...), its checkpoint and vltok train crossget."""
import json

import pytest
import torch
import torch.nn.functional as F

import vltok
from vltok.adapters.hf_vit import encoder_layers
from test_merge import PROMPTS, deep_llava
from test_shuffle_mini import sharp_llava, tiny_batches
from tiny import IMG, clip_attention_ref, llava_inputs
from vltok.kernels.cgsm import cgsm_match_torch, merge_weighted
from vltok.methods.crossget import CrossTokens, load_cross_tokens, save_cross_tokens
from vltok.methods.tokenshuffle import ShuffleProjector
from vltok.methods.tome import spread_schedule


def random_cross(m, n_layers=3, visible=False, projector=True, seed=1):
    """Cross tokens with random (non-init) offsets and a perturbed projector copy."""
    g = torch.Generator().manual_seed(seed)
    stock = m.model.multi_modal_projector
    proj = ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, "gelu", (1, 1)) if projector else None
    cross = CrossTokens(n_layers, 32, visible, proj, "clip_vision_model")
    with torch.no_grad():
        cross.offsets.copy_(torch.randn(n_layers, 32, generator=g))
        if proj is not None:
            proj.linear_1.weight.add_(0.1 * torch.randn(proj.linear_1.weight.shape, generator=g))
    return cross


def logits_from_features(m, feats, k):
    """The unpatched model fed hand-reduced features through inputs_embeds (k placeholders per image)."""
    red = llava_inputs(m, PROMPTS, n_ph=k)
    ids = red["input_ids"]
    emb = m.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
    return m(inputs_embeds=emb, attention_mask=red["attention_mask"]).logits, red["attention_mask"].bool()


def manual_cross_tower(m, pixel_values, cross, schedule):
    """Explicit reference: the CLIP tower layer by layer with the cross token appended (CLS input + offset[0]),
    reset to its detached state + offset[l] before layer l; attention written out (clip_attention_ref) with
    log(size) added, size 0 (-inf) on the cross key when it only reads; importance = the cross query's head-mean
    softmax over the real tokens; CGSM from the kernels' torch reference; merge by kernels.cgsm.merge_weighted.
    Returns (features of the used layers without CLS and cross token, sizes of the real tokens)."""
    vt = m.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    x = vt.pre_layrnorm(vt.embeddings(pixel_values))
    B = x.shape[0]
    x = torch.cat([x, x[:, :1] + cross.offsets[0]], 1)
    size = torch.ones(B, x.shape[1] - 1, 1)
    for i, layer in enumerate(vt.encoder.layers[:len(schedule)]):
        if i:
            x = torch.cat([x[:, :-1], x[:, -1:] + cross.offsets[i]], 1)
        cross_size = torch.full((B, 1, 1), 1.0 if cross.visible else 0.0)
        x, q, k, _ = clip_attention_ref(layer, x, torch.cat([size, cross_size], 1))
        if schedule[i]:
            real, tok = x[:, :-1], x[:, -1:]
            kr = k[:, :, :-1]                                                # [B, H, N, d]
            logits = torch.einsum("bhd,bhnd->bhn", q[:, :, -1], kr) * q.shape[-1] ** -0.5
            imp = (logits + size.log().transpose(1, 2)).softmax(-1).mean(1)
            metric = F.normalize(kr.mean(1), dim=-1)
            protected = torch.zeros(B, real.shape[1], dtype=torch.bool)
            protected[:, 0] = True
            src, dst, _ = cgsm_match_torch(metric, imp, schedule[i], protected)
            real, size = merge_weighted(real, size, imp, src, dst)
            x = torch.cat([real, tok], 1)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x[:, 1:-1], size


# keep 0.25: r = 16 in each of the 3 used layers, 0.5: 11, 11, 10 (one CGSM round per layer)
@pytest.mark.parametrize("keep", [0.25, 0.5])
@pytest.mark.parametrize("visible", [False, True])
def test_trained_tower_equals_explicit_reference(keep, visible):
    m = deep_llava("eager")
    cross = random_cross(m, visible=visible)
    k = round(keep * 64)
    inp = llava_inputs(m, PROMPTS)
    saved = {a: b.clone() for a, b in inp.items()}
    with torch.no_grad():
        with vltok.patched(m, "crossget", keep=keep, cross_tokens=cross) as h:
            out = m(**inp).logits
            run = h.adapter._vision_run
            assert run.size.shape == (2, 1 + k + 1, 1) and torch.equal(run.size.sum((1, 2)), torch.full((2,), 66.))
            assert run.size[:, -1].eq(1).all() and run.pos[:, -1].eq(65).all()     # the cross token: last, alone
        assert all(torch.equal(inp[a], saved[a]) for a in inp)
        feats, size = manual_cross_tower(m, inp["pixel_values"], cross, spread_schedule(64, keep, 3))
        assert feats.shape[1] == k and torch.equal(size.sum((1, 2)), torch.full((2,), 65.))   # CLS + 64 patches
        ref, valid = logits_from_features(m, cross.projector(feats), k)
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)
    assert h.stats["tokens_out"] == 2 * k and h.stats["tokens_in"] == 128
    assert h.stats["vision_tokens_per_layer"] == [65] + [65 - sum(spread_schedule(64, keep, 3)[:i + 1])
                                                         for i in range(3)] + [1 + k]


@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_step0_reader_equals_training_free_and_visible_does_not(keep):
    """Zero offsets: the cross token starts as CLS's input. Reader (visible=False): it evolves exactly like CLS
    and the real tokens never see it, so merges and logits equal the training-free CLS-guided mode. Visible (the
    paper's placement): it still equals CLS in every layer, but the real tokens see CLS twice: logits differ."""
    m = deep_llava()
    inp = llava_inputs(m, PROMPTS)
    stock = m.model.multi_modal_projector
    with torch.no_grad():
        with vltok.patched(m, "crossget", keep=keep) as h:
            free, pos_free = m(**inp).logits, h.adapter._vision_run.pos.clone()
            free_stats = dict(h.stats)
        for proj in (None, ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, "gelu", (1, 1))):
            with vltok.patched(m, "crossget", keep=keep, cross_tokens=CrossTokens(3, 32, False, proj)) as h:
                step0 = m(**inp).logits
                assert torch.equal(h.adapter._vision_run.pos[:, :-1], pos_free)     # identical merge decisions
            assert torch.allclose(step0, free, atol=1e-5)
            assert h.stats["tokens_out"] == free_stats["tokens_out"]
            assert h.stats["vision_tokens_per_layer"] == free_stats["vision_tokens_per_layer"]
        # visible: the cross token tracks CLS layer by layer (captured at each used layer's output)
        layers = encoder_layers(m.model.vision_tower)
        seen = []
        hooks = [layer.register_forward_hook(lambda mod, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
                 for layer in layers[:3]]
        with vltok.patched(m, "crossget", keep=keep, cross_tokens=CrossTokens(3, 32, True)):
            visible = m(**inp).logits
        for h_ in hooks:
            h_.remove()
    assert len(seen) == 3 and all(torch.allclose(o[:, -1], o[:, 0], atol=1e-5) for o in seen)
    assert not torch.allclose(visible, free, atol=1e-3)


def test_dinov2_tower_step0_and_trained_counts():
    """The reference VLM's tower family (DINOv2, layer scale): step 0 equals the training-free mode; random
    offsets keep the budget and every sample's sizes sum to the original count."""
    dino = dict(model_type="dinov2", hidden_size=32, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=4,
                image_size=64, patch_size=8)
    m = deep_llava(vision=dino)      # 2 used layers
    inp = llava_inputs(m, PROMPTS)
    with torch.no_grad():
        with vltok.patched(m, "crossget", keep=0.16):
            free = m(**inp).logits
        with vltok.patched(m, "crossget", keep=0.16, cross_tokens=CrossTokens(2, 32)):
            assert torch.allclose(m(**inp).logits, free, atol=1e-5)
        cross = CrossTokens(2, 32, encoder="dinov2")
        cross.offsets.normal_()
        with vltok.patched(m, "crossget", keep=0.16, cross_tokens=cross) as h:
            out = m(**inp).logits
            size = h.adapter._vision_run.size
    assert out.shape == free.shape and not torch.equal(out, free)   # reader mode: only the ensemble weights move
    assert h.stats["tokens_out"] == 2 * round(0.16 * 64) and size.shape[1] == 1 + 10 + 1
    assert torch.equal(size[:, :-1].sum((1, 2)), torch.full((2,), 65.))


def test_checkpoint_roundtrip_keep1_remove_and_generate(tmp_path):
    m = deep_llava()
    cross = random_cross(m)
    path = str(tmp_path / "cg.safetensors")
    save_cross_tokens(cross, path, keep=0.25)
    back = load_cross_tokens(path)
    assert all(torch.equal(a, b) for a, b in zip(cross.state_dict().values(), back.state_dict().values()))
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["vltok"])
    assert meta["method"] == "crossget" and meta["width"] == 32 and meta["n_layers"] == 3 and meta["keep"] == 0.25
    inp = llava_inputs(m, PROMPTS)
    with torch.no_grad():
        before = m(**inp).logits
        params = {n: p.clone() for n, p in m.state_dict().items()}
        with vltok.patched(m, "crossget", keep=0.25, cross_tokens=cross):
            a = m(**inp).logits
        with vltok.patched(m, "crossget", keep=0.25, cross_tokens=path) as h:
            assert torch.equal(m(**inp).logits, a)
            assert h.method.params["trained"] and h.method.params["trained_projector"]
            g = m.generate(**inp, max_new_tokens=3, do_sample=False)
            assert g.shape == (2, inp["input_ids"].shape[1] + 3)
        with vltok.patched(m, "crossget", keep=1.0, cross_tokens=path):   # keep 1: nothing runs, not even the projector
            assert torch.equal(m(**inp).logits, before)
        assert torch.equal(m(**inp).logits, before)
    assert all(torch.equal(params[n], p) for n, p in m.state_dict().items())
    proj, tower = m.model.multi_modal_projector, m.model.vision_tower
    assert "forward" not in m.__dict__ and "forward" not in proj.__dict__ and not proj._forward_pre_hooks
    assert all("forward" not in layer.__dict__ for layer in encoder_layers(tower))


def test_bad_checkpoints_and_unsupported_towers_give_clear_errors(tmp_path):
    m = deep_llava()
    # not a file / not a safetensors / another method's checkpoint
    with pytest.raises(ValueError, match="cannot read cross_tokens"):
        vltok.patch(m, "crossget", keep=0.25, cross_tokens=str(tmp_path / "missing.safetensors"))
    stock = m.model.multi_modal_projector
    from vltok.methods.tokenshuffle import save_projector
    ts = str(tmp_path / "ts.safetensors")
    save_projector(ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, "gelu", (2, 2)), ts)
    with pytest.raises(ValueError, match="not a vltok crossget"):
        vltok.patch(m, "crossget", keep=0.25, cross_tokens=ts)
    with pytest.raises(ValueError, match="importance='none'"):
        vltok.patch(m, "crossget", keep=0.25, cross_tokens=CrossTokens(3, 32), importance="none")
    cases = [(CrossTokens(1, 32), "offsets for 1 encoder layers"),            # trained on the 2-layer tiny tower
             (CrossTokens(3, 48), "width 48"),
             (CrossTokens(3, 32, encoder="facebook/dinov2-small"), "dinov2-small"),
             (CrossTokens(3, 32, projector=ShuffleProjector((1, 1), 32, 16, 32)), "projector")]
    for cross, msg in cases:
        path = str(tmp_path / "bad.safetensors")
        save_cross_tokens(cross, path)
        with pytest.raises(vltok.IncompatibleError, match=msg):
            vltok.patch(m, "crossget", keep=0.25, cross_tokens=path)
        assert vltok.get_handle(m) is None and "forward" not in m.__dict__
        assert all("forward" not in layer.__dict__ for layer in encoder_layers(m.model.vision_tower))
        assert not m.model.multi_modal_projector._forward_pre_hooks
    # SigLIP has no CLS to start the cross token from
    siglip = deep_llava(vision=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=8))
    siglip.config.vision_feature_select_strategy = "full"
    with pytest.raises(vltok.IncompatibleError, match="no CLS"):
        vltok.patch(siglip, "crossget", keep=0.25, cross_tokens=CrossTokens(2, 32))
    assert vltok.get_handle(siglip) is None


def test_timm_vit_refuses_cross_tokens():
    pytest.importorskip("timm")
    from test_timm_vit import tiny_vit

    vit = tiny_vit()
    with pytest.raises(vltok.IncompatibleError, match="cross_tokens"):
        vltok.patch(vit, "crossget", keep=0.5, cross_tokens=CrossTokens(2, vit.embed_dim))
    assert vltok.get_handle(vit) is None and all("forward" not in b.__dict__ for b in vit.blocks)


def test_trainer_crossget_loss_goes_down_resume_and_reload(tmp_path):
    from vltok.train import train

    m = sharp_llava()   # 2 CLIP layers, vision_feature_layer=-2: one used layer
    batch_at = tiny_batches(m)
    res = train(m, "crossget", 0.25, batch_at, steps=30, out=tmp_path / "a", lr=3e-3, save_every=10,
                log=lambda *a: None)
    first, last = sum(res["losses"][:5]) / 5, sum(res["losses"][-5:]) / 5
    assert last < first * 0.7
    cross = res["module"]
    assert cross.offsets.shape == (1, 32) and cross.offsets.abs().sum() > 0 and cross.projector is not None
    assert vltok.get_handle(m) is None and all(p.requires_grad for p in m.parameters())
    # resume: 20 steps, then 10 more from the step-20 checkpoint == 30 straight
    m2 = sharp_llava()
    train(m2, "crossget", 0.25, batch_at, steps=20, out=tmp_path / "b", lr=3e-3, save_every=10, log=lambda *a: None)
    res2 = train(m2, "crossget", 0.25, batch_at, steps=30, out=tmp_path / "b", lr=3e-3, save_every=10,
                 resume=True, log=lambda *a: None)
    assert len(res2["losses"]) == 10 and abs(res2["losses"][-1] - res["losses"][-1]) < 1e-4
    for a, b in zip(cross.state_dict().values(), res2["module"].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    # the saved file loads through the method and reproduces the trained module's logits
    inp = llava_inputs(m, PROMPTS)
    with torch.no_grad():
        with vltok.patched(m, "crossget", keep=0.25, cross_tokens=cross):
            a = m(**inp).logits
        with vltok.patched(m, "crossget", keep=0.25, cross_tokens=str(res["path"])):
            assert torch.allclose(m(**inp).logits, a, atol=1e-6)
    # cross token only, visible (the paper's placement): the offsets get a gradient and move
    res3 = train(sharp_llava(), "crossget", 0.25, batch_at, steps=3, out=tmp_path / "c", lr=3e-3,
                 log=lambda *a: None, visible=True, projector=False)
    assert res3["module"].projector is None and res3["module"].visible and res3["module"].offsets.abs().sum() > 0
    assert load_cross_tokens(str(res3["path"])).visible


def test_cli_train_crossget_options():
    from vltok.cli import build_parser

    args = build_parser().parse_args(["train", "crossget", "--out", "x", "--keep", "0.16", "--cross-visible"])
    assert args.method == "crossget" and args.cross_visible and not args.no_projector
