"""Adapters: one module per model family. ``find_adapter(model)`` picks the one for a model instance."""
from __future__ import annotations

from vltok.errors import UnsupportedModelError

from .blip import Blip2Adapter, BlipAdapter
from .llava import LlavaAdapter, LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .open_clip_vit import OpenClipVitAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from .timm_vit import TimmVitAdapter
from .video_llava import VideoLlavaAdapter

SUPPORTED = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLAdapter,
    "BlipForConditionalGeneration": BlipAdapter,
    "BlipForQuestionAnswering": BlipAdapter,
    "Blip2ForConditionalGeneration": Blip2Adapter,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionAdapter,
    "LlavaNextVideoForConditionalGeneration": LlavaNextVideoAdapter,
    "VideoLlavaForConditionalGeneration": VideoLlavaAdapter,
    "VisionTransformer": TimmVitAdapter,   # timm (checked in attach); open_clip's class of that name: below
    "CLIP": OpenClipVitAdapter,            # open_clip (merges in .visual)
}
OPEN_CLIP = ("VisionTransformer", "CLIP", "CustomTextCLIP")


def find_adapter(model):
    name = type(model).__name__
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        raise UnsupportedModelError(
            f"vltok.patch takes a loaded model, not the name or path {str(model)!r}; load it first, e.g. "
            "model = AutoModelForImageTextToText.from_pretrained(...) (or the family's ...ForConditionalGeneration "
            "class), then vltok.patch(model, ...)")
    if name in OPEN_CLIP and type(model).__module__.startswith("open_clip"):
        return OpenClipVitAdapter
    # exact class names: subclasses (e.g. video variants) have other placeholder rules and are not covered
    if name in SUPPORTED:
        return SUPPORTED[name]
    raise UnsupportedModelError(
        f"vltok does not support {name} yet; supported model classes: {', '.join(SUPPORTED)}. "
        "Pass the ...ForConditionalGeneration model itself (not its inner .model or its language model)"
    )


def register_adapter(model_class_name: str, adapter_cls) -> None:
    """Make ``vltok.patch`` use ``adapter_cls`` for models of that class name (one line per new family)."""
    SUPPORTED[model_class_name] = adapter_cls
