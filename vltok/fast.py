"""Batch-1 prefill fast path: the vision tower + projector and the LLM prefill replayed as CUDA graphs.

At batch 1 an eager 7B prefill is launch-bound (hundreds of small kernels, ~25 ms of host time), which hides the
saving of a shorter visual sequence. ``PrefillGraph(model)`` captures, per input shape, one graph that runs the
vision path (with vltok's reduction, if the model is patched), splices the features into the token embeddings and
runs the language model; calls replay it. Placeholder rewriting runs eagerly before the replay.

Scope: LLaVA-1.5 (`LlavaForConditionalGeneration`), batch 1, no padding, patched with a pre-LLM method or not
patched; it returns the last position's logits (the first generated token), i.e. it measures and serves TTFT.
Other cases raise a clear error. For a model on the CPU (or with ``graphs=False``) the same function runs eagerly.
"""
from __future__ import annotations

import torch

from .api import get_handle
from .errors import IncompatibleError


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
        call = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        handle = get_handle(self.model)
        if handle is not None:
            if handle.method.in_llm is not None or handle.method.decode is not None:
                raise IncompatibleError(f"the prefill fast path needs fixed per-layer lengths; method "
                                        f"{handle.method.name!r} prunes inside the LLM: call the model eagerly")
            call, _ = handle.adapter.prepare(call, default_side="left")
        ids, am = call["input_ids"], call.get("attention_mask")
        if ids.shape[0] != 1 or (am is not None and not bool(am.all())):
            raise IncompatibleError("the prefill fast path takes batch 1 without padding; batch larger inputs "
                                    "through model(...) / model.generate(...)")
        return ids, call["pixel_values"], handle

    def _run(self, ids, pv, pos):
        m = self.model
        cfg = m.config
        out = m.model.get_image_features(pixel_values=pv, vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        feats = out.pooler_output
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)
        emb = m.get_input_embeddings()(ids)
        emb = emb.index_copy(1, pos, feats[None].to(emb.dtype))
        hs = m.model.language_model(inputs_embeds=emb, use_cache=False).last_hidden_state
        return m.lm_head(hs[:, -1])

    @torch.no_grad()
    def __call__(self, input_ids, pixel_values, attention_mask=None) -> torch.Tensor:
        ids, pv, handle = self._prepare(input_ids, pixel_values, attention_mask)
        pos = (ids[0] == self.model.config.image_token_id).nonzero().flatten()
        if not self.graphs:
            return self._run(ids, pv, pos)
        key = (tuple(ids.shape), tuple(pv.shape), pv.dtype, None if handle is None else id(handle))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(ids, pv, pos, handle)
            self._entries[key] = entry
        else:
            entry["ids"].copy_(ids)
            entry["pv"].copy_(pv)
            entry["pos"].copy_(pos)
            entry["graph"].replay()
            if handle is not None:   # the reduction ran inside the graph: report what it did at capture
                for k in ("images", "tokens_in", "tokens_out", "keep_achieved", "flops_keep", "llm_input_tokens"):
                    handle.stats[k] = entry["stats"][k]
        return entry["out"].clone()

    def _capture(self, ids, pv, pos, handle):
        entry = {"ids": ids.clone(), "pv": pv.clone(), "pos": pos.clone()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._run(entry["ids"], entry["pv"], entry["pos"])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            entry["out"] = self._run(entry["ids"], entry["pv"], entry["pos"])
        entry["graph"] = graph
        if handle is not None:
            entry["stats"] = {k: handle.stats.get(k) for k in ("images", "tokens_in", "tokens_out", "keep_achieved",
                                                               "flops_keep", "llm_input_tokens")}
            entry["stats"]["images"] = entry["stats"]["images"][-pv.shape[0]:]
        graph.replay()
        return entry
