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
from .base import apply_grid, set_instance_attr
from .llava import LlavaNextAdapter


class FrameVideos:
    """Videos as frames of one h x w grid each (LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA): ``keep`` applies per
    frame. Per frame the placeholder run holds ``frame_prefix`` tokens that are never reduced (Video-LLaVA's CLS)
    and then the grid in raster order; ``video_extra`` tokens close each video (OneVision's newline). The family
    says where the frames' grids are (``frame_grid``) and calls ``reduce_frames`` on them."""

    pixel_keys = ("pixel_values", "pixel_values_videos")
    runs_temporal = True   # temporal methods (evs, tmerge) reduce each video's frames together
    frame_prefix = 0
    video_extra = 0

    def frame_grid(self) -> tuple[int, int]:
        raise NotImplementedError

    def image_counts(self, call):
        return super().image_counts(call) if call.get("pixel_values") is not None else ([], [])

    def visual_layout(self, call):
        """In-LLM stage: the family's image grids (if any), then one grid per video frame (``video_layout``)."""
        images = super().visual_layout(call) if call.get("pixel_values") is not None else \
            [[] for _ in range(call["input_ids"].shape[0])]
        return self.video_layout(call, images)

    def video_counts(self, call) -> tuple[list[int], list[int]]:
        pv = call["pixel_values_videos"]
        (h, w), pre, extra = self.frame_grid(), self.frame_prefix, self.video_extra
        frames = pv.shape[1]
        reducer = self.method.pre_llm
        if reducer.temporal:   # a budget per video (vltok.methods.temporal), a multiple of frames
            return [frames * (pre + h * w) + extra] * pv.shape[0], \
                [frames * pre + reducer.video_count(frames, h, w) + extra] * pv.shape[0]
        count = reducer.plan(h, w).count
        return [frames * (pre + h * w) + extra] * pv.shape[0], [frames * (pre + count) + extra] * pv.shape[0]

    def placeholder_runs(self, call):
        cfg = self.model.config
        runs = []
        if call.get("pixel_values") is not None:
            runs.append((cfg.image_token_id, *self.image_counts(call)))
        if call.get("pixel_values_videos") is not None:
            self._frames = call["pixel_values_videos"].shape[1]
            runs.append((cfg.video_token_id, *self.video_counts(call), "video"))
        return runs

    def reduce_frames(self, x: torch.Tensor) -> torch.Tensor:
        """x [videos * frames, frame_prefix + h*w, D] -> each frame's grid reduced; one stats entry per video."""
        (h, w), pre, extra = self.frame_grid(), self.frame_prefix, self.video_extra
        reducer = self.method.pre_llm
        plan = reducer.plan(h, w)
        frames = getattr(self, "_frames", None) or x.shape[0]
        if x.shape[1] != pre + h * w:
            raise IncompatibleError(f"video frames have {x.shape[1]} tokens, expected {pre} + {h}x{w}; this "
                                    "checkpoint's frame layout is not supported")
        if reducer.temporal:
            return self._reduce_temporal(x, frames)
        y, plan, _ = apply_grid(reducer, x, (h, w), self.record, prefix=pre)
        for _ in range(x.shape[0] // frames):
            self.record.image(frames * x.shape[1] + extra, frames * y.shape[1] + extra, [(frames, h, w)],
                                      [(frames, *plan.grid) if plan.grid else (frames, plan.count)])
        return y

    def _reduce_temporal(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """A temporal method: each video's frames [frames, h, w, D] reduced together (vltok.methods.temporal). Each
        frame keeps its prefix tokens, followed by its surviving tokens; the result is returned as
        [videos * frames, prefix + count / frames, D] (count is a multiple of frames), which the model flattens per
        video into exactly that sequence."""
        (h, w), pre, extra = self.frame_grid(), self.frame_prefix, self.video_extra
        reducer = self.method.pre_llm
        V, D = x.shape[0] // frames, x.shape[-1]
        count = reducer.video_count(frames, h, w)
        if count == frames * h * w:
            y = x
        else:
            t0 = time.perf_counter()
            out = []
            for v in range(V):
                xv = x[v * frames:(v + 1) * frames]
                idx, rows = reducer.reduce_video(xv[:, pre:].reshape(frames, h, w, D))
                if pre:   # frame f: its prefix, then its survivors (idx ascending = time-major)
                    seq = torch.cat([xv[:, :pre].reshape(-1, D), rows])
                    key = torch.cat([torch.arange(frames, device=x.device).repeat_interleave(pre) * (h * w + 1) - 1,
                                     (idx // (h * w)) * (h * w + 1) + idx % (h * w)])
                    rows = seq.index_select(0, key.argsort(stable=True))
                out.append(rows)
            y = torch.stack(out).reshape(V * frames, pre + count // frames, D)
            self.record.seconds(time.perf_counter() - t0)
        for _ in range(V):
            self.record.image(frames * x.shape[1] + extra, frames * pre + count + extra, [(frames, h, w)],
                                      [(count,)])
        return y

    def video_layout(self, call, per_sample: list) -> list:
        """In-LLM stage: append each video's frames (one grid each; prefix and closing tokens are never pruned) to
        the per-sample lists of image grids, numbered after the sample's images."""
        from vltok.inllm import VisualImage, split_runs

        pv = call.get("pixel_values_videos")
        if pv is None:
            return per_sample
        (h, w), pre, extra, frames = self.frame_grid(), self.frame_prefix, self.video_extra, pv.shape[1]
        runs = split_runs(call["input_ids"], self.model.config.video_token_id,
                          [frames * (pre + h * w) + extra] * pv.shape[0], kind="video")
        out = []
        for imgs, row in zip(per_sample, runs):
            imgs, nxt = list(imgs), max((im.image for im in imgs), default=-1) + 1
            for j, r in enumerate(row):
                per_frame = r[:frames * (pre + h * w)].view(frames, pre + h * w)
                imgs += [VisualImage(f[pre:], (h, w), image=nxt + j, extra=pre + (extra if i == frames - 1 else 0))
                         for i, f in enumerate(per_frame)]
            out.append(sorted(imgs, key=lambda im: int(im.positions[0])))
        return out


class LlavaOnevisionAdapter(FrameVideos, LlavaNextAdapter):
    family = "llava_onevision"
    stages = ("pre_llm", "in_llm", "decode")
    video_extra = 1   # the newline closing each video
    not_applicable = {
        "vision": "vltok's LLaVA-OneVision adapter does not hook the SigLIP layers (anyres packing follows the tower)",
    }

    def _unpadded(self, image_size) -> tuple[int, int]:
        """The packed map's (rows, cols) without newlines: unpadded, then downscaled beyond anyres_max_N tiles."""
        from vltok import compat

        get_anyres_image_grid_shape, unpad_image = compat.anyres_helpers("llava_onevision")

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

    def _check_one_image_per_sample(self, call):
        bni = call.get("batch_num_images")
        if bni is not None and any(int(n) > 1 for n in bni):
            raise IncompatibleError(
                "LLaVA-OneVision samples with several images (batch_num_images > 1) skip anyres patching; vltok "
                "supports one image per sample with LLaVA-OneVision for now (pass images in separate samples)")

    def image_counts(self, call):
        self._check_one_image_per_sample(call)
        return super().image_counts(call)

    def visual_layout(self, call):
        """In-LLM stage: per image the LLaVA-NeXT grids (base tile, downscaled map without its newlines), then one
        grid per pooled video frame; newlines are extras, never pruned."""
        self._check_one_image_per_sample(call)
        return super().visual_layout(call)

    def frame_grid(self):
        return self._pooled(), self._pooled()

    def install(self, undo):
        super().install(undo)
        inner = self.model.model
        orig_pool = inner.apply_pooling

        def apply_pooling(image_features):
            return self.reduce_frames(orig_pool(image_features))   # [videos * frames, p*p, D], pooled

        set_instance_attr(inner, "apply_pooling", apply_pooling, undo)
