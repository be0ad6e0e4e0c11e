"""LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration): images as LLaVA-NeXT (anyres), plus videos.

Images: the LLaVA-NeXT pack-step reduction (base tile + unpadded map, one ``image_newline`` per output row).
Videos: every frame goes through the tower (CLS dropped, strategy "default"), then ``vision_resampler`` (the
model's own ``spatial_pool_stride`` pooling: average / max / conv) makes a (t/s) x (t/s) grid per frame, then the
projector. The reduction is a forward hook on ``vision_resampler``: each frame's pooled grid is reduced (``keep``
per frame) before the projector, so the projector also runs on fewer tokens. No token closes a video.
"""
from __future__ import annotations

from .llava import LlavaNextAdapter
from .llava_onevision import FrameVideos


class LlavaNextVideoAdapter(FrameVideos, LlavaNextAdapter):
    family = "llava_next_video"
    stages = ("pre_llm", "in_llm", "decode")
    not_applicable = {
        "vision": "vltok's LLaVA-NeXT-Video adapter does not hook the CLIP layers (anyres packing and the frame "
                  "pooling follow the tower)",
    }

    def frame_grid(self):
        """The pooled frame grid: the resampler's pooling (kernel = stride = s, no padding) floors t / s."""
        s = self.model.config.spatial_pool_stride
        return self._tile() // s, self._tile() // s

    def install(self, undo):
        super().install(undo)   # images: the LLaVA-NeXT pack wrapper
        h = self.model.model.vision_resampler.register_forward_hook(lambda mod, args, out: self.reduce_frames(out))
        undo.append(h.remove)
