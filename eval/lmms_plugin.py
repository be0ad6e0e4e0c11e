"""lmms-eval model ``vltok``: any checkpoint vltok supports, patched by a vltok method, as an lmms-eval model.

    pip install "vltok[lmms]"       # registers it through the ``lmms_eval.models`` entry point (lmms-eval >= 0.7)
    lmms-eval --model vltok --model_args pretrained=PATH,method=fourier,keep=0.16 --tasks pope --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model vltok --model_args pretrained=PATH,method=fastv,keep=0.25 \\
        --tasks pope,gqa --batch_size 8                 # data parallel: one model per GPU, lmms-eval shards the docs

``model_args``: ``pretrained`` (a checkpoint folder, its family picked from its config by transformers' auto class,
or ``vltok-ref`` for the reference VLM), ``method`` (none = the unpatched model), ``keep`` (default 0.16),
``dtype`` (float32 / bfloat16 / float16; default bfloat16 on CUDA, float32 on CPU), ``frames`` (per video, default
8), ``max_new_tokens`` (a cap over the task's), and any other key as a method option (``vltok.patch`` validates
it). Answers are greedy, batched (left padding), cut at the task's ``until`` strings; prompts are the task's text
in the checkpoint's chat template with one image / video placeholder, exactly as ``vltok eval`` builds them
(vltok.eval.runner), so both give the same answers. Only ``generate_until`` tasks are supported.
"""
from __future__ import annotations

import warnings

import torch
from lmms_eval.api.model import lmms

from . import runner


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval 0.7's ModelRegistryV2 loads it when it starts."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vltok", simple_class_path="vltok.eval.lmms_plugin.VltokLMM")


class VltokLMM(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "vltok-ref", method: str | None = None, keep: float | None = None,
                 batch_size: int | str | None = 1, max_batch_size=None, device: str | None = None,
                 dtype: str | None = None, frames: int = 8, max_new_tokens: int | None = None, **method_kwargs):
        super().__init__()
        from accelerate import Accelerator

        from vltok.errors import VltokError

        from .cli import load_model

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            device = f"cuda:{accelerator.local_process_index}"
            self._rank, self._world_size = accelerator.local_process_index, accelerator.num_processes
        device = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise VltokError(f"device={device} but no CUDA device is available: pass --device cpu")
        self.accelerator = accelerator
        self._device = torch.device(device)
        dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
        (self._model, self.processor), self.name = load_model(pretrained, device, dtype)
        try:
            self.batch_size_per_gpu = int(batch_size or 1)
        except ValueError:
            raise VltokError(f"batch_size={batch_size!r}: vltok's model takes a fixed integer batch size") from None
        if self.batch_size_per_gpu < 1:
            raise VltokError(f"batch_size must be at least 1 (got {batch_size})")
        self.frames = int(frames)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens else None
        self.handle = None
        if method in (None, "", "none"):
            if keep is not None or method_kwargs:
                raise VltokError(f"keep / method options {sorted(method_kwargs)} given without method=")
        else:
            import vltok

            self.handle = vltok.patch(self._model, method, keep=None if keep is None else float(keep),
                                      **method_kwargs)   # keep None: not given (0.16, or what an option fixes)
        self.patch_config = {"method": method, "keep": keep, **method_kwargs} if self.handle else None

    @property
    def model(self):
        return self._model

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def loglikelihood(self, requests):
        raise NotImplementedError("vltok's lmms-eval model implements generate_until only (multiple-choice by "
                                  "likelihood is not supported): use a generation task")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vltok's lmms-eval model implements single-round generate_until only")

    def _visual(self, doc_to_visual, doc_id, task, split):
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        if not visuals:
            return "text", None
        if len(visuals) > 1:
            raise NotImplementedError(f"{task}: {len(visuals)} visuals in one document; vltok's lmms-eval model "
                                      "takes one image or one video per question")
        v = visuals[0]
        if isinstance(v, str):
            return "video", runner.load_video(v, self.frames)
        if isinstance(v, (list, tuple)):   # a video given as frames
            return "video", [f.convert("RGB") for f in v]
        return "image", v.convert("RGB")

    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        args = [r.args for r in requests]
        groups: dict[tuple, list[int]] = {}
        prepared = {}
        for i, (context, gen_kwargs, doc_to_visual, doc_id, task, split) in enumerate(args):
            gk = dict(gen_kwargs or {})
            if float(gk.get("temperature", 0) or 0) > 0 or gk.get("do_sample"):
                raise NotImplementedError(f"{task}: the task asks for sampling ({gk}); vltok's lmms-eval model "
                                          "decodes greedily")
            until = gk.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            mnt = int(gk.get("max_new_tokens", 128))
            if self.max_new_tokens:
                mnt = min(mnt, self.max_new_tokens)
            try:
                kind, vis = self._visual(doc_to_visual, doc_id, task, split)
            except runner.ItemError as e:
                warnings.warn(f"vltok: {task} doc {doc_id}: {e}; answered with an empty string", stacklevel=2)
                kind, vis = "error", None
            prepared[i] = (context, vis)
            groups.setdefault((kind, mnt, tuple(until)), []).append(i)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="vltok")
        for (kind, mnt, until), idx in groups.items():
            if kind == "error":
                for i in idx:
                    out[i] = ""
                bar.update(len(idx))
                continue
            for k in range(0, len(idx), self.batch_size_per_gpu):
                chunk = idx[k:k + self.batch_size_per_gpu]
                texts = [prepared[i][0] for i in chunk]
                visuals = [prepared[i][1] for i in chunk]
                answers = runner.generate(self._model, self.processor, texts, visuals, kind, max_new_tokens=mnt,
                                          stop=list(until))
                for i, a in zip(chunk, answers):
                    out[i] = a
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), a)
                bar.update(len(chunk))
        bar.close()
        return out
