"""tome / crossget merging inside the Qwen2-VL / Qwen2.5-VL vision tower (adapters/qwen_tower.py), on tiny configs of
the real transformers classes (4 vision blocks; Qwen2.5-VL: 2x2-unit windows, block 2 full attention).

The reference is written out here: every frame on its own, units in their native order (raster; Qwen2.5-VL: window
order from the config), attention as an explicit softmax over the whole frame with a window mask (no packing, no
cu_seqlens, no permutation), rotary from the inverse frequencies by hand, log-size bias on the keys, and the
method's own ``merge(..., anchor=)`` on the unit view (2x2 rows concatenated)."""
from __future__ import annotations

import pytest
import torch

import vltok
from tiny_families import IMG, QWEN2_VISION, QWEN25_VISION, QWEN_TEXT, VEND, VID, VSTART, qwen_inputs

VERSIONS = ("2", "2.5")
METHODS = ("tome", "crossget")
IMAGES = [(1, 8, 8), (1, 8, 12)]          # two images of different sizes (16 and 24 units)
VIDEOS = [(2, 8, 8)]                      # a video of 2 temporal slices
PROMPTS = [[5, -1, 6, 7], [8, -1, 9]]
SLOW = pytest.mark.slow


def tiny(version, depth=4, layers=2, seed=0):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(seed)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if version == "2":
        cfg = Qwen2VLConfig(text_config=dict(QWEN_TEXT, model_type="qwen2_vl_text", num_hidden_layers=layers),
                            vision_config=dict(QWEN2_VISION, depth=depth), **ids)
        m = Qwen2VLForConditionalGeneration(cfg)
    else:
        cfg = Qwen2_5_VLConfig(text_config=dict(QWEN_TEXT, model_type="qwen2_5_vl_text", num_hidden_layers=layers),
                               vision_config=dict(QWEN25_VISION, depth=depth, fullatt_block_indexes=[2]), **ids)
        m = Qwen2_5_VLForConditionalGeneration(cfg)
    return m.eval().set_attn_implementation("sdpa") or m.eval()


@pytest.fixture(scope="module", params=VERSIONS)
def model(request):
    return tiny(request.param)


def _rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos[:, None] + rot * sin[:, None]


@torch.no_grad()
def reference(model, pixels, grid_thw, merger):
    """Per item: (features [kept units, D] in raster order of the kept units, kept unit indices per frame)."""
    vis, vc = model.model.visual, model.config.vision_config
    m = vc.spatial_merge_size
    u = m * m
    windowed = hasattr(vis, "fullatt_block_indexes")
    ws = vc.window_size // m // vc.patch_size if windowed else None
    full = set(vis.fullatt_block_indexes) if windowed else set(range(len(vis.blocks)))
    x_all = vis.patch_embed(pixels)
    C = x_all.shape[-1]
    inv = vis.rotary_pos_emb.inv_freq.float()
    depth = len(vis.blocks)
    feats, kept_all, off = [], [], 0
    for t, h, w in grid_thw.tolist():
        hu, wu = h // m, w // m
        U = hu * wu
        item, kept_item = [], []
        for _ in range(t):
            x = x_all[off:off + U * u].view(U, u, C)
            off += U * u
            ph = torch.tensor([(k // wu) * m + a for k in range(U) for a in range(m) for b in range(m)])
            pw = torch.tensor([(k % wu) * m + b for k in range(U) for a in range(m) for b in range(m)])
            f = torch.cat([ph[:, None] * inv, pw[:, None] * inv], -1)
            emb = torch.cat([f, f], -1)
            cos_t, sin_t = emb.cos(), emb.sin()
            if windowed:
                key = lambda k: ((k // wu) // ws, (k % wu) // ws, (k // wu) % ws, (k % wu) % ws)
                order = sorted(range(U), key=key)
                win = torch.tensor([((k // wu) // ws) * 1000 + (k % wu) // ws for k in range(U)])
            else:
                order = list(range(U))
                win = torch.zeros(U, dtype=torch.long)
            rank = torch.empty(U, dtype=torch.long)
            rank[torch.tensor(order)] = torch.arange(U)
            anchor = torch.tensor(order)
            x = x[anchor].reshape(-1, C)
            size = torch.ones(U)
            sched = list(merger.schedule(U, depth)) + [0] * depth
            for i, blk in enumerate(vis.blocks):
                n = anchor.numel()
                rows = (anchor[:, None] * u + torch.arange(u)).reshape(-1)
                cos, sin = cos_t[rows], sin_t[rows]
                attn = blk.attn
                H = attn.num_heads
                q, k, v = attn.qkv(blk.norm1(x)).view(n * u, 3, H, -1).unbind(1)
                keys = k
                q, k = _rope(q.float(), cos, sin), _rope(k.float(), cos, sin)
                logits = torch.einsum("ihd,jhd->hij", q, k) * attn.scaling
                wr = win[anchor].repeat_interleave(u)
                allowed = torch.ones(n * u, n * u, dtype=torch.bool) if i in full else wr[:, None] == wr[None, :]
                logits = logits + size.log().repeat_interleave(u)[None, None] * float(merger.prop_attn)
                logits = logits.masked_fill(~allowed, float("-inf"))
                o = torch.einsum("hij,jhd->ihd", logits.softmax(-1), v.float()).reshape(n * u, -1)
                x = x + attn.proj(o)
                r = sched[i]
                if r:
                    ku = keys.reshape(n, u, H, -1).transpose(1, 2).reshape(1, n, H, -1)
                    y, s, _, a = merger.merge(x.view(1, n, u * C), size.view(1, n, 1), torch.arange(n)[None], ku,
                                              None, r, 0, anchor=anchor[None])
                    perm = rank[a[0]].argsort()
                    x, size, anchor = y[0][perm].reshape(-1, C), s[0, :, 0][perm], a[0][perm]
                x = x + blk.mlp(blk.norm2(x))
            out = vis.merger(x)
            perm = anchor.argsort()
            item.append(out[perm])
            kept_item.append(anchor[perm])
        feats.append(torch.cat(item))
        kept_all.append(kept_item)
    return feats, kept_all


def _inputs(model, videos=False):
    if videos:
        return qwen_inputs(model, [[5, -2, 6, 7], [8, -2, 9]], (), VIDEOS + [(2, 8, 12)])
    return qwen_inputs(model, PROMPTS, IMAGES)


@pytest.mark.parametrize("videos", [False, True], ids=["images", "videos"])
@pytest.mark.parametrize("keep", [pytest.param(0.5, marks=SLOW), 0.1])   # 0.1: several merge rounds in one block
@pytest.mark.parametrize("method", METHODS)
def test_tower_equals_written_out_reference(model, method, keep, videos):
    _check_reference(model, method, keep, videos)


@pytest.mark.parametrize("method", METHODS)
def test_early_schedule_equals_reference(model, method):   # every merge in block 0 (several rounds), then 3 short
    _check_reference(model, method, 0.25, False, schedule="early")


def _check_reference(model, method, keep, videos, **opts):
    inp = _inputs(model, videos)
    pix, grid = (inp["pixel_values_videos"], inp["video_grid_thw"]) if videos else (inp["pixel_values"],
                                                                                    inp["image_grid_thw"])
    kind = "video" if videos else "image"
    with vltok.patched(model, method, keep=keep, **opts) as h, torch.no_grad():
        out = getattr(model.model, f"get_{kind}_features")(pix, grid).pooler_output
        merger = h.adapter.method.vision
        ref, kept = reference(model, pix, grid, merger)
        run = h.adapter._tower.run
        counts = [h.adapter.method.pre_llm.count(hh * ww // 4) for t, hh, ww in grid.tolist() for _ in range(t)]
    assert [k.numel() for k in run.kept] == counts
    assert [f.shape[0] for f in out] == [sum(c) for c in _per_item(counts, grid)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert [k.tolist() for item in kept for k in item] == [k.tolist() for k in run.kept]
    assert run.counts[0] == sum(hh * ww // 4 * t for t, hh, ww in grid.tolist()) and run.counts[-1] == sum(counts)


def _per_item(counts, grid):
    out, i = [], 0
    for t, _, _ in grid.tolist():
        out.append(counts[i:i + t])
        i += t
    return out


@pytest.mark.parametrize("videos,gen", [(False, True), (True, False), pytest.param(True, True, marks=SLOW)],
                         ids=["images", "videos", "videos-generate"])
def test_keep_one_is_bit_identical(model, videos, gen):
    inp = _inputs(model, videos)
    with torch.no_grad():
        ref = model(**inp).logits
        ref_gen = model.generate(**inp, max_new_tokens=2, do_sample=False) if gen else None
        for method in METHODS:
            with vltok.patched(model, method, keep=1.0):
                assert torch.equal(model(**inp).logits, ref)
                if gen:
                    assert torch.equal(model.generate(**inp, max_new_tokens=2, do_sample=False), ref_gen)


def test_padded_window_attention_equals_per_segment():
    import torch.nn.functional as F

    from vltok.adapters.qwen_tower import _padded_attention

    torch.manual_seed(0)
    lens = [3, 5, 2, 5, 1, 4, 4, 4, 2, 3]
    N = sum(lens)
    q, k, v = (torch.randn(N, 2, 8) for _ in range(3))
    bias = torch.randn(N)
    ref, s = [], 0
    for L in lens:
        sl = slice(s, s + L)
        s += L
        o = F.scaled_dot_product_attention(*(t[sl].transpose(0, 1)[None] for t in (q, k, v)),
                                           attn_mask=bias[sl].view(1, 1, 1, L), scale=0.3)
        ref.append(o[0].transpose(0, 1).reshape(L, -1))
    torch.testing.assert_close(_padded_attention(q, k, v, lens, bias, 0.3), torch.cat(ref))


def _capture(model):
    got = {}

    def inner(mod, args, kwargs):
        got["ids"] = kwargs.get("input_ids")

    def lm(mod, args, kwargs):
        got["pos"] = kwargs.get("position_ids")

    hs = [model.model.register_forward_pre_hook(inner, with_kwargs=True),
          model.model.language_model.register_forward_pre_hook(lm, with_kwargs=True)]
    return got, hs


@pytest.mark.parametrize("method,videos", [("tome", False), ("crossget", True),
                                           pytest.param("crossget", False, marks=SLOW),
                                           pytest.param("tome", True, marks=SLOW)])
def test_llm_gets_reference_features_at_original_positions(model, method, videos):
    """End to end: the patched logits equal the unpatched model run on the reduced placeholders with the reference
    features spliced in and every kept unit at its original M-RoPE position."""
    inp = _inputs(model, videos)
    kind, code = ("video", VID) if videos else ("image", IMG)
    pix, grid = (inp["pixel_values_videos"], inp["video_grid_thw"]) if videos else (inp["pixel_values"],
                                                                                    inp["image_grid_thw"])
    got, hs = _capture(model)
    try:
        with torch.no_grad():
            model(**inp)
            full_pos, full_ids = got["pos"][-3:], got["ids"]
            with vltok.patched(model, method, keep=0.5) as h:
                out = model(**inp).logits
                stats = dict(h.stats)
                ref, kept = reference(model, pix, grid, h.adapter.method.vision)
                kp = h.kept_patches()
            new_pos, new_ids = got["pos"][-3:], got["ids"]
    finally:
        for x in hs:
            x.remove()
    # positions: every kept unit carries the native position of its anchor
    items = iter([(k, t, hh // 2 * ww // 2) for k, (t, hh, ww) in zip(kept, grid.tolist())])
    for b in range(new_ids.shape[0]):
        cols_full = (full_ids[b] == code).nonzero().flatten()
        cols_new = (new_ids[b] == code).nonzero().flatten()
        idx, base = [], 0
        while base < cols_full.numel():
            k, t, U = next(items)
            for s, ks in enumerate(k):
                idx += (ks + base + s * U).tolist()
            base += t * U
        assert torch.equal(new_pos[:, b, cols_new], full_pos[:, b, cols_full[torch.tensor(idx)]])
    # logits: the unpatched model on the reduced placeholders, reference features, those positions
    counts = [f.shape[0] for f in ref]
    red = qwen_inputs(model, [[5, -2 if videos else -1, 6, 7], [8, -2 if videos else -1, 9]],
                      () if videos else IMAGES, VIDEOS + [(2, 8, 12)] if videos else (), reduced=counts)
    assert torch.equal(red["input_ids"], new_ids)
    orig = getattr(model.model, f"get_{kind}_features")

    def fake(*a, **k):
        o = orig(*a, **k)
        o.pooler_output = tuple(ref)
        return o

    model.model.__dict__[f"get_{kind}_features"] = fake
    try:
        with torch.no_grad():
            want = model(**red, position_ids=new_pos).logits
    finally:
        del model.model.__dict__[f"get_{kind}_features"]
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    # stats and kept_patches()
    assert stats["tokens_in"] == sum(t * hh * ww // 4 for t, hh, ww in grid.tolist())
    assert stats["tokens_out"] == sum(counts)
    assert stats["vision_tokens_per_layer"][0] == stats["tokens_in"] and \
        stats["vision_tokens_per_layer"][-1] == stats["tokens_out"]
    assert [e.kept for e in kp] == [k.tolist() for item in kept for k in item]
    assert all(e.kind == "merge" for e in kp)


@pytest.mark.parametrize("method", ["crossget", pytest.param("tome", marks=SLOW)])
def test_generate_and_no_prop_attn(model, method):
    inp = _inputs(model)
    with torch.no_grad():
        with vltok.patched(model, method, keep=0.25) as h:
            logits = model(**inp).logits
            gen = model.generate(**inp, max_new_tokens=2, do_sample=False)
        assert torch.equal(gen[:, inp["input_ids"].shape[1]], logits[:, -1].argmax(-1))
        assert torch.equal(gen[:, :inp["input_ids"].shape[1]], inp["input_ids"])   # the caller's prompt back
        with vltok.patched(model, method, keep=0.25, prop_attn=False) as h:
            feats = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
            ref, _ = reference(model, inp["pixel_values"], inp["image_grid_thw"], h.adapter.method.vision)
    for a, b in zip(feats, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_refusals_and_fallbacks():
    from vltok.methods.crossget import CrossTokens

    m = tiny("2", depth=2, layers=6)
    with pytest.raises(vltok.IncompatibleError, match="cross token"):
        vltok.patch(m, "crossget", keep=0.5, cross_tokens=CrossTokens(2, 32))
    with pytest.warns(UserWarning, match="stage\\(s\\) vision not applicable"):
        h = vltok.patch(m, "mustdrop", keep=0.5)
    assert h.method.vision is None
    h.remove()
    with vltok.patched(m, "tome", keep=0.5, schedule="post") as h:   # after the merger, as before
        assert h.method.vision is None and h.method.pre_llm is not None
    with vltok.patched(m, "tome", keep=0.5) as h:
        assert h.method.vision is not None


def test_vision_hidden_states_while_merging(model):
    """output_hidden_states through the merging tower: the first block's input and every block's output, with the
    rows alive after that block; blocks before the first merge equal the unpatched tower's; output_attentions
    (not computed by the merging attention) is refused with the fix named."""
    inp = _inputs(model)
    px, grid = inp["pixel_values"], inp["image_grid_thw"]
    depth = len(model.model.visual.blocks)
    with torch.no_grad():
        ref = model.model.get_image_features(px, grid, output_hidden_states=True)
        with vltok.patched(model, "tome", keep=0.25) as h:
            tower = h.adapter._tower
            plain = tower.select.schedule
            tower.select.schedule = lambda U: [0, 0] + list(plain(U))[2:]   # no merge in blocks 0 and 1
            try:
                out = model.model.get_image_features(px, grid, output_hidden_states=True)
                counts = tower.run.counts
                none = model.model.get_image_features(px, grid)
                with pytest.raises(vltok.IncompatibleError, match="schedule='post'"):
                    model.model.get_image_features(px, grid, output_attentions=True)
            finally:
                tower.select.schedule = plain
    hs = out.hidden_states
    assert len(hs) == depth + 1 == len(ref.hidden_states) and none.hidden_states is None
    assert [x.shape[0] for x in hs] == [c * 4 for c in counts] and counts[-1] < counts[0]
    for a, b in zip(ref.hidden_states[:3], hs[:3]):   # the embedding and blocks 0, 1: nothing merged yet
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert hs[3].shape[0] < ref.hidden_states[3].shape[0]
    assert torch.equal(hs[-1], out.last_hidden_state)
