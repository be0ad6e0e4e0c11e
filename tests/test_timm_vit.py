"""vltok.patch on a timm VisionTransformer (tome / crossget in every block). Needs timm, which needs torchvision:
CI runs this file in the separate .venv-vision (torch 2.14.1 + torchvision 0.29.1 + timm); in the main .venv it is
skipped with that reason."""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="timm needs torchvision: run in .venv-vision (see README)")

import vltok  # noqa: E402
from tiny import biased_attention, merge_ref  # noqa: E402
from tiny_families import tiny_open_clip  # noqa: E402
from vltok.methods.tome import spread_schedule  # noqa: E402


def tiny_vit(reg=0):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=4,
                             reg_tokens=reg, global_pool="token").eval()


def manual(m, x, merger, schedule, n_prot):
    """Explicit reference: the blocks written out, eager attention with log(size) added to the logits by hand."""
    h = m._pos_embed(m.patch_embed(x))
    h = m.norm_pre(h)
    size = pos = None
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        y = blk.norm1(h)
        B, N, C = y.shape
        q, k, v = a.qkv(y).view(B, N, 3, a.num_heads, -1).unbind(2)
        h = h + blk.ls1(a.proj(biased_attention(q, k, v, a.scale, size)))
        if schedule[i]:
            h, size, pos = merge_ref(merger, h, size, pos, k, q[:, 0], schedule[i], n_prot)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return m.forward_head(m.norm(h))


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("reg", [0, 2])
def test_timm_vit_merge_equals_reference_and_restores(method, reg):
    m = tiny_vit(reg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        with vltok.patched(m, method, keep=1.0):
            assert torch.equal(m(x), ref)
        with vltok.patched(m, method, keep=0.25) as h:
            out = m(x)
            exp = manual(m, x, h.method.vision, spread_schedule(16, 0.25, 4), 1 + reg)
        assert torch.allclose(out, exp, atol=1e-5)
        assert h.stats["tokens_out"] == 2 * 4 and h.stats["vision_tokens_per_layer"][-1] == 1 + reg + 4
        assert torch.equal(m(x), ref) and "forward" not in m.__dict__
        assert all("forward" not in b.__dict__ and not b.attn.qkv._forward_hooks for b in m.blocks)


def open_clip_manual(m, x, merger, schedule):
    """Explicit reference for an open_clip tower: blocks written out from nn.MultiheadAttention's packed weights,
    eager softmax with log(size) added to the logits by hand, CLS protected."""
    v = m.visual
    h = v._embeds(x)
    size = pos = None
    for i, blk in enumerate(v.transformer.resblocks):
        a = blk.attn
        y = blk.ln_1(h)
        B, N, C = y.shape
        H = a.num_heads
        q, k, vv = F.linear(y, a.in_proj_weight, a.in_proj_bias).view(B, N, 3, H, C // H).unbind(2)
        h = h + blk.ls_1(a.out_proj(biased_attention(q, k, vv, (C // H) ** -0.5, size)))
        if schedule[i]:
            h, size, pos = merge_ref(merger, h, size, pos, k, q[:, 0], schedule[i], 1)
        h = h + blk.ls_2(blk.mlp(blk.ln_2(h)))
    pooled, _ = v._pool(h)
    return pooled @ v.proj


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("target", ["clip", "visual"])
def test_open_clip_merge_equals_reference_and_restores(method, target):
    m = tiny_open_clip()
    x = torch.randn(2, 3, 64, 64)
    obj = m if target == "clip" else m.visual
    with torch.no_grad():
        ref = m.encode_image(x)
        with vltok.patched(obj, method, keep=1.0):
            assert torch.equal(m.encode_image(x), ref)
        with vltok.patched(obj, method, keep=0.25) as h:
            out = m.encode_image(x)
            exp = open_clip_manual(m, x, h.method.vision, spread_schedule(16, 0.25, 4))
        assert torch.allclose(out, exp, atol=1e-5), (out - exp).abs().max()
        assert not torch.allclose(out, ref, atol=1e-3)
        assert h.stats["tokens_out"] == 2 * 4 and h.stats["vision_tokens_per_layer"][-1] == 1 + 4
        assert torch.equal(m.encode_image(x), ref) and "forward" not in m.visual.__dict__
        assert all("forward" not in b.__dict__ for b in m.visual.transformer.resblocks)


def test_open_clip_without_class_token_is_refused_clearly():
    m = tiny_open_clip()
    m.visual.class_embedding = None
    with pytest.raises(vltok.IncompatibleError, match="class token"):
        vltok.patch(m, "tome", keep=0.5)
    assert vltok.get_handle(m) is None

@pytest.mark.parametrize("px,n", [(96, 36), (32, 4)])
def test_timm_dynamic_img_size_follows_the_actual_grid(px, n):
    """A ViT built for 64 px with dynamic_img_size fed another size: keep applies to the patches that arrive
    (the schedule is taken per call, not from patch_embed.num_patches), checked against the explicit reference."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=4,
                          global_pool="token", dynamic_img_size=True).eval()
    x = torch.randn(2, 3, px, px)
    with torch.no_grad(), vltok.patched(m, "tome", keep=0.5) as h:
        out = m(x)
        exp = manual(m, x, h.method.vision, spread_schedule(n, 0.5, 4), 1)
    assert torch.allclose(out, exp, atol=1e-5)
    assert h.stats["vision_tokens_per_layer"][-1] == 1 + round(0.5 * n)
    assert h.stats["images"][0]["grids_in"] == [[n]]
