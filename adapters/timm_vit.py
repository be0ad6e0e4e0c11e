"""timm ``VisionTransformer`` (ViT, DeiT, DINOv2 in timm, ...): the vision-encoder stage on a plain image model.

``vltok.patch(timm_vit, "tome", keep=0.5)``: every block merges tokens between its attention and its MLP
(``Block``: norm1 -> attn -> ls1 -> drop_path1 residual, then norm2 -> mlp -> ls2 -> drop_path2 residual). The
schedule spreads round(keep * N_patches) over all blocks; the ``num_prefix_tokens`` (CLS, registers) are protected.
Keys (and the CLS query) come from a forward hook on the fused ``attn.qkv``; proportional attention passes the
log-size bias as timm's ``attn_mask`` (added to the logits by SDPA and by the manual path alike).
``stats``: per image tokens in (patches) and out; ``vision_tokens_per_layer``; ``flops_keep`` = the mean share of
tokens entering each block (the attention/MLP cost share, ignoring the quadratic term).
"""
from __future__ import annotations

import time

from vltok.errors import IncompatibleError, UnsupportedModelError
from vltok.vision import LayerSplit, install_vision

from .base import Adapter, set_instance_attr


def split_block(block) -> LayerSplit:
    if type(block).__name__ != "Block" or not hasattr(block.attn, "qkv"):
        raise IncompatibleError(f"vltok's timm adapter knows timm's Block with a fused qkv attention; got "
                                f"{type(block).__name__}")
    attn = block.attn

    def attn_half(x, bias):
        return x + block.drop_path1(block.ls1(attn(block.norm1(x), attn_mask=bias)))

    def mlp_half(x):
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    return LayerSplit(attn_half, mlp_half, None, attn.qkv, attn.num_heads, qk_fused=True)


def install_image_encoder(handle, method, blocks: list, split, n_prefix: int, n_patches: int, owner, undo: list,
                          attn_impl=None) -> None:
    """The vision stage on an image encoder alone (timm, open_clip): merges in ``blocks``, stats per image (patch
    tokens in / out, ``vision_tokens_per_layer``, ``flops_keep``), and ``owner.forward`` wrapped to start each
    call's stats and time it (``wall_seconds``). The schedule is taken per call from the patches that reach the
    first block (a model built with ``dynamic_img_size`` may get another size than ``n_patches``, its nominal count)."""
    schedule = lambda n: method.vision.schedule(n, len(blocks))  # noqa: E731

    def on_done(run):
        counts = run.counts
        B = run.size.shape[0] if run.size is not None else 0
        for _ in range(B):
            handle.recorder.image(counts[0] - n_prefix, counts[-1] - n_prefix, [(counts[0] - n_prefix,)],
                                  [(counts[-1] - n_prefix,)])
        s = handle.recorder.stats
        s["vision_tokens_per_layer"] = list(counts)
        s["flops_keep"] = sum(counts[:-1]) / (len(blocks) * counts[0])
        handle.recorder.seconds(run.seconds)

    install_vision(blocks, split, method.vision, schedule, n_prefix, undo, attn_impl, on_done, nominal=n_patches)
    if not any(schedule(n_patches)):
        return
    fwd = owner.forward

    def forward(*args, **kwargs):
        handle.recorder.start_call()
        t0 = time.perf_counter()
        out = fwd(*args, **kwargs)
        handle.recorder.stats["wall_seconds"] = time.perf_counter() - t0
        return out

    set_instance_attr(owner, "forward", forward, undo)


class TimmVitAdapter(Adapter):
    family = "timm_vit"
    stages = ("vision",)
    sites = ("vision_layers",)

    def vision_layers(self):
        return list(self.model.blocks)

    def attach(self, undo):
        model = self.model
        if not type(model).__module__.startswith("timm."):
            raise UnsupportedModelError(f"{type(model).__module__}.{type(model).__name__} is not a timm "
                                        "VisionTransformer; vltok's vision stage supports timm ViTs and HF LLaVA towers")
        self.install_extras(undo)
        blocks = list(model.blocks)
        attn_impl = None if getattr(blocks[0].attn, "fused_attn", True) else "eager"
        n_prefix = int(getattr(model, "num_prefix_tokens", 1))
        install_image_encoder(self.handle, self.method, blocks, split_block, n_prefix, model.patch_embed.num_patches,
                              model, undo, attn_impl)
