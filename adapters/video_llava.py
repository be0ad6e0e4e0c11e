"""Video-LLaVA (VideoLlavaForConditionalGeneration): separate image and video towers, one shared projector.

Images: ``image_tower``, CLS dropped by strategy "default" -> an h x w grid per image, reduced before the projector
as in LLaVA-1.5 (the same projector pre-hook). Videos: ``video_tower`` on every frame (8 for the released
checkpoint); ``get_video_features`` ignores the select strategy, so each frame keeps its CLS: frames x (1 + h*w)
placeholders (8 x 257 = 2056). The projector pre-hook knows which tower fed it (``get_video_features`` is wrapped
on the instance) and reduces each frame's grid, CLS kept (``keep`` per frame).
"""
from __future__ import annotations

import functools

from vltok import compat

from .base import PlaceholderAdapter, set_instance_attr
from .llava import LlavaAdapter, _n_special_tokens
from .llava_onevision import FrameVideos


class VideoLlavaAdapter(FrameVideos, LlavaAdapter):
    family = "video_llava"
    stages = ("pre_llm", "in_llm", "decode")
    # the projector also reads video frames that keep their CLS, so no method projector / fusion runs there
    sites = ("llm", "decoder_layers", "placeholder_runs")
    side_inputs = ()   # (LLaVA-1.5's cls_attention / text_embeds are not wired through the frame path)
    original_positions = False
    gives_saliency = False
    not_applicable = {
        "vision": "vltok's Video-LLaVA adapter does not hook the layers of its two CLIP towers (not wired yet)",
    }
    install_saliency = PlaceholderAdapter.install_saliency   # two towers: no single CLS-attention score is wired

    @property
    def frame_prefix(self) -> int:
        """Tokens before each frame's grid: the video path keeps every special token of the tower (CLS)."""
        return _n_special_tokens(self.model.config.vision_config)

    def frame_grid(self):
        t = self.model.config.vision_config.image_size // self._patch()
        return t, t

    def _reduce_images(self, x, prefix):
        if self._kind == "video":
            return self.reduce_frames(x)
        return super()._reduce_images(x, prefix)

    # transformers 5.17 takes Video-LLaVA's images as ``pixel_values_images`` (5.23: ``pixel_values``): the call is
    # read under ``pixel_values`` and handed back to the model under the installed version's name
    pixel_keys = ("pixel_values", "pixel_values_images", "pixel_values_videos")

    def _image_key(self, call) -> str | None:
        """The installed version's image keyword when it is not ``pixel_values`` and the call has images by it."""
        key = compat.video_llava_image_kwarg(self.model)
        return key if key != "pixel_values" and call.get(key) is not None else None

    def prepare(self, call, default_side, t0=None):
        key = self._image_key(call)
        if key is None:
            return super().prepare(call, default_side, t0)
        call = dict(call)
        call["pixel_values"] = call.pop(key)
        call, rw = super().prepare(call, default_side, t0)
        call[key] = call.pop("pixel_values")
        return call, rw

    def visual_layout(self, call):
        key = self._image_key(call)
        if key is not None:
            call = {**call, "pixel_values": call[key]}
        return super().visual_layout(call)

    def install(self, undo):
        inner = self.model.model
        orig = inner.get_video_features
        self._kind = "image"

        @functools.wraps(orig)   # generate() pre-encodes through this, picking arguments by the signature's names
        def get_video_features(*args, **kwargs):
            self._kind = "video"
            try:
                return orig(*args, **kwargs)
            finally:
                self._kind = "image"

        set_instance_attr(inner, "get_video_features", get_video_features, undo)
        super().install(undo)   # the projector pre-hook (self._reduce_images per call)
