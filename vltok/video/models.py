"""The video model side: load a video VLM and its processor, patch it, and answer batches of (frames, question).

Families (each through its own transformers processor; vltok's ``keep`` applies per frame as the adapters do):
Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import VltokError

VIDEO_CLASSES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "LlavaNextVideoForConditionalGeneration": "llava_next_video",
    "VideoLlavaForConditionalGeneration": "video_llava",
}
REFERENCE_VIDEO = "reference-video"
REFERENCE_VIDEO_NAME = "vltok-ref-video"

# prompts when the processor has no chat template (the families' documented single-turn formats)
FALLBACK_PROMPTS = {
    "qwen2_vl": "<|im_start|>user\n<|vision_start|>{video}<|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>user\n<|vision_start|>{video}<|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
    "llava_onevision": "<|im_start|>user {video}\n{q}<|im_end|><|im_start|>assistant\n",
    "llava_next_video": "USER: {video}\n{q} ASSISTANT:",
    "video_llava": "USER: {video}\n{q} ASSISTANT:",
}


class ModelError(VltokError):
    """The model cannot be used for video (not a video family, cannot be loaded)."""


def load_reference_video(device=None, dtype=None):
    """The video reference VLM of issue 17 (``vltok.reference.load("vltok-ref-video")``; its trained delta ships in
    vltok's assets). The image reference VLM ('vltok-ref') run over frames is not a video model and is never used in
    its place."""
    from .. import reference
    from ..reference_video import UntrainedVideoReference

    try:
        out = reference.load(REFERENCE_VIDEO_NAME, device=device, dtype=dtype)
    except UntrainedVideoReference as e:
        raise ModelError(f"the video reference VLM {REFERENCE_VIDEO_NAME!r} cannot load: {e} Or pass --model PATH to "
                         "a local Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision / LLaVA-NeXT-Video / Video-LLaVA "
                         "checkpoint.") from e
    return out[0], out[1]


REFERENCE_VIDEO_FRAMES = 16   # the video reference VLM takes 16 frames sampled uniformly (issue 17)


def load(spec, device=None, dtype=None):
    """``spec``: "reference-video", a local checkpoint folder (config + weights + processor files), or a
    (model, processor) pair. Returns (model, processor, name)."""
    import torch

    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return spec[0], spec[1], type(spec[0]).__name__
    spec = str(spec)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = _dtype(dtype, dev)
    if spec == REFERENCE_VIDEO:
        m, p = load_reference_video(dev, dt)
        return m, p, REFERENCE_VIDEO_NAME
    path = Path(spec)
    if not path.is_dir():
        raise ModelError(f"--model {spec!r} is neither 'reference-video' nor a local checkpoint folder (no model "
                         "hub is used: download the checkpoint first and pass its folder)")
    import transformers
    from transformers import AutoConfig, AutoProcessor

    cfg = AutoConfig.from_pretrained(path)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    if arch not in VIDEO_CLASSES:
        raise ModelError(f"{spec} holds a {arch or cfg.model_type} model; video runs need one of "
                         f"{', '.join(VIDEO_CLASSES)} (an image-only model over frames is not a video model)")
    cls = getattr(transformers, arch)
    model = cls.from_pretrained(path, dtype=dt).to(dev).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, spec


def _dtype(dtype, dev):
    import torch

    if dtype is None:
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32")
    return table[dtype]


class VideoModel:
    """A (patched) video VLM answering batches. ``method="none"`` runs the model unpatched."""

    def __init__(self, model, processor, method: str = "fourier", keep: float | None = None, method_kwargs=None,
                 max_new_tokens: int = 64):
        import vltok

        name = type(model).__name__
        if name not in VIDEO_CLASSES:
            raise ModelError(f"{name} is not a video model vltok supports; video families: "
                             f"{', '.join(VIDEO_CLASSES)}. The image reference VLM over frames is not a video model.")
        self.model, self.processor, self.family = model, processor, VIDEO_CLASSES[name]
        self.max_new_tokens = int(max_new_tokens)
        self.method = method
        self.handle = None
        if method != "none":
            existing = vltok.get_handle(model)
            if existing is not None:
                vltok.unpatch(model)
            self.handle = vltok.patch(model, method, keep=keep, **(method_kwargs or {}))
        tok = getattr(processor, "tokenizer", processor)
        if getattr(tok, "padding_side", "left") != "left":
            tok.padding_side = "left"     # batched generation
        self.tokenizer = tok
        self.video_token = getattr(processor, "video_token", None) or (
            "<|video_pad|>" if self.family.startswith("qwen") else "<video>")
        self.video_token_id = int(tok.convert_tokens_to_ids(self.video_token))
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def close(self):
        if self.handle is not None:
            import vltok

            vltok.unpatch(self.model)
            self.handle = None

    def prompt(self, question: str) -> str:
        p = self.processor
        if getattr(p, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
            return p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return FALLBACK_PROMPTS[self.family].format(video=self.video_token, q=question)

    def group_key(self, frames):
        """Samples that can share a batch: Qwen takes any mix (flat patches), the LLaVA families stack frames."""
        return None if self.family.startswith("qwen") else tuple(frames.shape)

    def answer(self, samples):
        """samples: list of dicts with frames [T,H,W,3] uint8, question, indices, fps, n_frames. Returns per sample
        dict(answer, tokens_in, tokens_out) and the (preprocess, model) seconds of the batch."""
        import torch

        t0 = time.perf_counter()
        texts = [self.prompt(s["question"]) for s in samples]
        videos = [s["frames"] for s in samples]
        kw = dict(return_tensors="pt", padding=True, do_sample_frames=False)
        if self.family.startswith("qwen"):
            kw["video_metadata"] = [{"total_num_frames": int(s["n_frames"]), "fps": float(s["fps"]),
                                     "frames_indices": [int(i) for i in s["indices"]],
                                     "duration": float(s["n_frames"]) / max(float(s["fps"]), 1e-6)}
                                    for s in samples]
        inputs = self.processor(text=texts, videos=videos, **kw)
        dev = self.model.device
        dt = self.model.dtype
        inputs = {k: (v.to(dev, dt) if torch.is_tensor(v) and v.is_floating_point() else
                      v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        t1 = time.perf_counter()
        ids = inputs["input_ids"]
        n_in = (ids == self.video_token_id).sum(1).tolist()
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_id)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        new = out[:, ids.shape[1]:]
        answers = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        n_out = list(n_in)
        if self.handle is not None:
            st = self.handle.stats or {}
            ims = st.get("images") or []
            if len(ims) == len(samples) and [int(e["tokens_in"]) for e in ims] == [int(x) for x in n_in]:
                n_out = [int(e["tokens_out"]) for e in ims]
            else:   # cannot attribute the counts to samples: report none rather than a wrong one
                n_out = [None] * len(samples)
        res = [{"answer": a.strip(), "tokens_in": int(i), "tokens_out": o} for a, i, o in zip(answers, n_in, n_out)]
        return res, t1 - t0, t2 - t1
