"""BLIP (BlipForQuestionAnswering, BlipForConditionalGeneration) and BLIP-2 (Blip2ForConditionalGeneration).

Neither family splices placeholders for the ViT tokens, so there is nothing to rewrite in ``input_ids``:
* BLIP: the ViT output ``[CLS] + h*w patches`` is the cross-attention memory of the text encoder / decoder; its
  attention mask is built from the memory's shape, so a shorter memory needs no other change.
* BLIP-2: the ViT output is the Q-Former's cross-attention memory; the LLM always sees ``num_query_tokens``
  query outputs (placeholders unchanged). ``generate()`` calls ``vision_model`` directly (not
  ``get_image_features``), so the reduction is a forward hook on ``vision_model`` itself: every path goes through it.

The patch tokens form an (H/p) x (W/p) raster grid after the CLS token, which is kept. Pre-LLM grid methods run
on that grid; LLM-side stages do not apply (BLIP has no LLM; BLIP-2's LLM sees 32 non-spatial queries and OPT/T5
have no RoPE), so those methods are refused by ``vltok.patch`` with the adapter's reason.
"""
from __future__ import annotations

import time

import torch

from vltok.stages import selected_indices


class VisionMemoryAdapter:
    """Reduce the ViT tokens that a cross-attending model reads (no placeholders, no rewrite)."""

    family = "blip"
    stages: tuple[str, ...] = ("pre_llm",)
    not_applicable = {
        "vision": "vltok's BLIP adapter does not hook the ViT layers yet (reduce the ViT output instead: a pre_llm method)",
        "in_llm": "BLIP has no decoder-only LLM over visual tokens: the text model cross-attends to the ViT tokens",
        "decode": "BLIP's text model caches no visual tokens (they are cross-attention memory)",
    }

    def __init__(self, model, method, handle):
        self.model, self.method, self.handle = model, method, handle

    def vision_model(self):
        return self.model.vision_model

    def _reduce(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        reducer = self.method.pre_llm
        plan = reducer.plan(h, w)
        patches = x[:, 1:]
        if plan.grid is not None:
            y = reducer.reduce(patches, plan)
        else:
            idx = selected_indices(reducer, patches, plan)
            y = patches.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]).to(x.device))
        for _ in range(x.shape[0]):
            self.handle._record_image(x.shape[1], 1 + y.shape[1], [(h, w)], [plan.grid or (plan.count,)])
        return torch.cat([x[:, :1], y], dim=1)

    def attach(self, undo: list) -> None:
        vision = self.vision_model()
        p = vision.config.patch_size

        def hook(module, args, kwargs, out):
            pixel = args[0] if args else kwargs.get("pixel_values")
            self.handle._start_call()
            h, w = pixel.shape[-2] // p, pixel.shape[-1] // p
            x = out[0]
            if x.shape[1] != 1 + h * w:
                raise ValueError(f"{type(module).__name__} returned {x.shape[1]} tokens, expected 1 + {h}*{w}")
            if self.method.pre_llm.plan(h, w).identity:
                for _ in range(x.shape[0]):
                    self.handle._record_image(x.shape[1], x.shape[1], [(h, w)], [(h, w)])
                return None
            t0 = time.perf_counter()
            out["last_hidden_state"] = self._reduce(x, h, w)
            self.handle._add_seconds(time.perf_counter() - t0)
            return out

        handle = vision.register_forward_hook(hook, with_kwargs=True)
        undo.append(handle.remove)


class BlipAdapter(VisionMemoryAdapter):
    family = "blip"


class Blip2Adapter(VisionMemoryAdapter):
    family = "blip2"
    not_applicable = {
        "vision": "vltok's BLIP-2 adapter does not hook the ViT layers yet (reduce the ViT output instead: a pre_llm "
                  "method, applied before the Q-Former)",
        "in_llm": "BLIP-2's LLM sees num_query_tokens (32) non-spatial Q-Former queries, not a grid, and OPT/T5 have no "
                  "RoPE; reduce the ViT tokens before the Q-Former instead (a pre_llm method)",
        "decode": "BLIP-2's LLM caches 32 non-spatial query tokens; there is no visual grid to evict from",
    }
