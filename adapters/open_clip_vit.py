"""open_clip ``VisionTransformer`` (``model.visual`` of an open_clip ``CLIP``): the vision-encoder stage.

``vltok.patch(clip_model, "tome", keep=0.5)`` (or ``vltok.patch(clip_model.visual, ...)``): every
``ResidualAttentionBlock`` merges tokens between its attention and its MLP (ln_1 -> attn -> ls_1 residual, then
ln_2 -> mlp -> ls_2 residual); the class token is protected. open_clip's attention is ``nn.MultiheadAttention``,
which exposes no q/k projection to hook, so a merging block runs the SAME attention written out: the fused
in-projection (``in_proj_weight`` / ``in_proj_bias``) through a small projection module whose output the merger
reads (q, k of every token), SDPA with the log-size bias as its additive mask, then ``out_proj``. Blocks before the
first merge run unchanged. ``stats`` as for timm: tokens in / out per image, ``vision_tokens_per_layer``,
``flops_keep``. Supported: batch-first blocks with plain ``nn.MultiheadAttention`` (the ViT-B/L/H configs);
other layouts are refused with the reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vltok.errors import IncompatibleError, UnsupportedModelError
from vltok.vision import LayerSplit

from .base import Adapter
from .timm_vit import install_image_encoder


class _InProj(torch.nn.Module):
    """x -> the fused q|k|v projection of an ``nn.MultiheadAttention`` (its own weights, not copied)."""

    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        self.__dict__["mha"] = mha   # a plain reference: not a submodule (nothing is added to the model)

    def forward(self, x):
        return F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias)


def split_block(block) -> LayerSplit:
    attn = getattr(block, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim or not attn.batch_first \
            or hasattr(block, "ln_1_kv") or not isinstance(getattr(block, "ln_attn", torch.nn.Identity()),
                                                           torch.nn.Identity):
        raise IncompatibleError(f"vltok's open_clip adapter knows ResidualAttentionBlock with a batch-first "
                                f"nn.MultiheadAttention (packed q/k/v, no scale_attn / cross-attention); got "
                                f"{type(block).__name__} with {type(attn).__name__}")
    proj = _InProj(attn)
    H = attn.num_heads

    def attn_half(x, bias):
        B, N, C = x.shape
        q, k, v = proj(block.ln_1(x)).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        o = F.linear(o.transpose(1, 2).reshape(B, N, C), attn.out_proj.weight, attn.out_proj.bias)
        return x + block.ls_1(o)

    def mlp_half(x):
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    return LayerSplit(attn_half, mlp_half, None, proj, H, qk_fused=True)


def vision_transformer(model):
    """The open_clip VisionTransformer of a CLIP model (``.visual``) or the tower itself."""
    vit = getattr(model, "visual", model)
    if not type(vit).__module__.startswith("open_clip") or not hasattr(vit, "transformer"):
        raise UnsupportedModelError(f"{type(model).__name__} has no open_clip VisionTransformer (.visual); vltok's "
                                    "open_clip adapter merges tokens in open_clip ViT towers")
    return vit


class OpenClipVitAdapter(Adapter):
    family = "open_clip"
    stages = ("vision",)
    sites = ("vision_layers",)

    def vision_layers(self):
        return list(vision_transformer(self.model).transformer.resblocks)

    def attach(self, undo):
        vit = vision_transformer(self.model)
        self.install_extras(undo)
        if getattr(vit, "class_embedding", None) is None:
            raise IncompatibleError("this open_clip tower has no class token to protect; vltok's merge keeps CLS")
        if getattr(vit, "attn_pool", None) is not None:
            raise IncompatibleError("this open_clip tower pools with an attention pooler over every token; merged "
                                    "tokens would change its input count: not supported")
        blocks = list(vit.transformer.resblocks)
        for b in blocks:   # check every block before anything is installed: nothing half-applied
            split_block(b)
        g = vit.grid_size
        # the tower's forward is wrapped: CLIP.forward and CLIP.encode_image both call it
        install_image_encoder(self.handle, self.method, blocks, split_block, 1, g[0] * g[1], vit, undo)
