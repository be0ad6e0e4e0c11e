"""tokenshuffle (training-free pooling and the trained shuffle projector), llavamini pooling, and vltok.train."""
import json

import pytest
import torch

import vltok
from tiny import IMG, llava_inputs, tiny_llava
from vltok.methods.llavamini import pooled_grid
from vltok.methods.tokenshuffle import (ShuffleProjector, load_projector, save_projector, shuffle_pool,
                                        space_to_depth, window_for_keep)

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, 11, 12, 13, 14, -1, 15, 16, 17, 18]]


def test_window_for_keep_follows_the_spec_table():
    assert window_for_keep(1.0) == (1, 1)
    assert window_for_keep(0.25) == (2, 2)
    assert window_for_keep(0.16) == (3, 2)
    assert window_for_keep(0.111) == (3, 3)
    assert window_for_keep(0.083) == (4, 3)
    assert window_for_keep(0.0625) == (4, 4)


@pytest.mark.parametrize("h,w,s_h,s_w", [(8, 8, 2, 2), (6, 8, 3, 2), (9, 6, 3, 3)])
def test_pooling_is_space_to_depth_then_fixed_mean_map(h, w, s_h, s_w):
    x = torch.randn(3, h * w, 5, dtype=torch.float64)
    s2d = space_to_depth(x, h, w, s_h, s_w)
    # explicit window content: block p = a*s_w + b holds the token at window row a, column b
    g = x.view(3, h, w, 5)
    win = g[:, :s_h, s_w:2 * s_w].reshape(3, -1, 5)          # second window of the first window row
    assert torch.equal(s2d[:, 1], win.reshape(3, -1))
    n = s_h * s_w
    mean_map = torch.cat([torch.eye(5, dtype=torch.float64)] * n, 1) / n    # (1/n)[I I ... I]
    assert torch.allclose(shuffle_pool(x, h, w, s_h, s_w), s2d @ mean_map.T, atol=1e-12)


def test_ceil_mode_edge_windows_average_their_real_tokens():
    x = torch.randn(2, 7 * 5, 3)
    y = shuffle_pool(x, 7, 5, 3, 2)
    assert y.shape == (2, 3 * 3, 3)
    g = x.view(2, 7, 5, 3)
    assert torch.allclose(y[:, 8], g[:, 6:7, 4:5].mean((1, 2)))      # 1x1 corner window
    assert torch.allclose(y[:, 2], g[:, 0:3, 4:5].mean((1, 2)))      # 3x1 right edge window
    assert torch.allclose(y[:, 6], g[:, 6:7, 0:2].mean((1, 2)))      # 1x2 bottom edge window


def manual(m, reduce_fn, k, project=None):
    inp = llava_inputs(m, PROMPTS)
    with torch.no_grad():
        hs = m.model.vision_tower(inp["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = (project or m.model.multi_modal_projector)(reduce_fn(hs))
    red = llava_inputs(m, PROMPTS, n_ph=k)
    ids = red["input_ids"]
    emb = m.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
    return m(inputs_embeds=emb, attention_mask=red["attention_mask"]).logits, red["attention_mask"].bool()


def window_means(x, h, w, s_h, s_w):
    """Explicit reference: the mean of each (possibly clipped) window, windows in raster order."""
    g = x.view(x.shape[0], h, w, -1)
    return torch.stack([g[:, i:i + s_h, j:j + s_w].mean((1, 2)) for i in range(0, h, s_h) for j in range(0, w, s_w)], 1)


# 8x8 by 3x2 is not divisible: ceil-mode windows, 3 x 4 = 12 tokens
@pytest.mark.parametrize("keep,window,k", [(0.25, (2, 2), 16), (0.16, (3, 2), 12)])
def test_training_free_tokenshuffle_equals_explicit_reference(keep, window, k):
    m = tiny_llava()
    ref, valid = manual(m, lambda x: window_means(x, 8, 8, *window), k)
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "tokenshuffle", keep=keep) as h:
        out = m(**inp).logits
        m.generate(**inp, max_new_tokens=3, do_sample=False)
    assert h.method.params["window"] == window and h.stats["tokens_out"] == 2 * k
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)


def test_keep1_identity_for_tokenshuffle_and_llavamini():
    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    ref = m(**inp).logits
    for method in ("tokenshuffle", "llavamini"):
        with vltok.patched(m, method, keep=1.0):
            assert torch.equal(m(**inp).logits, ref)
    assert torch.equal(m(**inp).logits, ref)


def test_shuffle_projector_step0_equals_pool_then_project_and_checkpoint_roundtrip(tmp_path):
    m = tiny_llava()
    stock = m.model.multi_modal_projector
    proj = ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, m.config.projector_hidden_act, (2, 2))
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        a = proj(space_to_depth(x, 8, 8, 2, 2))
        b = stock(shuffle_pool(x, 8, 8, 2, 2))
    assert torch.allclose(a, b, atol=1e-6)
    # through vltok.patch: the trained-mode model at step 0 gives the training-free logits
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "tokenshuffle", keep=0.25):
        free = m(**inp).logits
    with vltok.patched(m, "tokenshuffle", keep=0.25, projector=proj) as h:
        trained = m(**inp).logits
    assert h.stats["tokens_out"] == 32 and torch.allclose(trained, free, atol=1e-5)
    assert m.model.multi_modal_projector.forward.__func__ is type(stock).forward
    path = tmp_path / "p.safetensors"
    save_projector(proj, str(path), "clip")
    with vltok.patched(m, "tokenshuffle", projector=str(path)) as h:   # window (and keep) come from the file
        assert torch.allclose(m(**inp).logits, trained)
        assert h.method.params["window"] == (2, 2) and h.keep == 0.25
    with pytest.raises(ValueError, match="window"):
        load_projector(str(path), window=(3, 2))
    with pytest.raises(ValueError, match="encoder"):
        load_projector(str(path), encoder="siglip")


def test_llavamini_pool_grid_and_reference():
    assert pooled_grid(24, 24, 0.25) == (12, 12) and pooled_grid(24, 24, 0.111) == (8, 8)
    assert pooled_grid(24, 24, 0.16) == (9, 10) and pooled_grid(24, 24, 0.0278) == (4, 4)
    assert pooled_grid(24, 24, 0.0017) == (1, 1)
    m = tiny_llava()
    from vltok.methods.baselines import pool_grid

    r_h, r_w = pooled_grid(8, 8, 0.3)
    ref, valid = manual(m, lambda x: pool_grid(x, 8, 8, r_h, r_w), r_h * r_w)
    with vltok.patched(m, "llavamini", keep=0.3) as h:
        out = m(**llava_inputs(m, PROMPTS)).logits
    assert torch.allclose(out[valid], ref[valid], atol=1e-5) and h.stats["tokens_out"] == 2 * r_h * r_w
    with pytest.raises(ValueError, match="early_fusion"):
        vltok.patch(m, "llavamini", keep=0.3, mode="early_fusion")


def tiny_batches(m, batch_size=2):
    """Deterministic tiny training data: the answer is the token id of the brightest image quadrant + 20."""
    def batch_at(step):
        g = torch.Generator().manual_seed(step)
        inp = llava_inputs(m, [[1, -1, 5, 6]] * batch_size, seed=step)
        pv = inp["pixel_values"] * 0.1
        q = torch.randint(0, 4, (batch_size,), generator=g)
        for i in range(batch_size):
            r, c = divmod(int(q[i]), 2)
            pv[i, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] += 2.0
        ids = torch.cat([inp["input_ids"], (20 + q)[:, None]], 1)
        am = torch.cat([inp["attention_mask"], torch.ones(batch_size, 1, dtype=torch.long)], 1)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        return dict(input_ids=ids, attention_mask=am, pixel_values=pv, labels=labels)
    return batch_at


def sharp_llava():
    """tiny_llava with a 30x lm_head: a random tiny LM's logits are otherwise ~uniform whatever its input, so no
    projector could lower the loss much."""
    m = tiny_llava()
    with torch.no_grad():
        m.lm_head.weight.mul_(30)
    return m


def test_trainer_loss_goes_down_checkpoint_and_resume(tmp_path):
    from vltok.train import train

    m = sharp_llava()
    batch_at = tiny_batches(m)
    evals = []

    def eval_fn(model):
        b = batch_at(10_000)
        return {"loss": float(model(**b).loss)}

    res = train(m, "tokenshuffle", 0.25, batch_at, steps=30, out=tmp_path / "a", lr=3e-3, save_every=10,
                eval_every=15, eval_fn=eval_fn, log=lambda *a: None)
    first, last = sum(res["losses"][:5]) / 5, sum(res["losses"][-5:]) / 5
    assert last < first * 0.5
    assert [e["step"] for e in res["evals"]] == [0, 15, 30] and res["evals"][-1]["loss"] < res["evals"][0]["loss"]
    assert vltok.get_handle(m) is None and all(p.requires_grad for p in m.parameters())   # flags restored
    assert (tmp_path / "a" / "latest").read_text() == "step-30"
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in log) == 30
    # resume: 20 steps, then 10 more from the step-20 checkpoint == 30 straight
    m2 = sharp_llava()
    for p in m2.parameters():
        p.requires_grad_(True)
    train(m2, "tokenshuffle", 0.25, batch_at, steps=20, out=tmp_path / "b", lr=3e-3, save_every=10,
          log=lambda *a: None)
    res2 = train(m2, "tokenshuffle", 0.25, batch_at, steps=30, out=tmp_path / "b", lr=3e-3, save_every=10,
                 resume=True, log=lambda *a: None)
    assert len(res2["losses"]) == 10
    assert torch.allclose(res2["losses"][-1] * torch.ones(1), res["losses"][-1] * torch.ones(1), atol=1e-5)
    for a, b in zip(res["module"].state_dict().values(), res2["module"].state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    # the saved module loads through the method and reproduces the trained logits
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "tokenshuffle", keep=0.25, projector=res["module"]):
        a = m(**inp).logits
    with vltok.patched(m, "tokenshuffle", keep=0.25, projector=str(res["path"])):
        assert torch.allclose(m(**inp).logits, a, atol=1e-6)


def test_cli_lists_train_subcommand():
    from vltok.cli import build_parser

    args = build_parser().parse_args(["train", "tokenshuffle", "--out", "x", "--keep", "0.16"])
    assert args.method == "tokenshuffle" and args.keep == 0.16


def test_trained_projector_refused_where_the_adapter_cannot_run_it():
    from tiny import tiny_llava_next

    m = tiny_llava_next()
    stock = m.model.multi_modal_projector
    proj = ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, "gelu", (2, 2))
    with pytest.raises(vltok.IncompatibleError, match="trained projector"):
        vltok.patch(m, "tokenshuffle", keep=0.25, projector=proj)
    assert vltok.get_handle(m) is None and "forward" not in m.__dict__


def _square(step):
    return {"x": torch.full((2,), float(step * step))}


def test_prefetched_batches_equal_direct_calls_in_order_and_after_a_jump():
    from vltok.train import Prefetched

    pf = Prefetched(_square, workers=2)
    try:
        got = [float(pf(s)["x"][0]) for s in (0, 1, 2, 3, 7, 8)]
    finally:
        pf.close()
    assert got == [0.0, 1.0, 4.0, 9.0, 49.0, 64.0]


@pytest.mark.parametrize("method", ["tokenshuffle", "crossget", "llavamini"])
def test_train_refuses_families_that_cannot_run_the_learned_module(method, tmp_path):
    """LLaVA-NeXT packs its tiles around the projector: vltok train says so before building or writing anything."""
    from tiny import tiny_llava_next
    from vltok.train import train

    with pytest.raises(vltok.IncompatibleError, match="llava_next adapter cannot run it"):
        train(tiny_llava_next(), method, 0.25, lambda step: {}, steps=1, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
