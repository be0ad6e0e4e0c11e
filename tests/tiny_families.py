"""Tiny random configs of the real transformers classes for the non-LLaVA families (../shared/specs/models.md §8),
and processor-like inputs for them (placeholder counts from the models' own rules)."""
from __future__ import annotations

import torch

from tiny import CLIPV, IMG, LLAMA, PINPOINTS, pad_rows
from vltok import compat

VID, VSTART, VEND = 101, 102, 103
QWEN_TEXT = dict(LLAMA, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]})
QWEN2_VISION = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=4,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
QWEN25_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=4,
                     spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                     tokens_per_second=2, in_channels=3)
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
           patch_size=8)


def deep_llava(kind="llava", layers=6, attn="sdpa", seed=0):
    """LLaVA-1.5 / LLaVA-NeXT tiny configs with a deeper LLM (in-LLM methods need room for their cut layers)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    common = dict(vision_config=CLIPV, text_config=dict(LLAMA, num_hidden_layers=layers), image_token_index=IMG,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if kind == "llava":
        m = LlavaForConditionalGeneration(LlavaConfig(image_seq_length=64, **common))
    else:
        m = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common))
    m.eval().set_attn_implementation(attn)
    return m


def tiny_qwen(version="2", attn="sdpa", seed=0, layers=2):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(seed)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if version == "2":
        cfg = Qwen2VLConfig(text_config=dict(QWEN_TEXT, model_type="qwen2_vl_text", num_hidden_layers=layers), vision_config=QWEN2_VISION, **ids)
        m = Qwen2VLForConditionalGeneration(cfg)
    else:
        cfg = Qwen2_5_VLConfig(text_config=dict(QWEN_TEXT, model_type="qwen2_5_vl_text", num_hidden_layers=layers), vision_config=QWEN25_VISION,
                               **ids)
        m = Qwen2_5_VLForConditionalGeneration(cfg)
    m.eval().set_attn_implementation(attn)
    return m


def qwen_inputs(model, prompts, image_grids=(), video_grids=(), seed=0, padding="left", reduced=None):
    """prompts: token lists with -1 for the next image and -2 for the next video (wrapped in vision start/end).

    grids are (t, h, w) in patches; ``reduced`` optionally overrides the placeholder count per item (images then
    videos) for hand-built references."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    m2 = vc.spatial_merge_size ** 2
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    counts = [t * h * w // m2 for t, h, w in list(image_grids) + list(video_grids)]
    if reduced is not None:
        counts = list(reduced)
    n_img = len(image_grids)
    rows, types, ji, jv = [], [], 0, 0
    for p in prompts:
        row, typ = [], []
        for t in p:
            if t in (-1, -2):
                j = ji if t == -1 else n_img + jv
                tok, code = (IMG, 1) if t == -1 else (VID, 2)
                ji, jv = (ji + 1, jv) if t == -1 else (ji, jv + 1)
                row += [VSTART] + [tok] * counts[j] + [VEND]
                typ += [0] + [code] * counts[j] + [0]
            else:
                row.append(t)
                typ.append(0)
        rows.append(row)
        types.append(typ)
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros(len(rows), L, dtype=torch.long)
    tt = torch.zeros(len(rows), L, dtype=torch.long)
    for i, (r, ty) in enumerate(zip(rows, types)):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[i, sl], am[i, sl], tt[i, sl] = torch.tensor(r), 1, torch.tensor(ty)
    out = dict(input_ids=ids, attention_mask=am, mm_token_type_ids=tt)
    if image_grids:
        n = sum(t * h * w for t, h, w in image_grids)
        out["pixel_values"] = torch.randn(n, patch_dim, generator=g)
        out["image_grid_thw"] = torch.tensor(image_grids)
    if video_grids:
        n = sum(t * h * w for t, h, w in video_grids)
        out["pixel_values_videos"] = torch.randn(n, patch_dim, generator=g)
        out["video_grid_thw"] = torch.tensor(video_grids)
    return out


BLIP_TEXT = dict(vocab_size=128, hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 sep_token_id=3)


def tiny_blip(kind="caption", seed=0):
    """BlipForConditionalGeneration ("caption") or BlipForQuestionAnswering ("vqa"); 4x4 patch grid + CLS."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering

    torch.manual_seed(seed)
    cfg = BlipConfig(text_config=BLIP_TEXT, vision_config=VIT, projection_dim=32, image_text_hidden_size=32)
    cls = BlipForConditionalGeneration if kind == "caption" else BlipForQuestionAnswering
    return cls(cfg).eval()


def tiny_open_clip(seed=0):
    """An open_clip CLIP (needs open_clip, which needs torchvision: the test skips without it); ViT 4x4 patches."""
    import pytest

    open_clip = pytest.importorskip("open_clip", reason="open_clip needs torchvision: run in .venv-vision (see README)")
    torch.manual_seed(seed)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(image_size=64, layers=4, width=64, patch_size=16,
                                                              head_width=16),
                                text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()


def tiny_blip2(seed=0, attn="sdpa"):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Blip2Config(vision_config=VIT,
                      qformer_config=dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
                      text_config=dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64,
                                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                       word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                      num_query_tokens=4, image_token_index=IMG)
    m = Blip2ForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def blip_inputs(model, prompts, seed=0, padding="right"):
    """Text prompts (token lists; -1 = BLIP-2's query placeholders, num_query_tokens of them) + one image each."""
    g = torch.Generator().manual_seed(seed)
    nq = getattr(model.config, "num_query_tokens", 0)
    rows = [[t2 for t in p for t2 in ([IMG] * nq if t == -1 else [t])] for p in prompts]
    ids, am = pad_rows(rows, padding)
    vc = model.config.vision_config
    pv = torch.randn(len(rows), 3, vc.image_size, vc.image_size, generator=g)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv)


SIGLIPV = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, image_size=64, patch_size=8)


def tiny_onevision(attn="sdpa", seed=0, max_tiles=9, layers=2):
    """8x8 tiles, videos pooled to 4x4 per frame; ``max_tiles`` sets anyres_max_N (1 forces the map downscale)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(vision_config=SIGLIPV, text_config=dict(LLAMA, model_type="qwen2", num_hidden_layers=layers),
                               image_token_index=IMG, video_token_index=VID, image_grid_pinpoints=PINPOINTS,
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               vision_aspect_ratio=f"anyres_max_{max_tiles}")
    m = LlavaOnevisionForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def onevision_inputs(model, prompts, image_sizes=(), frames=0, seed=0, padding="left", counts=None):
    """-1 = next image, -2 = next video of ``frames`` frames; placeholder counts from the model's own feature
    functions (what its forward checks). Anyres families (OneVision, LLaVA-NeXT-Video) take one (H, W) per image in
    ``image_sizes``; fixed-size ones (Video-LLaVA) one entry per image (its value unused)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    s = vc.image_size
    anyres = getattr(model.config, "image_grid_pinpoints", None) is not None
    if counts is None:
        with torch.no_grad():
            counts = []
            if image_sizes and anyres:
                tiles = [image_size_to_num_patches(z, model.config.image_grid_pinpoints, s) for z in image_sizes]
                pv = torch.zeros(len(image_sizes), max(tiles), 3, s, s)
                feats = model.model.get_image_features(pv, torch.tensor(image_sizes)).pooler_output
                counts += [f.shape[0] for f in feats]
            elif image_sizes:
                counts += [model.model.get_image_features(torch.zeros(1, 3, s, s)).pooler_output.shape[1]] * len(image_sizes)
            n_vid = sum(t == -2 for p in prompts for t in p)
            if n_vid:
                (f,) = compat.video_placeholder_features(model.model, torch.zeros(1, frames, 3, s, s))
                counts += [f.shape[0]] * n_vid
    n_img = len(image_sizes)
    rows, ji, jv = [], 0, 0
    for p in prompts:
        row = []
        for t in p:
            if t == -1:
                row += [IMG] * counts[ji]
                ji += 1
            elif t == -2:
                row += [VID] * counts[n_img + jv]
                jv += 1
            else:
                row.append(t)
        rows.append(row)
    ids, am = pad_rows(rows, padding)
    out = dict(input_ids=ids, attention_mask=am)
    if image_sizes and anyres:
        tiles = [image_size_to_num_patches(z, model.config.image_grid_pinpoints, s) for z in image_sizes]
        pv = torch.randn(len(image_sizes), max(tiles), 3, s, s, generator=g)
        for i, t in enumerate(tiles):
            pv[i, t:] = 0
        out["pixel_values"], out["image_sizes"] = pv, torch.tensor(image_sizes)
    elif image_sizes:   # Video-LLaVA: ``pixel_values`` (``pixel_values_images`` before transformers 5.23)
        out[compat.video_llava_image_kwarg(model)] = torch.randn(len(image_sizes), 3, s, s, generator=g)
    if jv:
        out["pixel_values_videos"] = torch.randn(jv, frames, 3, s, s, generator=g)
    return out


def tiny_next_video(attn="sdpa", seed=0, layers=2, pool="average"):
    """LLaVA-NeXT-Video: CLIP 8x8 tiles (anyres images as LLaVA-NeXT), video frames pooled to 4x4 by the resampler."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(vision_config=CLIPV, text_config=dict(LLAMA, num_hidden_layers=layers),
                               image_token_index=IMG, video_token_index=VID, image_grid_pinpoints=PINPOINTS,
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               spatial_pool_stride=2, spatial_pool_mode=pool)
    m = LlavaNextVideoForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def tiny_video_llava(attn="sdpa", seed=0, layers=2):
    """Video-LLaVA: CLIP towers with 8x8 grids; images 64 tokens, video frames 1 + 64 (CLS kept per frame)."""
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = VideoLlavaConfig(vision_config=CLIPV, text_config=dict(LLAMA, num_hidden_layers=layers),
                           image_token_index=IMG, video_token_index=VID, vision_feature_layer=-2,
                           vision_feature_select_strategy="default", image_seq_length=64, video_seq_length=4 * 65)
    m = VideoLlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m
