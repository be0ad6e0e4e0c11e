"""``resize``: fewer visual tokens by asking the processor for a smaller image (the input side, not a model patch).

    proc = vltok.resize_processor(processor, keep=0.16, model=model)   # model: optional, checks the tower
    inputs = proc(images=img, text=prompt, return_tensors="pt")          # ~16 % of the native visual tokens
    out = model.generate(**inputs)                                      # the unpatched model: IDEAL speed
    proc.stats                                                          # per image: native / resized tokens, sizes

The model is not patched: the vision tower and the LLM both run on the smaller input, so this is the IDEAL row of
the speed tables by construction (plain downsampling is a strong baseline in recent benchmarks). It differs from the
grid methods (``pool``, ``fourier``) in that the vision tower sees a lower-resolution image instead of reducing its
output. Per family:

* Qwen2-VL / Qwen2.5-VL (images and videos): each image's pixel budget is ``keep`` times the pixels the processor
  would give it (its own ``smart_resize`` rule: sides in multiples of patch x merge size, within its min / max
  pixels); the image is resized to that size before the processor runs, so the processor keeps it and counts the
  placeholders itself. Videos: every frame of a video gets the same budget (``keep`` per frame).
* LLaVA-1.5-style processors (a square crop of ``S`` pixels, patch ``p``): the crop becomes
  ``S' = round(S·sqrt(keep)/p)·p`` (at least one patch), so the grid is ``(S'/p)^2``. This needs a vision tower that
  accepts another resolution: DINOv2 (vltok's reference VLM) interpolates its position embeddings itself; CLIP and
  SigLIP towers keep fixed position embeddings, and ``model=`` such a model is refused (use ``pool`` / ``fourier``,
  which reduce after the tower).
* Other processors (LLaVA-NeXT / OneVision anyres tiling, BLIP) are refused with the reason: their token count is
  set by the tiling grid, not by one pixel budget.

``keep=1.0`` returns the processor's own output unchanged (the wrapper calls the processor with the caller's
arguments untouched).
"""
from __future__ import annotations

import math

from .errors import IncompatibleError, InvalidKeepError, VltokError

# vision towers whose position embeddings follow the input size (the model interpolates them itself)
FLEXIBLE_TOWERS = ("dinov2",)


def _qwen_smart_resize():
    from . import compat

    return compat.qwen_smart_resize()


def _kind(processor) -> str:
    ip = getattr(processor, "image_processor", processor)
    name = type(ip).__name__
    if "Qwen2VL" in name or (hasattr(ip, "merge_size") and hasattr(ip, "temporal_patch_size")):
        return "qwen"
    if hasattr(ip, "image_grid_pinpoints") or "LlavaNext" in name or "LlavaOnevision" in name:
        return "anyres"
    if getattr(ip, "crop_size", None) and getattr(processor, "patch_size", None):
        return "llava"
    return "other"


def _check_keep(keep) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise InvalidKeepError(f"resize: keep must be a number in (0, 1], got {keep!r}")
    return float(keep)


class ResizedProcessor:
    """Wraps a processor; ``__call__`` takes the processor's own arguments and returns its output on smaller
    images. Every other attribute (tokenizer, chat template, decode) is the wrapped processor's."""

    def __init__(self, processor, keep: float, model=None):
        self.processor = processor
        self.keep = _check_keep(keep)
        self.kind = _kind(processor)
        self.stats: dict = {}
        if self.kind in ("anyres", "other"):
            raise IncompatibleError(
                f"resize: {type(processor).__name__} sets its visual token count by "
                f"{'an anyres tiling grid' if self.kind == 'anyres' else 'its own fixed layout'}, not one pixel "
                "budget; use a grid method (vltok.patch(model, 'pool' | 'fourier', keep=...)) instead")
        if self.kind == "llava" and model is not None:
            vc = getattr(model.config, "vision_config", None)
            mt = getattr(vc, "model_type", "")
            if mt not in FLEXIBLE_TOWERS:
                raise IncompatibleError(
                    f"resize: the vision tower ({mt or type(vc).__name__}) has fixed position embeddings and would "
                    "refuse a smaller image; use vltok.patch(model, 'pool' | 'fourier', keep=...) instead, which "
                    "reduces after the tower")

    def __getattr__(self, name):
        return getattr(self.processor, name)

    # -- sizes ------------------------------------------------------------------------------------------------
    @staticmethod
    def _bounds(ip) -> tuple[int, int, int]:
        """(factor, min pixels, max pixels) of a Qwen image / video processor."""
        size = getattr(ip, "size", None) or {}
        get = size.get if hasattr(size, "get") else (lambda k, d=None: getattr(size, k, d))
        lo = get("shortest_edge", None) or getattr(ip, "min_pixels", None) or 56 * 56
        hi = get("longest_edge", None) or getattr(ip, "max_pixels", None) or 28 * 28 * 1280
        return ip.patch_size * ip.merge_size, lo, hi

    def qwen_sizes(self, height: int, width: int, ip) -> tuple[tuple[int, int], tuple[int, int]]:
        """((h0, w0) the processor's own size for an image / frame of ``height`` x ``width``, (h, w) the resized
        size): each side scaled by sqrt(keep) and rounded to the processor's factor (at least one unit), so the
        token count is the closest to keep x native that the factor allows."""
        smart_resize = _qwen_smart_resize()
        f, lo, hi = self._bounds(ip)
        h0, w0 = smart_resize(height, width, factor=f, min_pixels=lo, max_pixels=hi)
        s = math.sqrt(self.keep)
        return (h0, w0), (max(f, round(h0 * s / f) * f), max(f, round(w0 * s / f) * f))

    def llava_side(self) -> int:
        side = _side(self.processor.image_processor.crop_size)
        p = self.processor.patch_size
        return max(p, round(side * math.sqrt(self.keep) / p) * p)

    # -- the call ---------------------------------------------------------------------------------------------
    def __call__(self, *args, images=None, videos=None, **kwargs):
        if self.keep >= 1.0:
            return self.processor(*args, images=images, videos=videos, **kwargs) if videos is not None \
                else self.processor(*args, images=images, **kwargs)
        if self.kind == "llava":
            if videos is not None:
                raise VltokError("resize: this processor takes no videos")
            side = self.llava_side()
            full = _side(self.processor.image_processor.crop_size)
            p = self.processor.patch_size
            kwargs = dict(kwargs, size={"shortest_edge": side}, crop_size={"height": side, "width": side})
            out = self.processor(*args, images=images, **kwargs)
            self.stats = {"grid_in": (full // p, full // p), "grid_out": (side // p, side // p),
                          "keep_achieved": (side // p) ** 2 / (full // p) ** 2}
            return out
        ip = self.processor.image_processor
        vp = getattr(self.processor, "video_processor", None) or ip
        items = []
        if images is not None:
            images, sizes = self._resize_all(images, ip, video=False)
            items += [("image", *sz) for sz in sizes]
            f, _, hi = self._bounds(ip)
            lo = min(h * w for _, (h, w) in sizes)   # the processor must not scale them back up to its minimum
            kwargs["images_kwargs"] = dict(kwargs.get("images_kwargs") or {},
                                           size={"shortest_edge": min(lo, self._bounds(ip)[1]), "longest_edge": hi})
        if videos is not None:
            videos, sizes = self._resize_all(videos, vp, video=True)
            items += [("video", *sz) for sz in sizes]
            f, _, hi = self._bounds(vp)
            lo = min(h * w for _, (h, w) in sizes)
            kwargs["videos_kwargs"] = dict(kwargs.get("videos_kwargs") or {},
                                           size={"shortest_edge": min(lo, self._bounds(vp)[1]), "longest_edge": hi})
        out = self.processor(*args, images=images, videos=videos, **kwargs) if videos is not None else \
            self.processor(*args, images=images, **kwargs)
        # tokens out from the processor's own grids (the truth); tokens in from the native sizes, per temporal slice
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if out.get(key) is not None
                 for g in out[key].tolist()]
        rows = []
        for (kind, s0, s1), (t, gh, gw) in zip(items, grids):
            m2 = (ip.merge_size if kind == "image" else vp.merge_size) ** 2
            f = (ip if kind == "image" else vp).patch_size
            rows.append({"kind": kind, "size_in": s0, "size_out": s1, "tokens_in": t * (s0[0] // f) * (s0[1] // f) // m2,
                         "tokens_out": t * gh * gw // m2})
        n0, n1 = sum(r["tokens_in"] for r in rows), sum(r["tokens_out"] for r in rows)
        self.stats = {"items": rows, "keep_achieved": n1 / n0 if n0 else 1.0}
        return out

    def _resize_all(self, items, ip, video: bool):
        """Resize every image (or every frame of every video) to its budget; -> (same structure, [(native, new)])."""
        import numpy as np
        from PIL import Image

        def one(im):
            return im if isinstance(im, Image.Image) else _to_pil(im)

        if video:
            single = not isinstance(items, (list, tuple)) or (len(items) > 0 and not _is_frames(items[0]))
            vids = [items] if single else list(items)
            out, sizes = [], []
            for v in vids:
                frames = [one(f) for f in v]
                s0, (h, w) = self.qwen_sizes(frames[0].height, frames[0].width, ip)
                out.append(np.stack([np.asarray(f.resize((w, h), Image.BICUBIC)) for f in frames]))
                sizes.append((s0, (h, w)))
            return (out[0] if single else out), sizes
        single = not isinstance(items, (list, tuple))
        ims = [one(im) for im in ([items] if single else items)]
        out, sizes = [], []
        for im in ims:
            s0, (h, w) = self.qwen_sizes(im.height, im.width, ip)
            out.append(im.resize((w, h), Image.BICUBIC))
            sizes.append((s0, (h, w)))
        return (out[0] if single else out), sizes


def _side(crop) -> int:
    """The height of a crop size given as a dict, a transformers SizeDict or an int."""
    if isinstance(crop, dict):
        return int(crop["height"])
    return int(getattr(crop, "height", None) or crop)


def _is_frames(x) -> bool:
    """True for one video given as a sequence of frames (a list of images / arrays, or a [T, H, W, C] array)."""
    from PIL import Image

    if isinstance(x, Image.Image):
        return False
    if isinstance(x, (list, tuple)):
        return True
    return getattr(x, "ndim", 0) == 4


def _to_pil(x):
    import numpy as np
    from PIL import Image

    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(a * (255 if a.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)


def resize_processor(processor, keep: float, model=None) -> ResizedProcessor:
    """The processor, asking for ``keep`` of the native visual tokens by resizing the input (module docstring)."""
    return ResizedProcessor(processor, keep, model)
