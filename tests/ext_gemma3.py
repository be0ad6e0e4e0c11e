"""FIXTURE (tests/test_extending.py; not registered for users): a Gemma 3 adapter
(Gemma3ForConditionalGeneration) written by copying adapters/_example.py: the projector pools the SigLIP grid to
mm_tokens_per_image tokens per image (a square raster grid), each replacing one image placeholder between BOI / EOI.

An adapter knows one model family and no method. It says where the family keeps its visual grids and placeholder
tokens, exposes the sites a method may use (vltok.stages.Sites; a site it lacks stays None), and applies a pre-LLM
reducer with the ONE helper ``apply_grid``. Everything else (shrinking the placeholder runs of ``input_ids`` & co.,
wrapping ``forward`` / ``generate``, undo) is PlaceholderAdapter's.

This one fits a family whose projector outputs, per image, one square raster grid of visual tokens that replace one
run of ``image_token_id`` placeholders in the LLM input (LLaVA-1.5 with strategy "default", Gemma 3, ...). The
reduction runs on the projector's OUTPUT, so the projector site is None (a method projector would be fed a reduced
grid it was not built for).
"""
from __future__ import annotations

import math

from vltok.errors import IncompatibleError

from vltok.adapters import register_adapter
from vltok.adapters.base import PlaceholderAdapter, apply_grid


class Gemma3Adapter(PlaceholderAdapter):
    family = "gemma3"
    stages = ("pre_llm",)                               # what the family can run (vltok.support reads it)
    sites = ("llm", "decoder_layers", "placeholder_runs")
    not_applicable = {"vision": "the template does not hook the vision tower's layers"}

    def grid_module(self):
        """The module whose output is [n_images, h*w, D] (raster order)."""
        return self.model.model.multi_modal_projector

    def language_model(self):
        return self.model.model.language_model

    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def native_grid(self) -> tuple[int, int]:
        """The (h, w) grid of one image at the grid module's output (here: read from the config)."""
        side = math.isqrt(self.model.config.mm_tokens_per_image)
        return side, side

    def image_counts(self, call):
        """Per image: (native placeholder count, count after the method), known before the model runs."""
        h, w = self.native_grid()
        n = call["pixel_values"].shape[0]
        return [h * w] * n, [self.method.pre_llm.plan(h, w).count] * n

    def install(self, undo):
        grid = self.native_grid()

        def hook(module, args, out):
            if out.shape[1] != grid[0] * grid[1]:
                raise IncompatibleError(f"{self.family}: {out.shape[1]} visual tokens per image, expected {grid}")
            y, plan, _ = apply_grid(self.method.pre_llm, out, grid, self.record, kept=True)
            for _ in range(out.shape[0]):
                self.record.image(out.shape[1], y.shape[1], [grid], [plan.grid or (plan.count,)])
            return None if y is out else y

        undo.append(self.grid_module().register_forward_hook(hook).remove)


register_adapter("Gemma3ForConditionalGeneration", Gemma3Adapter)   # the one registration line
