"""LLaVA-OneVision: anyres images (incl. the anyres_max_N downscale) and videos (per-frame grids after the model's
2x pooling, trailing newline kept); explicit reference = the unpatched model fed hand-reduced features."""
import pytest
import torch

import vltok
from vltok import compat
from test_fourier import fft_reference
from tiny import IMG
from tiny_families import VID, onevision_inputs, tiny_onevision

PROMPTS = [[1, -1, 5, -2], [1, 2, 3, -1, 9, -2, 4]]
SIZES = [[80, 120], [128, 128]]
FRAMES = 3


def lowpass(x, h, w, keep):
    r_h, r_w = round(h * keep ** 0.5), round(w * keep ** 0.5)
    return fft_reference(x.double(), h, w, r_h, r_w, "resize").float(), (r_h, r_w)


def hand_reduced(m, inp, keep):
    """Unpatched features, reduced by hand: base tile and unpadded map (newline per row kept) per image; each
    pooled video frame, then the video's trailing newline."""
    t = m.config.vision_config.image_size // m.config.vision_config.patch_size
    with torch.no_grad():
        imgs = m.model.get_image_features(inp["pixel_values"], inp["image_sizes"]).pooler_output
        vids = compat.video_placeholder_features(m.model, inp["pixel_values_videos"])
    from vltok.adapters.llava_onevision import LlavaOnevisionAdapter

    ad = LlavaOnevisionAdapter.__new__(LlavaOnevisionAdapter)
    ad.model = m
    out_img = []
    for f, size in zip(imgs, inp["image_sizes"].tolist()):
        h, w = ad._unpadded(size)
        assert f.shape[0] == t * t + h * (w + 1)          # the adapter's count rule == the model's packing
        base, _ = lowpass(f[None, :t * t], t, t, keep)
        grid = f[t * t:].view(h, w + 1, -1)
        y, (r_h, r_w) = lowpass(grid[:, :w].reshape(1, h * w, -1), h, w, keep)
        y = torch.cat([y.view(r_h, r_w, -1), grid[0, -1].expand(r_h, 1, -1)], 1).reshape(-1, f.shape[-1])
        out_img.append(torch.cat([base[0], y]))
    p = (t + 1) // 2
    out_vid = []
    for v in vids:
        frames = v[:-1].view(FRAMES, p * p, -1)
        y, _ = lowpass(frames, p, p, keep)
        out_vid.append(torch.cat([y.reshape(-1, v.shape[-1]), v[-1:]]))
    return out_img, out_vid


@pytest.mark.parametrize("max_tiles", [9, 1])   # 1: the packed map is downscaled (anyres_max_1)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_images_and_videos_equal_unpatched_model_on_hand_reduced_features(max_tiles, padding):
    m = tiny_onevision(max_tiles=max_tiles)
    keep = 0.3
    inp = onevision_inputs(m, PROMPTS, SIZES, frames=FRAMES, padding=padding)
    saved = {k: v.clone() for k, v in inp.items()}
    img, vid = hand_reduced(m, inp, keep)
    red = onevision_inputs(m, PROMPTS, SIZES, frames=FRAMES, padding=padding,
                           counts=[f.shape[0] for f in img] + [v.shape[0] for v in vid])
    ids = red["input_ids"]
    with torch.no_grad():
        emb = m.get_input_embeddings()(ids).clone()
        emb[ids == IMG] = torch.cat(img)
        emb[ids == VID] = torch.cat(vid)
        ref = m(inputs_embeds=emb, attention_mask=red["attention_mask"]).logits
    with vltok.patched(m, "fourier", keep=keep) as h:
        out = m(**inp).logits
        gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
    for k in inp:
        assert torch.equal(inp[k], saved[k])
    valid = red["attention_mask"].bool()
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)
    assert h.stats["tokens_out"] == sum(f.shape[0] for f in img) + sum(v.shape[0] for v in vid)
    assert torch.equal(gen[:, :inp["input_ids"].shape[1]], inp["input_ids"])


def test_keep1_exact_and_several_images_per_sample_refused():
    m = tiny_onevision()
    inp = onevision_inputs(m, PROMPTS, SIZES, frames=FRAMES)
    ref = m(**inp).logits
    with vltok.patched(m, "pool", keep=1.0):
        assert torch.equal(m(**inp).logits, ref)
    with vltok.patched(m, "pool", keep=0.3):
        with pytest.raises(vltok.IncompatibleError, match="batch_num_images"):
            m(**inp, batch_num_images=torch.tensor([2]))
    assert torch.equal(m(**inp).logits, ref)
