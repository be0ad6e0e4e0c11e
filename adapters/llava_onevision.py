"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): images (anyres) and videos.

Images are packed like LLaVA-NeXT (base tile + unpadded map with one ``image_newline`` per row), except that a map
larger than ``anyres_max_N`` tiles is bilinearly downscaled first; the LLaVA-NeXT adapter's pack-step reduction is
reused with that rule in ``_unpadded``. Videos: every frame goes through the tower, then ``apply_pooling`` (2x
bilinear) makes a ceil(t/2) x ceil(t/2) grid per frame, and one newline closes the video. The reduction wraps
``apply_pooling`` and reduces each frame's pooled grid (``keep`` per frame); the trailing newline stays.
"""
from __future__ import annotations

import math
import time

import torch

from vltok.errors import IncompatibleError
from vltok.stages import selected_indices

from .base import set_instance_attr
from .llava import LlavaNextAdapter


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    stages = ("pre_llm",)
    pixel_keys = ("pixel_values", "pixel_values_videos")
    not_applicable = {
        "vision": "vltok's LLaVA-OneVision adapter does not hook the SigLIP layers (anyres packing follows the tower)",
        "in_llm": "the in-LLM engine's OneVision layout (image grids + per-frame video grids) is not wired yet",
        "decode": "the in-LLM engine's OneVision layout (image grids + per-frame video grids) is not wired yet",
    }

    def _unpadded(self, image_size) -> tuple[int, int]:
        """The packed map's (rows, cols) without newlines: unpadded, then downscaled beyond anyres_max_N tiles."""
        from transformers.models.llava_onevision.modeling_llava_onevision import (get_anyres_image_grid_shape,
                                                                                  unpad_image)

        cfg = self.model.config
        t = self._tile()
        nph, npw = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        _, h, w = unpad_image(torch.empty(1, nph * t, npw * t), image_size).shape
        max_tiles = int(getattr(cfg, "vision_aspect_ratio", "anyres_max_9").strip("anyres_max_"))
        ratio = math.sqrt(h * w / (max_tiles * t * t))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
        return int(h), int(w)

    def _pooled(self) -> int:
        return math.ceil(self._tile() / 2)

    def image_counts(self, call):
        if call.get("pixel_values") is None:
            return [], []
        bni = call.get("batch_num_images")
        if bni is not None and any(int(n) > 1 for n in bni):
            raise IncompatibleError(
                "LLaVA-OneVision samples with several images (batch_num_images > 1) skip anyres patching; vltok "
                "supports one image per sample with LLaVA-OneVision for now (pass images in separate samples)")
        return super().image_counts(call)

    def video_counts(self, call) -> tuple[list[int], list[int]]:
        pv = call["pixel_values_videos"]
        frames, p = pv.shape[1], self._pooled()
        count = self.method.pre_llm.plan(p, p).count
        return [frames * p * p + 1] * pv.shape[0], [frames * count + 1] * pv.shape[0]

    def placeholder_runs(self, call):
        cfg = self.model.config
        runs = []
        if call.get("pixel_values") is not None:
            runs.append((cfg.image_token_id, *self.image_counts(call)))
        if call.get("pixel_values_videos") is not None:
            self._frames = call["pixel_values_videos"].shape[1]
            runs.append((cfg.video_token_id, *self.video_counts(call)))
        return runs

    def install(self, undo):
        super().install(undo)
        inner = self.model.model
        orig_pool = inner.apply_pooling
        reducer = self.method.pre_llm

        def apply_pooling(image_features):
            x = orig_pool(image_features)                       # [videos * frames, p*p, D]
            p = self._pooled()
            plan = reducer.plan(p, p)
            frames = getattr(self, "_frames", None) or x.shape[0]
            if plan.identity:
                y = x
            else:
                t0 = time.perf_counter()
                if plan.grid is not None:
                    y = reducer.reduce(x, plan)
                else:
                    idx = selected_indices(reducer, x, plan)
                    y = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]).to(x.device))
                self.handle._add_seconds(time.perf_counter() - t0)
            for _ in range(x.shape[0] // frames):
                self.handle._record_image(frames * p * p + 1, frames * y.shape[1] + 1, [(frames, p, p)],
                                          [(frames, *plan.grid) if plan.grid else (frames, plan.count)])
            return y

        set_instance_attr(inner, "apply_pooling", apply_pooling, undo)
