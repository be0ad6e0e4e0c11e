"""Batch-1 prefill fast path: the vision tower + projector and the LLM prefill replayed as CUDA graphs.

At batch 1 an eager 7B prefill is launch-bound (hundreds of small kernels, ~25 ms of host time), which hides the
saving of a shorter visual sequence. ``PrefillGraph(model)`` captures, per input shape, one graph that runs the
vision path (with vltok's reduction, if the model is patched), splices the features into the token embeddings and
runs the language model; calls replay it.

The placeholder rewrite runs on the device, inside the graph: one small device-to-host read per call checks the
input (one contiguous run of the image's placeholders, no padding) and gives the run's first column; the shortened
``input_ids`` are a gather whose source columns are computed from that column on the device, so a replay needs no
host-side rewrite (the generic ``adapter.prepare`` costs a few ms of host time at batch 1).

In-LLM methods (FastV, FEATHER: an in-LLM stage only) run inside the graph too: the engine's layout is the run's
columns computed on the device from that first column, and every cut (scores, selection, compaction, gathers) is
device work of static shape, so the graph holds it and a replay runs none of vltok's Python. The kept columns
depend on the image: ``handle.inllm_kept_columns`` is the graph's output tensor, refreshed by each replay.

Scope: LLaVA-1.5 (`LlavaForConditionalGeneration`), batch 1, one image, no padding, patched with a pre-LLM method,
an in-LLM-only method, or not patched; it returns the last position's logits (the first generated token), i.e. it
measures and serves TTFT. Other cases raise a clear error. For a model on the CPU (or with ``graphs=False``) the
same function runs eagerly.
"""
from __future__ import annotations

import torch

from .api import get_handle
from .errors import IncompatibleError

GRAPH_STATS = ("images", "tokens_in", "tokens_out", "keep_achieved", "flops_keep", "llm_input_tokens",
               "tokens_per_layer", "stage_tokens", "prune_layers")   # (recorded at capture; shapes are static)


class PrefillGraph:
    def __init__(self, model, graphs: bool | None = None, warmup: int = 2):
        if type(model).__name__ != "LlavaForConditionalGeneration":
            raise IncompatibleError(f"the prefill fast path supports LlavaForConditionalGeneration, not "
                                    f"{type(model).__name__}; call the model eagerly instead")
        self.model = model
        on_gpu = next(model.parameters()).is_cuda
        if graphs and not on_gpu:
            raise IncompatibleError("CUDA graphs need the model on a CUDA device; move it with model.cuda()")
        self.graphs = on_gpu if graphs is None else graphs
        self.warmup = warmup
        self._entries: dict = {}

    def _prepare(self, input_ids, pixel_values, attention_mask):
        """Checks the call and returns (handle, first placeholder column, native run length, reduced length)."""
        handle = get_handle(self.model)
        if handle is not None and handle.method.in_llm is not None and (
                handle.method.pre_llm is not None or handle.method.vision is not None
                or handle.method.decode is not None or getattr(handle.method.in_llm, "needs_saliency", False)):
            raise IncompatibleError(f"the prefill fast path takes pre-LLM methods and in-LLM-only methods without a "
                                    f"vision-side score; method {handle.method.name!r} combines stages: call the "
                                    "model eagerly")
        ids = input_ids
        if ids.dim() != 2 or ids.shape[0] != 1 or pixel_values.shape[0] != 1:
            raise IncompatibleError("the prefill fast path takes batch 1 (one prompt, one image); batch larger "
                                    "inputs through model(...) / model.generate(...)")
        L = ids.shape[1]
        is_ph = ids[0] == self.model.config.image_token_id
        cols = torch.arange(L, device=ids.device)
        padded = (attention_mask == 0).sum() if attention_mask is not None else torch.zeros((), device=ids.device)
        n_ph, first, last, pads = torch.stack([is_ph.sum(), torch.where(is_ph, cols, L).min(),
                                               torch.where(is_ph, cols, -1).max(),
                                               padded.to(cols.dtype)]).tolist()   # the one host read
        if pads:
            raise IncompatibleError("the prefill fast path takes batch 1 without padding; pass an all-ones "
                                    "attention_mask (or none)")
        call = {"input_ids": ids, "pixel_values": pixel_values}
        if handle is not None and handle.method.in_llm is not None:   # layer 0 keeps every placeholder
            p = handle.adapter._patch()
            native = new = [(pixel_values.shape[-2] // p) * (pixel_values.shape[-1] // p)
                            + handle.adapter.vision_facts().prefix]
        elif handle is not None:
            native, new = handle.adapter.image_counts(call)
        else:
            native = new = [n_ph]
        if len(native) != 1 or n_ph != native[0] or last - first + 1 != n_ph:
            raise IncompatibleError(f"the prefill fast path needs the processor's input_ids: one contiguous run of "
                                    f"{native[0] if native else '?'} image placeholders for the one image; got "
                                    f"{n_ph} placeholder(s) in columns {first}..{last}")
        return handle, first, native[0], new[0]

    def _run(self, ids, pv, first, n: int, k: int):
        """ids [1, L] with a run of n placeholders starting at column ``first`` (a 0-d device tensor) -> the last
        position's logits of the model fed the run shortened to k (all on the device, no host sync)."""
        m = self.model
        cfg = m.config
        L = ids.shape[1]
        handle = get_handle(m)
        engine = getattr(handle.adapter, "engine", None) if handle is not None else None
        if engine is not None:   # in-LLM method: the run's grid columns, computed on the device
            from .inllm import VisualImage

            p = handle.adapter._patch()
            grid = (pv.shape[-2] // p, pv.shape[-1] // p)
            pre = n - grid[0] * grid[1]                    # a CLS kept by strategy "full" leads the run
            cols = first + pre + torch.arange(grid[0] * grid[1], device=ids.device)
            engine.begin_call({"input_ids": ids}, [[VisualImage(cols, grid, image=0, extra=pre)]])
        j = torch.arange(L - (n - k), device=ids.device)
        src = j + (j >= first + k).long() * (n - k)    # columns after the shortened run come from n - k further on
        new_ids = ids.index_select(1, src)
        pos = first + torch.arange(k, device=ids.device)
        out = m.model.get_image_features(pixel_values=pv, vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = out.pooler_output
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)
        emb = m.get_input_embeddings()(new_ids)
        emb = emb.index_copy(1, pos, feats[None].to(emb.dtype))
        hs = m.model.language_model(inputs_embeds=emb, use_cache=False).last_hidden_state
        return m.lm_head(hs[:, -1])

    @torch.no_grad()
    def __call__(self, input_ids, pixel_values, attention_mask=None) -> torch.Tensor:
        handle, first, n, k = self._prepare(input_ids, pixel_values, attention_mask)
        if handle is not None:
            handle.recorder.start_call()
            L = input_ids.shape[1]
            handle.stats["seq_len_in"], handle.stats["seq_len_out"] = L, L - (n - k)
        if not self.graphs:
            return self._run(input_ids, pixel_values, torch.tensor(first, device=input_ids.device), n, k)
        key = (tuple(input_ids.shape), tuple(pixel_values.shape), pixel_values.dtype, n, k,
               None if handle is None else id(handle))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(input_ids, pixel_values, first, n, k, handle)
            self._entries[key] = entry
        else:
            entry["ids"].copy_(input_ids)
            entry["pv"].copy_(pixel_values)
            entry["first"].fill_(first)
            entry["graph"].replay()
            if handle is not None:   # the reduction ran inside the graph: report what it did at capture
                handle.stats.update(entry["stats"])
        return entry["out"].clone()

    def _capture(self, ids, pv, first, n, k, handle):
        entry = {"ids": ids.clone(), "pv": pv.clone(), "first": torch.tensor(first, device=ids.device)}
        args = (entry["ids"], entry["pv"], entry["first"], n, k)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._run(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            entry["out"] = self._run(*args)
        entry["graph"] = graph
        if handle is not None:
            entry["stats"] = {k: handle.stats.get(k) for k in GRAPH_STATS}
            entry["stats"]["images"] = entry["stats"]["images"][-pv.shape[0]:]
        graph.replay()
        return entry
