"""The recorder: how adapters and engines write a call's stats and kept-patch records onto the patch handle.

``handle.recorder`` is the one public entry (adapters never touch the handle's private state). What it writes is read
back as ``handle.stats`` (the last call with images, per thread) and ``handle.kept_patches()`` (vltok/kept.py)."""
from __future__ import annotations


class Recorder:
    def __init__(self, handle):
        self._h = handle

    # -- per call --------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        return self._h.stats

    @property
    def record_kept(self) -> bool:
        """Whether merges should also record every patch's group (``handle.record_kept``, set by the user)."""
        return self._h.record_kept

    def start_call(self) -> None:
        h = self._h
        h.stats = {"method": h.method.name, "keep": h.method.keep, "images": [], "tokens_in": 0,
                   "tokens_out": 0, "keep_achieved": 1.0, "flops_keep": 1.0, "llm_input_tokens": 0,
                   "seconds": 0.0}
        if h.method.keep_set_by is not None:   # an option fixes the budget: "keep" is what it achieved (_fixed_keep)
            h.stats["keep_set_by"] = h.method.keep_set_by
        h._kept_stages, h._kept_inllm = [], None

    def _fixed_keep(self, s: dict) -> None:
        """Where an option fixes the budget per image (the method's keep is None), the call's ``keep`` is the
        FLOPs-equivalent keep it achieved (pre-LLM: the kept share)."""
        if self._h.method.keep is None:
            s["keep"] = s["flops_keep"]

    def seconds(self, dt: float) -> None:
        """Time spent in vltok during this call."""
        if self._h.stats:
            self._h.stats["seconds"] += dt

    def rewrite(self, rw) -> None:
        """The placeholder rewrite of this call (vltok.rewrite): sequence lengths and kept positions."""
        self._h.stats["seq_len_in"], self._h.stats["seq_len_out"] = rw.orig_len, rw.new_len
        self._h.kept_positions = rw.kept_positions

    # -- images ----------------------------------------------------------------------------------------------
    def image(self, tokens_in, tokens_out, grids_in, grids_out) -> None:
        """One image (or video): visual tokens in / out and its grids before / after."""
        s = self._h.stats or (self.start_call() or self._h.stats)
        s["images"].append({"tokens_in": int(tokens_in), "tokens_out": int(tokens_out),
                            "grids_in": [list(g) for g in grids_in], "grids_out": [list(g) for g in grids_out]})
        s["tokens_in"] += int(tokens_in)
        s["tokens_out"] += int(tokens_out)
        s["llm_input_tokens"] = s["tokens_out"]
        s["keep_achieved"] = s["tokens_out"] / max(s["tokens_in"], 1)
        # pre-LLM stages: every LLM layer sees the reduced count, so the FLOPs-equivalent keep is the kept share
        s["flops_keep"] = s["keep_achieved"]
        self._fixed_keep(s)

    def kept(self, kind, grid, batch, kept=None, groups=None, out_grid=None) -> None:
        """One pre-LLM / vision reduction of ``batch`` images of patch grid ``grid`` (h, w): kind
        "none" | "select" | "merge" | "resample"; ``kept`` [batch, k] raster indices, ``groups`` [batch, h*w]
        (output token per patch, -1 dropped), ``out_grid`` (r_h, r_w). Tensors are kept as they are (no sync)."""
        self._h._kept_stages.append(dict(kind=kind, grid=tuple(grid), batch=int(batch), kept=kept, groups=groups,
                                         out_grid=out_grid))

    # -- in-LLM stage ----------------------------------------------------------------------------------------
    def kept_inllm(self, layout, cuts) -> None:
        """Per prefill: the layout and the cut layers (the columns are the handle's ``inllm_prefill_columns`` /
        ``inllm_dead_columns``, read when kept_patches() is asked)."""
        h = self._h
        h._kept_inllm = (layout, list(cuts), dict(getattr(h, "inllm_prefill_columns", {})),
                         dict(getattr(h, "inllm_dead_columns", {}) or {}))

    def inllm(self, per_layer, n_visual, cuts, seconds_scoring, final_cols, sizes_in, sizes_out) -> None:
        """Per LLM prefill: visual tokens entering each decoder layer (sample 0), FLOPs-equivalent keep
        sum_l n_l / (L N), final columns, scoring time."""
        s = self._h.stats or (self.start_call() or self._h.stats)
        if not s["images"]:
            for ins, outs in zip(sizes_in, sizes_out):
                for a, b in zip(ins, outs):
                    self.image(a, b, [], [])
        else:   # the images were recorded by an earlier stage: the in-LLM stage shrinks their final counts
            for im, b in zip(s["images"], [b for outs in sizes_out for b in outs]):
                im["tokens_out"] = int(b)
            s["tokens_out"] = sum(im["tokens_out"] for im in s["images"])
            s["keep_achieved"] = s["tokens_out"] / max(s["tokens_in"], 1)
        r = next((b for b, x in enumerate(sizes_in) if x), 0)   # "sample 0": the first sample with images
        n0 = sum(sizes_in[r]) if sizes_in else n_visual
        n_llm0 = n0
        if sizes_in and len(s["images"]) >= len(sizes_in[r]):   # an earlier stage (vision) recorded native counts
            n0 = sum(im["tokens_in"] for im in s["images"][:len(sizes_in[r])])
        s["tokens_per_layer"] = [int(n) for n in per_layer]
        # sample 0's visual tokens after each stage: native, entering the LLM (after a vision stage), after each cut
        s["stage_tokens"] = {"native": int(n0), "llm_input": int(n_llm0),
                             "cuts": {int(c): int(per_layer[c]) for c in cuts},
                             "final": int(sum(sizes_out[r])) if sizes_out else int(per_layer[-1])}
        s["prune_layers"] = list(cuts)
        s["flops_keep"] = sum(per_layer) / max(len(per_layer) * n0, 1)
        s["seconds_scoring"] = s.get("seconds_scoring", 0.0) + seconds_scoring
        s["seconds"] += seconds_scoring
        s["llm_input_tokens"] = int(sum(sum(x) for x in sizes_in))
        self._fixed_keep(s)
        self._h.inllm_kept_columns = final_cols
