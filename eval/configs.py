"""Full-size configs of the supported families, written from the public checkpoints' config values (no hub), and
a builder that makes the model with random weights directly on a device (for the speed benchmark).

    model = build_random("llava-1.5-7b", device="cuda", dtype=torch.bfloat16)
"""
from __future__ import annotations

import torch

CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5)
LLAMA_7B = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                bos_token_id=1, eos_token_id=2, pad_token_id=32001)
QWEN2_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                     bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False)
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


def _llava_15():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    return LlavaForConditionalGeneration, LlavaConfig(
        vision_config=CLIP_L_336, text_config=LLAMA_7B, image_token_index=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=576,
        tie_word_embeddings=False)


def _llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration, LlavaNextConfig(
        vision_config=CLIP_L_336, text_config=LLAMA_7B, image_token_index=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def _llava_next_video():
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    return LlavaNextVideoForConditionalGeneration, LlavaNextVideoConfig(
        vision_config=CLIP_L_336, text_config=LLAMA_7B, image_token_index=32001, video_token_index=32000,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False, spatial_pool_mode="average", spatial_pool_stride=2,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration, Qwen2VLConfig(
        text_config=dict(model_type="qwen2_vl_text", **QWEN2_7B_TEXT),
        vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        tie_word_embeddings=False, **QWEN_IDS)


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
        text_config=dict(model_type="qwen2_5_vl_text", **QWEN2_7B_TEXT),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, in_channels=3),
        tie_word_embeddings=False, **QWEN_IDS)


def _blip2_opt():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration, Blip2Config(
        vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                           image_size=224, patch_size=14, qkv_bias=True),
        qformer_config=dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            intermediate_size=3072, encoder_hidden_size=1408, cross_attention_frequency=2),
        text_config=dict(model_type="opt", vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                         num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                         bos_token_id=2, eos_token_id=50118, pad_token_id=1),
        num_query_tokens=32, image_token_index=50265)


MODELS = {"llava-1.5-7b": (_llava_15, "llava"), "llava-next-7b": (_llava_next, "llava_next"),
          "llava-next-video-7b": (_llava_next_video, "llava_next_video"),
          "qwen2-vl-7b": (_qwen2_vl, "qwen2_vl"), "qwen2.5-vl-7b": (_qwen2_5_vl, "qwen2_vl"),
          "blip2-opt-2.7b": (_blip2_opt, "blip2")}


def _lookup(name):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def family(name: str) -> str:
    return _lookup(name)[1]


def config(name: str):
    return _lookup(name)[0]()[1]


def build_random(name: str, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """The model with random weights, made directly on ``device`` (meta device: shapes only), in eval mode.

    Weights are drawn with a cheap N(0, 0.02) fill (norm weights 1, biases 0) on the device, instead of the slow
    per-module initialisation.
    """
    cls, cfg = _lookup(name)[0]()
    return build_random_from(cls, cfg, device, dtype, seed)


def _no_init():
    from vltok import compat

    return compat.no_init_weights()


def build_random_from(cls, cfg, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    if str(device) == "meta":
        with torch.device("meta"):
            return cls._from_config(cfg, dtype=dtype).eval()
    # parameters are allocated on the device uninitialised (buffers such as rotary tables are computed as usual)
    with torch.device(device), _no_init():
        model = cls._from_config(cfg, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in pname else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.set_attn_implementation("sdpa")
    return model.eval()
