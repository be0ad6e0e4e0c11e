"""Hugging Face ViT encoders used as vision towers (CLIP, SigLIP, DINOv2): where their layers are and how each
layer splits into the attention half and the MLP half for the vision-encoder stage (vltok/vision.py)."""
from __future__ import annotations

from vltok.errors import IncompatibleError
from vltok.vision import LayerSplit

PRE_NORM_LAYERS = ("CLIPEncoderLayer", "SiglipEncoderLayer")
LAYER_SCALE_LAYERS = ("Dinov2Layer", "Dinov2WithRegistersLayer")


def encoder_layers(tower) -> list:
    """The encoder layers of a CLIP / SigLIP / DINOv2 vision model, in order."""
    for path in ("vision_model.encoder.layers", "encoder.layers", "encoder.layer"):
        obj = tower
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if obj is not None:
            layers = list(obj)
            kinds = {type(layer).__name__ for layer in layers}
            if kinds <= set(PRE_NORM_LAYERS + LAYER_SCALE_LAYERS):
                return layers
            raise IncompatibleError(f"vltok's vision stage does not know the encoder layers {sorted(kinds)}; "
                                    f"supported: {', '.join(PRE_NORM_LAYERS + LAYER_SCALE_LAYERS)}")
    raise IncompatibleError(f"vltok's vision stage found no encoder layers in {type(tower).__name__}; supported "
                            "towers: CLIPVisionModel, SiglipVisionModel, Dinov2Model")


def split_layer(layer) -> LayerSplit:
    name = type(layer).__name__
    if name in PRE_NORM_LAYERS:
        attn = layer.self_attn

        def attn_half(x, bias):
            h, _ = attn(hidden_states=layer.layer_norm1(x), attention_mask=bias)
            return x + h

        def mlp_half(x):
            return x + layer.mlp(layer.layer_norm2(x))

        return LayerSplit(attn_half, mlp_half, attn.q_proj, attn.k_proj, attn.config.num_attention_heads)
    if name in LAYER_SCALE_LAYERS:
        attn = layer.attention

        def attn_half(x, bias):
            h, _ = attn(layer.norm1(x), attention_mask=bias)
            return layer.drop_path(layer.layer_scale1(h)) + x

        def mlp_half(x):
            return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x

        return LayerSplit(attn_half, mlp_half, attn.q_proj, attn.k_proj, attn.num_attention_heads)
    raise IncompatibleError(f"vltok's vision stage does not know the encoder layer {name}")

