"""Hugging Face ViT encoders used as vision towers (CLIP, SigLIP, DINOv2, BLIP / BLIP-2 ViTs): where their layers
are and how each layer splits into the attention half and the MLP half for the vision-encoder stage (vltok/vision.py)."""
from __future__ import annotations

import torch.nn.functional as F

from vltok.errors import IncompatibleError
from vltok.vision import LayerSplit

PRE_NORM_LAYERS = ("CLIPEncoderLayer", "SiglipEncoderLayer")
LAYER_SCALE_LAYERS = ("Dinov2Layer", "Dinov2WithRegistersLayer")
QKV_LAYERS = ("BlipEncoderLayer", "Blip2EncoderLayer")   # one fused qkv Linear, no mask argument


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
            if kinds <= set(PRE_NORM_LAYERS + LAYER_SCALE_LAYERS + QKV_LAYERS):
                return layers
            raise IncompatibleError(f"vltok's vision stage does not know the encoder layers {sorted(kinds)}; "
                                    f"supported: {', '.join(PRE_NORM_LAYERS + LAYER_SCALE_LAYERS + QKV_LAYERS)}")
    raise IncompatibleError(f"vltok's vision stage found no encoder layers in {type(tower).__name__}; supported "
                            "towers: CLIPVisionModel, SiglipVisionModel, Dinov2Model")


def attention_parts(attn):
    """(q, k, v, out Linear, n_heads, head_dim, scaling) of a CLIP / SigLIP / DINOv2 attention module, across
    transformers versions: 5.23 names DINOv2's projections ``q_proj`` ... ``o_proj``; 5.17 (and 4.x) nests them as
    ``attention.query/key/value`` + ``output.dense``."""
    if hasattr(attn, "q_proj"):
        n = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None) or \
            attn.config.num_attention_heads
        hd = getattr(attn, "head_dim", None) or attn.q_proj.out_features // n
        scale = getattr(attn, "scaling", None) or getattr(attn, "scale", None) or hd ** -0.5
        return attn.q_proj, attn.k_proj, attn.v_proj, getattr(attn, "o_proj", None) or attn.out_proj, n, hd, scale
    sa = getattr(attn, "attention", None)
    if sa is not None and hasattr(sa, "query"):
        n = sa.num_attention_heads
        return sa.query, sa.key, sa.value, attn.output.dense, n, sa.attention_head_size, sa.scaling
    raise IncompatibleError(f"vltok's vision stage does not know the attention module {type(attn).__name__} "
                            "(expected q_proj/k_proj/v_proj or attention.query/key/value)")


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
        q_lin, k_lin, v_lin, o_lin, n_heads, hd, scale = attention_parts(attn)

        if hasattr(attn, "q_proj"):
            def attn_half(x, bias):
                h, _ = attn(layer.norm1(x), attention_mask=bias)
                return layer.drop_path(layer.layer_scale1(h)) + x
        else:  # the older DINOv2 attention takes no mask: the same attention, written out with the size bias
            def attn_half(x, bias):
                y = layer.norm1(x)
                b, t, _ = y.shape
                q, k, v = (lin(y).view(b, t, n_heads, hd).transpose(1, 2) for lin in (q_lin, k_lin, v_lin))
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                                   scale=scale)
                h = o_lin(o.transpose(1, 2).reshape(b, t, n_heads * hd))
                return layer.drop_path(layer.layer_scale1(h)) + x

        def mlp_half(x):
            return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x

        return LayerSplit(attn_half, mlp_half, q_lin, k_lin, n_heads)
    if name in QKV_LAYERS:   # BLIP / BLIP-2: the attention takes no mask: written out with the size bias
        attn = layer.self_attn
        H = attn.num_heads

        def attn_half(x, bias):
            b, t, c = x.shape
            q, k, v = attn.qkv(layer.layer_norm1(x)).view(b, t, 3, H, c // H).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                               scale=attn.scale)
            return x + attn.projection(o.transpose(1, 2).reshape(b, t, c))

        def mlp_half(x):
            return x + layer.mlp(layer.layer_norm2(x))

        return LayerSplit(attn_half, mlp_half, None, attn.qkv, H, qk_fused=True)
    raise IncompatibleError(f"vltok's vision stage does not know the encoder layer {name}")

