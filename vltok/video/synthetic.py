"""Synthetic assets for tests and offline benchmarks (no hub): moving-shapes video files written with PyAV, and a
small word-level tokenizer wrapped in each video family's own transformers processor.

    write_video("clip.mp4", codec="libx264", frames=50, fps=25)          # H.264; "libvpx-vp9", "libvpx", "mpeg4"
    processor = make_processor(model)                                     # the family's real processor classes
"""
from __future__ import annotations

import fractions

import numpy as np

# ids of the tiny test configs (tests/tiny.py, tests/tiny_families.py): pad 0, bos 1, eos 2, image 100, video 101,
# Qwen's vision start / end 102 / 103
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
WORDS = ("a an the is are what which where when how many color colour shape moving video frame frames red green "
         "blue yellow white black square circle disc bar left right up down top bottom describe this in detail "
         "answer question caption object objects count one two three four five six seven eight nine ten yes no "
         "and of to on with at it there does do first last time seconds second move moves toward away from "
         "small large big tall wide long short fast slow user assistant system you : ? . , ! USER ASSISTANT").split()


def shapes_frame(i: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Frame ``i`` of the moving-shapes clip (uint8 RGB): a red square moving diagonally, a green bar moving the
    other way, and a white counter bar whose length is the frame number (so every frame differs)."""
    img = np.empty((height, width, 3), np.uint8)
    img[:] = (20, 30, 40)
    x = (i * 3) % max(width - 16, 1)
    y = (i * 2) % max(height - 16, 1)
    img[y:y + 16, x:x + 16] = (230, 40, 40)
    cx = width - 1 - x
    img[height // 2 - 6:height // 2 + 6, max(cx - 12, 0):max(cx, 1)] = (40, 200, 90)
    img[0:4, 0:min(i + 1, width)] = 255
    return img


def write_video(path, codec: str = "libx264", frames: int = 50, fps: int = 25, height: int = 64, width: int = 96,
                durations_ms=None) -> str:
    """Encode the moving-shapes clip with PyAV. ``durations_ms`` (one per frame) makes a variable-frame-rate file
    (millisecond time base)."""
    import av

    c = av.open(str(path), "w")
    try:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        if durations_ms is not None:
            s.codec_context.time_base = fractions.Fraction(1, 1000)
        t = 0
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(shapes_frame(i, height, width), format="rgb24")
            if durations_ms is not None:
                f.pts, f.time_base = t, fractions.Fraction(1, 1000)
                t += int(durations_ms[i])
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    finally:
        c.close()
    return str(path)


def make_tokenizer(ids: dict[str, int], vocab_size: int = 128):
    """A word-level fast tokenizer whose special tokens have the given ids (e.g. {"<video>": 101}); the other ids
    are filled with WORDS. Splits on whitespace and punctuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL)
    vocab.update(ids)
    used = set(vocab.values())
    free = (i for i in range(vocab_size) if i not in used)
    for w in WORDS:
        if w in vocab:
            continue
        try:
            vocab[w] = next(free)
        except StopIteration:
            break
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=sorted(ids, key=ids.get))
    fast.padding_side = "left"
    return fast


def make_processor(model):
    """The family's own processor classes around :func:`make_tokenizer`, sized for ``model``'s config (any size:
    the tiny test configs or the full-size ones of eval/configs.py)."""
    cfg = model.config
    name = type(model).__name__
    vid = _cfg_id(cfg, "video_token_id", "video_token_index")
    img = _cfg_id(cfg, "image_token_id", "image_token_index")
    vocab = cfg.get_text_config().vocab_size
    if name.startswith("Qwen2"):
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        ids = {"<|image_pad|>": img, "<|video_pad|>": vid, "<|vision_start|>": cfg.vision_start_token_id,
               "<|vision_end|>": cfg.vision_end_token_id}
        vc = cfg.vision_config
        f = vc.patch_size * vc.spatial_merge_size
        kw = dict(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size)
        small = f * f * 4 < 28 * 28 * 4   # tiny configs: keep frames small
        size = {"shortest_edge": f * f * 4, "longest_edge": f * f * 64} if small else None
        tok = make_tokenizer(ids, min(vocab, 1 << 20) if small else 256)
        if name.startswith("Qwen2_5"):
            from transformers import Qwen2_5_VLProcessor as P
        else:
            P = Qwen2VLProcessor
        ip = Qwen2VLImageProcessor(**kw, **({"size": size} if size else {}))
        vp = Qwen2VLVideoProcessor(**kw, **({"size": size} if size else {}))
        return P(image_processor=ip, tokenizer=tok, video_processor=vp)
    vc = cfg.vision_config
    s, p = vc.image_size, vc.patch_size
    tok = make_tokenizer({"<image>": img, "<video>": vid}, min(vocab, 256))
    if name == "LlavaOnevisionForConditionalGeneration":
        from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

        ip = LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=cfg.image_grid_pinpoints)
        vp = LlavaOnevisionVideoProcessor(size={"height": s, "width": s})
        return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                       num_image_tokens=(s // p) ** 2,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                       vision_aspect_ratio=cfg.vision_aspect_ratio)
    if name == "LlavaNextVideoForConditionalGeneration":
        from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

        ip = LlavaNextImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                     image_grid_pinpoints=cfg.image_grid_pinpoints)
        vp = LlavaNextVideoVideoProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        return LlavaNextVideoProcessor(video_processor=vp, image_processor=ip, tokenizer=tok, patch_size=p,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                       num_additional_image_tokens=1)
    if name == "VideoLlavaForConditionalGeneration":
        from transformers import VideoLlavaImageProcessor, VideoLlavaProcessor, VideoLlavaVideoProcessor

        ip = VideoLlavaImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        vp = VideoLlavaVideoProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        return VideoLlavaProcessor(image_processor=ip, video_processor=vp, tokenizer=tok, patch_size=p,
                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                   num_additional_image_tokens=1)
    raise ValueError(f"no synthetic processor for {name}")


def _cfg_id(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return int(v)
    raise ValueError(f"config has none of {names}")
