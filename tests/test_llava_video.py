"""LLaVA-NeXT-Video and Video-LLaVA (and OneVision's in-LLM layout): images and videos (keep per frame). Explicit reference = the unpatched model fed
hand-reduced features through inputs_embeds, the features rebuilt from the model's own pieces (tower, frame
pooling, projector) with the reduction applied where vltok applies it."""
import pytest
import torch

import vltok
from vltok import compat
from test_fourier import fft_reference
from tiny import IMG
from tiny_families import VID, onevision_inputs, tiny_next_video, tiny_onevision, tiny_video_llava
from vltok.api import build_method
from vltok.methods.baselines import random_indices

PROMPTS = [[1, -1, 5, -2], [1, 2, 3, -1, 9, -2, 4]]
NEXT_SIZES = [[80, 120], [64, 64]]
FRAMES = {"next_video": 3, "video_llava": 8}   # Video-LLaVA's checkpoint takes 8 frames


def make(family, layers=2):
    if family == "next_video":
        return tiny_next_video(layers=layers), NEXT_SIZES
    if family == "onevision":
        return tiny_onevision(layers=layers), NEXT_SIZES
    return tiny_video_llava(layers=layers), [0, 0]   # fixed-size images: one entry per image


def reduce_grid(x, h, w, method, keep):
    """What the method makes of each grid of x [B, h*w, C]; selection methods also return the kept indices."""
    if method == "fourier":
        r_h, r_w = round(h * keep ** 0.5), round(w * keep ** 0.5)
        return fft_reference(x.double(), h, w, r_h, r_w, "resize").to(x.dtype), None
    idx = random_indices(h * w, max(1, round(keep * h * w)), 0)
    return x[:, idx], idx


def next_image(f, t, h, w, method, keep):
    """A packed LLaVA-NeXT image (base tile + h x (w+1) map) reduced: one newline after every output row."""
    base, _ = reduce_grid(f[None, :t * t], t, t, method, keep)
    grid = f[t * t:].view(h, w + 1, -1)
    nl = grid[0, -1]
    y, idx = reduce_grid(grid[:, :w].reshape(1, h * w, -1), h, w, method, keep)
    if idx is None:
        rows = [torch.cat([r, nl[None]]) for r in y[0].view(round(h * keep ** 0.5), -1, y.shape[-1])]
    else:
        rows = [torch.cat([y[0][idx // w == r], nl[None]]) for r in range(h)]
    return torch.cat([base[0], *rows])


@torch.no_grad()
def hand_reduced(family, m, inp, method, keep):
    """(per image, per video) features the LLM should receive."""
    inner, vfl = m.model, m.config.vision_feature_layer
    vc = m.config.vision_config
    t = vc.image_size // vc.patch_size
    pvv = inp["pixel_values_videos"]
    n_vid, frames = pvv.shape[:2]
    if family == "next_video":
        from vltok.adapters.llava import llava_next_unpadded

        imgs = inner.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output
        out_img = []
        for f, size in zip(imgs, inp["image_sizes"].tolist()):
            h, w = llava_next_unpadded(m.config, size)
            assert f.shape[0] == t * t + h * (w + 1)
            out_img.append(next_image(f, t, h, w, method, keep))
        hs = inner.vision_tower(pvv.flatten(0, 1), output_hidden_states=True).hidden_states[vfl][:, 1:]
        pooled = inner.vision_resampler(hs)
        p = t // m.config.spatial_pool_stride
        assert pooled.shape[1] == p * p
        y, _ = reduce_grid(pooled, p, p, method, keep)
        vid = inner.multi_modal_projector(y)
    else:
        hs = inner.image_tower(inp[compat.video_llava_image_kwarg(m)], output_hidden_states=True).hidden_states[vfl][:, 1:]
        out_img = list(inner.multi_modal_projector(reduce_grid(hs, t, t, method, keep)[0]))
        hs = inner.video_tower(pvv.flatten(0, 1), output_hidden_states=True).hidden_states[vfl]
        assert hs.shape[1] == 1 + t * t                      # the CLS stays on each frame
        y, _ = reduce_grid(hs[:, 1:], t, t, method, keep)
        vid = inner.multi_modal_projector(torch.cat([hs[:, :1], y], 1))
    return out_img, list(vid.reshape(n_vid, -1, vid.shape[-1]))


def reference(m, inp_red, img, vid, gen_tokens=0):
    ids = inp_red["input_ids"]
    with torch.no_grad():
        emb = m.get_input_embeddings()(ids).clone()
        if img:
            emb[ids == IMG] = torch.cat(img)
        if vid:
            emb[ids == VID] = torch.cat(vid)
        logits = m(inputs_embeds=emb, attention_mask=inp_red["attention_mask"]).logits
        gen = m.generate(inputs_embeds=emb, attention_mask=inp_red["attention_mask"], max_new_tokens=gen_tokens,
                         do_sample=False) if gen_tokens else None
    return logits, gen


@pytest.mark.parametrize("method", ["fourier", "random"])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", ["next_video", "video_llava"])
def test_images_and_videos_equal_unpatched_model_on_hand_reduced_features(family, padding, method):
    m, sizes = make(family)
    keep = 0.3
    frames = FRAMES[family]
    inp = onevision_inputs(m, PROMPTS, sizes, frames=frames, padding=padding)
    saved = {k: v.clone() for k, v in inp.items()}
    img, vid = hand_reduced(family, m, inp, method, keep)
    red = onevision_inputs(m, PROMPTS, sizes, frames=frames, padding=padding,
                           counts=[f.shape[0] for f in img] + [v.shape[0] for v in vid])
    ref, ref_gen = reference(m, red, img, vid, gen_tokens=3 if padding == "left" else 0)
    with vltok.patched(m, method, keep=keep) as h:
        out = m(**inp).logits
        stats = h.stats
        gen = m.generate(**inp, max_new_tokens=3, do_sample=False) if padding == "left" else None
    for k in inp:
        assert torch.equal(inp[k], saved[k]), f"caller's {k} was modified"
    valid = red["attention_mask"].bool()
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)
    n_img, n_vid = sum(f.shape[0] for f in img), sum(v.shape[0] for v in vid)
    assert stats["tokens_out"] == stats["llm_input_tokens"] == n_img + n_vid
    assert stats["tokens_in"] == int(((inp["input_ids"] == IMG) | (inp["input_ids"] == VID)).sum())
    assert [e["tokens_out"] for e in stats["images"]] == [f.shape[0] for f in img] + [v.shape[0] for v in vid]
    if gen is not None:   # the prompt comes back as the caller's; the new tokens are the reference's
        L = inp["input_ids"].shape[1]
        assert torch.equal(gen[:, :L], inp["input_ids"]) and torch.equal(gen[:, L:], ref_gen)


@pytest.mark.parametrize("family", ["next_video", "video_llava"])
def test_keep_is_per_frame(family):
    """Selection methods keep a share of every frame; structured ones compress every frame's grid."""
    m, sizes = make(family)
    inp = onevision_inputs(m, [[1, -2, 5]], frames=4)
    t = m.config.vision_config.image_size // m.config.vision_config.patch_size
    p = t // m.config.spatial_pool_stride if family == "next_video" else t
    pre = 1 if family == "video_llava" else 0
    for method, keep, per_frame, grid in [("random", 0.25, round(0.25 * p * p), None), ("pool", 0.25, 1, (p // 2,) * 2),
                                          ("tokenshuffle", 0.25, 1, (p // 2,) * 2)]:
        with vltok.patched(m, method, keep=keep) as h:
            m(**inp)
        (entry,) = h.stats["images"]
        count = grid[0] * grid[1] if grid else per_frame
        assert entry["grids_in"] == [[4, p, p]] and entry["grids_out"] == [[4, *(grid or (count,))]]
        assert entry["tokens_in"] == 4 * (pre + p * p) and entry["tokens_out"] == 4 * (pre + count)


@pytest.mark.parametrize("family", ["next_video", "video_llava"])
def test_batch_with_padding_equals_singles_and_single_modalities(family):
    """A padded batch of 2 gives each sample the logits it gets alone; image-only and video-only calls work."""
    m, sizes = make(family)
    inp = onevision_inputs(m, PROMPTS, sizes, frames=2, padding="left")
    keys = [k for k in ("pixel_values", "pixel_values_images", "image_sizes", "pixel_values_videos") if k in inp]
    alone = [onevision_inputs(m, [[1, -1, 7]], image_sizes=sizes[:1]), onevision_inputs(m, [[1, -2, 7]], frames=2)]
    with vltok.patched(m, "pool", keep=0.25) as h:
        batch = m(**inp).logits
        for i in range(2):
            row = inp["attention_mask"][i].bool()
            one = dict(input_ids=inp["input_ids"][i:i + 1, row], attention_mask=inp["attention_mask"][i:i + 1, row],
                       **{k: inp[k][i:i + 1] for k in keys})
            single = m(**one).logits[0]
            assert torch.allclose(batch[i, -single.shape[0]:], single, atol=1e-5)
        for x in alone:
            n_native = int(((x["input_ids"] == IMG) | (x["input_ids"] == VID)).sum())
            out = m(**x).logits
            assert h.stats["tokens_in"] == n_native and out.shape[1] == x["input_ids"].shape[1] - n_native + \
                h.stats["tokens_out"]


@pytest.mark.parametrize("family", ["next_video", "video_llava", "onevision"])
def test_keep1_exact_and_in_llm_layout(family):
    m, sizes = make(family, layers=4)
    inp = onevision_inputs(m, PROMPTS, sizes, frames=2)
    ref = m(**inp).logits
    ref_gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
    for method in ("fourier", "random", "fastv"):
        with vltok.patched(m, method, keep=1.0):
            assert torch.equal(m(**inp).logits, ref)
            assert torch.equal(m.generate(**inp, max_new_tokens=3, do_sample=False), ref_gen)
    assert torch.equal(m(**inp).logits, ref)
    # the in-LLM layout: per sample, its image's grid(s) then one grid per frame; everything else in the
    # placeholder runs (NeXT newlines, Video-LLaVA's per-frame CLS) is an extra that is never pruned
    from vltok.adapters import find_adapter

    ad = find_adapter(m).__new__(find_adapter(m))
    ad.model, ad.method = m, build_method("fastv", 0.5)
    layout = ad.visual_layout(inp)
    t = m.config.vision_config.image_size // m.config.vision_config.patch_size
    p = {"next_video": t // 2, "onevision": (t + 1) // 2}.get(family, t)   # both pool 2x
    for b, imgs in enumerate(layout):
        ids = inp["input_ids"][b]
        frames = [im for im in imgs if im.positions.numel() and int(ids[im.positions[0]]) == VID]
        assert len(frames) == 2 and all(im.grid == (p, p) and im.image == 1 for im in frames)
        assert all(bool((ids[im.positions] == VID).all()) for im in frames)
        cols = torch.cat([im.positions for im in imgs])
        assert cols.unique().numel() == cols.numel()
        n_ph = int(((ids == IMG) | (ids == VID)).sum())
        assert cols.numel() + sum(im.extra for im in imgs) == n_ph
    with vltok.patched(m, "fastv", keep=0.6) as h:
        m(**inp)
        assert h.stats["tokens_per_layer"][-1] < h.stats["tokens_per_layer"][0]
