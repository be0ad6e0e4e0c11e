"""A tiny LLaVA-1.5 with the reference VLM's processor (576 placeholders, 24x24 grid): a DemoModel in seconds."""
from __future__ import annotations

import torch

from vltok import reference
from vltok.demo_core import DemoModel


def tiny_demo_model(n_layers: int = 4, seed: int = 0) -> DemoModel:
    from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration

    cache = reference.build_cache(verbose=False)
    tok = AutoTokenizer.from_pretrained(str(cache / "tokenizer"))
    processor = reference.build_processor(tok)
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=336, patch_size=14, projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        image_token_index=processor.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=576)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return DemoModel(model, processor, "cpu", "tiny-llava")
