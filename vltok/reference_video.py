"""The video reference VLM ``vltok-ref-video``: the image reference's parts in a stock
``LlavaNextVideoForConditionalGeneration``.

    model, processor = vltok.reference.load("vltok-ref-video")

Why LLaVA-NeXT-Video (and not LLaVA-OneVision): its video path drops the tower's CLS (strategy "default", as the
image reference does), average-pools each frame's 24 x 24 DINOv2 grid 2 x 2 *before* the projector (12 x 12 = 144
tokens per frame: the projector trained on the image reference sees 2 x 2 means of the very features it was trained
on, so it transfers as is) and lays frames out as plain consecutive grids. OneVision pools *after* the projector
with bilinear interpolation, appends a learned newline that would start untrained, and its anyres image path
(anyres_max_9, SigLIP-style "full" strategy) differs from the image reference's.

Built from the image reference (:func:`vltok.reference.load`: DINOv2-S/14 + SmolLM2-135M with its trained delta
merged): the DINOv2 position table is resampled once to the 24 x 24 grid of 336 px frames (the same bicubic
resampling DINOv2 does at run time, so the tower's output is unchanged) so that ``vision_config.image_size`` = 336
states the real frame grid; a ``<video>`` token is added to the tokenizer (its embedding row: the mean, never read:
features replace it). The trained video delta (``assets/vltok-ref-video-delta.safetensors``: projector + LoRA on
the LM, written by ``python -m vltok.train_reference_video``) is merged at load.

Frames: the model takes ``NUM_FRAMES`` (16) frames sampled uniformly from a clip (:func:`frames_to_pixels` resizes
with PIL bicubic to 336 px and normalises with ImageNet mean / std; :func:`video_prompt` / :func:`encode` build the
chat prompt and its ids with frames x 144 ``<video>`` tokens, exactly what the returned processor produces).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from . import reference as R

NAME = "vltok-ref-video"
DELTA_NAME = "vltok-ref-video-delta.safetensors"
VIDEO_TOKEN = "<video>"
NUM_FRAMES = 16
POOL = 2
FRAME_GRID = R.GRID // POOL          # 12
FRAME_TOKENS = FRAME_GRID ** 2       # 144

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class UntrainedVideoReference(RuntimeError):
    """The trained video delta is missing (the message names the command that trains it)."""


def default_delta_path() -> Path | None:
    """``$VLTOK_REF_VIDEO_DELTA``, else the committed delta in ``assets/``."""
    return R.asset_path("VLTOK_REF_VIDEO_DELTA", DELTA_NAME)


def video_prompt(question: str) -> str:
    return f"<|im_start|>user\n{VIDEO_TOKEN}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def encode(tokenizer, question: str, n_frames: int, answer: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids with the <video> placeholder expanded to n_frames x 144, labels: -100 except on ``answer`` +
    <|im_end|>) -- what the processor gives for :func:`video_prompt` (test_video_reference checks it)."""
    vid = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    ids = tokenizer(video_prompt(question), add_special_tokens=False)["input_ids"]
    j = ids.index(vid)
    ids = ids[:j] + [vid] * (n_frames * FRAME_TOKENS) + ids[j + 1:]
    labels = [-100] * len(ids)
    if answer is not None:
        ans = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids, labels = ids + ans, labels + ans
    return ids, labels


def frames_to_pixels(frames) -> torch.Tensor:
    """PIL frames -> [T, 3, 336, 336] float32 (PIL bicubic resize of the shortest edge + centre crop, /255,
    ImageNet normalisation), as LlavaNextImageProcessorPil / the image reference's processor do."""
    import numpy as np
    from PIL import Image

    out = []
    mean = np.array(R.IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(R.IMAGENET_STD, dtype=np.float32)[:, None, None]
    for im in frames:
        im = im.convert("RGB")
        w, h = im.size
        if (w, h) != (R.IMAGE_SIZE, R.IMAGE_SIZE):
            s = R.IMAGE_SIZE / min(w, h)
            im = im.resize((max(R.IMAGE_SIZE, round(w * s)), max(R.IMAGE_SIZE, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - R.IMAGE_SIZE) // 2, (h - R.IMAGE_SIZE) // 2
            im = im.crop((left, top, left + R.IMAGE_SIZE, top + R.IMAGE_SIZE))
        a = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out.append(torch.from_numpy((a - mean) / std))
    return torch.stack(out)


def build_config(text_cfg: dict, image_token_id: int, video_token_id: int, vision_feature_layer: int):
    from transformers import LlamaConfig, LlavaNextVideoConfig

    tc = dict(text_cfg)
    tc.pop("model_type", None)
    vc = R.dinov2_config()
    vc.image_size = R.IMAGE_SIZE
    return LlavaNextVideoConfig(
        vision_config=vc, text_config=LlamaConfig(**tc), image_token_index=image_token_id,
        video_token_index=video_token_id, projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer, multimodal_projector_bias=True, tie_word_embeddings=True,
        image_grid_pinpoints=[[R.IMAGE_SIZE, R.IMAGE_SIZE]], spatial_pool_mode="average", spatial_pool_stride=POOL,
        image_seq_length=R.NUM_IMAGE_TOKENS, video_seq_length=NUM_FRAMES * FRAME_TOKENS,
    )


def build_processor(tokenizer):
    from transformers import LlavaNextVideoProcessor

    try:
        from transformers import LlavaNextImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import LlavaNextImageProcessor as ImageProcessor
    common = dict(size={"shortest_edge": R.IMAGE_SIZE}, crop_size={"height": R.IMAGE_SIZE, "width": R.IMAGE_SIZE},
                  do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
                  image_mean=R.IMAGENET_MEAN, image_std=R.IMAGENET_STD, resample=3)
    ip = ImageProcessor(image_grid_pinpoints=[[R.IMAGE_SIZE, R.IMAGE_SIZE]], **common)
    try:
        from . import compat

        vp = compat.llava_next_video_processor_class()(**common)
    except Exception as e:  # noqa: BLE001 - the video processor needs torchvision (ImportError or others)
        warnings.warn(f"vltok-ref-video: no LLaVA-NeXT-Video video processor ({e}); the processor handles text and "
                      "images only; give frames with vltok.reference_video.frames_to_pixels", stacklevel=3)
        vp = None
    tokenizer.padding_side = "left"
    return LlavaNextVideoProcessor(video_processor=vp, image_processor=ip, tokenizer=tokenizer,
                                   chat_template=CHAT_TEMPLATE, patch_size=R.PATCH_SIZE,
                                   vision_feature_select_strategy="default", video_token=VIDEO_TOKEN,
                                   image_token=R.IMAGE_TOKEN, num_additional_image_tokens=1)


def resample_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's position table [1, 1 + G*G, D] -> [1, 1 + grid*grid, D], with the exact resampling
    ``Dinov2Embeddings.interpolate_pos_encoding`` applies at run time (fp32 bicubic, align_corners=False)."""
    cls, patch = pos[:, :1], pos[:, 1:]
    g = int(round(patch.shape[1] ** 0.5))
    d = pos.shape[-1]
    p = patch.reshape(1, g, g, d).permute(0, 3, 1, 2)
    p = torch.nn.functional.interpolate(p.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    p = p.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, -1, d)
    return torch.cat([cls, p], dim=1)


def from_image_reference(image_model, image_processor):
    """(video model, processor) holding the image reference's weights (untrained for video)."""
    from transformers import LlavaNextVideoForConditionalGeneration

    tok = image_processor.tokenizer
    if VIDEO_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [R.IMAGE_TOKEN, VIDEO_TOKEN]})
    vid = tok.convert_tokens_to_ids(VIDEO_TOKEN)
    img = tok.convert_tokens_to_ids(R.IMAGE_TOKEN)
    tcfg = image_model.config.text_config.to_dict()
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "bos_token_id",
            "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias")
    text_cfg = {k: tcfg[k] for k in keys if k in tcfg}
    text_cfg.update(vocab_size=len(tok), tie_word_embeddings=True)
    config = build_config(text_cfg, img, vid, image_model.config.vision_feature_layer)
    torch.manual_seed(0)   # image_newline (unused by videos) is reproducible
    model = LlavaNextVideoForConditionalGeneration(config)
    src, dst = image_model.model, model.model
    with torch.no_grad():
        vis = {k: v for k, v in src.vision_tower.state_dict().items()}
        vis["embeddings.position_embeddings"] = resample_positions(vis["embeddings.position_embeddings"], R.GRID)
        missing, unexpected = dst.vision_tower.load_state_dict(vis, strict=False)
        if unexpected or [m for m in missing if "mask_token" not in m]:
            raise RuntimeError(f"DINOv2 weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        dst.multi_modal_projector.load_state_dict(src.multi_modal_projector.state_dict())
        lm = {k: v for k, v in src.language_model.state_dict().items()}
        emb = lm["embed_tokens.weight"]
        if emb.shape[0] < len(tok):
            extra = emb.mean(0, keepdim=True).expand(len(tok) - emb.shape[0], -1)
            lm["embed_tokens.weight"] = torch.cat([emb, extra], 0)
        missing, unexpected = dst.language_model.load_state_dict(lm, strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise RuntimeError(f"LM weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    processor = build_processor(tok)
    model.generation_config.eos_token_id = image_model.generation_config.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.do_sample = False
    model.eval()
    return model, processor


def load(device=None, dtype=None, delta: bool | str | os.PathLike = True, *, cache=None):
    """(model, processor) of ``vltok-ref-video``.

    delta: True = the committed trained delta (``assets/``; a clear error when absent), False = the untrained
    init (the image reference's weights; ``model.vltok_trained`` is False and a warning says so), or a path."""
    delta_path = None
    if delta is True:
        delta_path = default_delta_path()
        if delta_path is None:
            raise UntrainedVideoReference(
                f"vltok-ref-video has no trained delta (assets/{DELTA_NAME} is missing). Train it on one GPU with\n"
                "    python -m vltok.train_reference_video --out runs/ref-video\n"
                f"and copy runs/ref-video/{DELTA_NAME} to assets/ (or set VLTOK_REF_VIDEO_DELTA), or load the "
                "untrained init with vltok.reference.load('vltok-ref-video', delta=False)")
    elif delta:
        delta_path = Path(delta)
    image_model, image_processor = R.load(delta=True, cache=cache)
    model, processor = from_image_reference(image_model, image_processor)
    del image_model
    if delta_path is not None:
        R.apply_delta(model, delta_path)
    else:
        warnings.warn("vltok-ref-video: UNTRAINED video init (the image reference's weights); its answers about "
                      "videos are not meaningful. Train it with python -m vltok.train_reference_video",
                      stacklevel=2)
    model.vltok_trained = delta_path is not None
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model, processor
