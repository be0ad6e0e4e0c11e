"""BLIP (BlipForQuestionAnswering, BlipForConditionalGeneration) and BLIP-2 (Blip2ForConditionalGeneration).

Neither family splices placeholders for the ViT tokens, so there is nothing to rewrite in ``input_ids``:
* BLIP: the ViT output ``[CLS] + h*w patches`` is the cross-attention memory of the text encoder / decoder; its
  attention mask is built from the memory's shape, so a shorter memory needs no other change.
* BLIP-2: the ViT output is the Q-Former's cross-attention memory; the LLM always sees ``num_query_tokens``
  query outputs (placeholders unchanged). ``generate()`` calls ``vision_model`` directly (not
  ``get_image_features``), so the reduction is a forward hook on ``vision_model`` itself: every path goes through it.

The patch tokens form an (H/p) x (W/p) raster grid after the CLS token, which is kept. Pre-LLM grid methods run
on that grid; vision-stage methods (ToMe, CrossGET) merge inside the ViT's layers (adapters/hf_vit.py, the BLIP
attention written out with the log-size bias), and the shorter ViT output is the memory as above; LLM-side stages do
not apply (BLIP has no LLM; BLIP-2's LLM sees 32 non-spatial queries and OPT/T5
have no RoPE), so those methods are refused by ``vltok.patch`` with the adapter's reason.
"""
from __future__ import annotations

from vltok.vision import install_vision

from .base import Adapter, apply_grid
from .hf_vit import encoder_layers, split_layer


class VisionMemoryAdapter(Adapter):
    """Reduce the ViT tokens that a cross-attending model reads (no placeholders, no rewrite)."""

    family = "blip"
    stages: tuple[str, ...] = ("vision", "pre_llm")
    sites = ("vision_layers",)
    not_applicable = {
        "in_llm": "BLIP has no decoder-only LLM over visual tokens: the text model cross-attends to the ViT tokens",
        "decode": "BLIP's text model caches no visual tokens (they are cross-attention memory)",
    }

    def vision_model(self):
        return self.model.vision_model

    def vision_layers(self):
        return encoder_layers(self.vision_model())

    def _install_vision(self, vision, undo: list) -> None:
        layers = encoder_layers(vision)
        p = vision.config.patch_size
        n_patches = (vision.config.image_size // p) ** 2

        def on_done(run):
            counts = run.counts
            B = run.size.shape[0] if run.size is not None else 0
            for _ in range(B):
                self.record.image(counts[0], counts[-1], [(n_patches,)], [(counts[-1] - 1,)])
            self.record.stats["vision_tokens_per_layer"] = list(counts)
            self.record.seconds(run.seconds)

        schedule = lambda n: self.method.vision.schedule(n, len(layers))
        install_vision(layers, split_layer, self.method.vision, schedule, 1, undo, None, on_done, nominal=n_patches)

    def attach(self, undo: list) -> None:
        vision = self.vision_model()
        p = vision.config.patch_size
        self.install_extras(undo)
        h0 = vision.register_forward_pre_hook(lambda module, args: self.record.start_call())
        undo.append(h0.remove)
        if self.method.vision is not None:
            self._install_vision(vision, undo)
            return

        def hook(module, args, kwargs, out):
            pixel = args[0] if args else kwargs.get("pixel_values")
            h, w = pixel.shape[-2] // p, pixel.shape[-1] // p
            x = out[0]
            if x.shape[1] != 1 + h * w:
                raise ValueError(f"{type(module).__name__} returned {x.shape[1]} tokens, expected 1 + {h}*{w}")
            y, plan, _ = apply_grid(self.method.pre_llm, x, (h, w), self.record, prefix=1)   # (CLS kept)
            for _ in range(x.shape[0]):
                self.record.image(x.shape[1], y.shape[1], [(h, w)], [(h, w)] if plan.identity else
                                  [plan.grid or (plan.count,)])
            if y is x:
                return None
            out["last_hidden_state"] = y
            return out

        handle = vision.register_forward_hook(hook, with_kwargs=True)
        undo.append(handle.remove)


class BlipAdapter(VisionMemoryAdapter):
    family = "blip"


class Blip2Adapter(VisionMemoryAdapter):
    family = "blip2"
    not_applicable = {
        "in_llm": "BLIP-2's LLM sees num_query_tokens (32) non-spatial Q-Former queries, not a grid, and OPT/T5 have no "
                  "RoPE; reduce the ViT tokens before the Q-Former instead (a pre_llm method)",
        "decode": "BLIP-2's LLM caches 32 non-spatial query tokens; there is no visual grid to evict from",
    }
