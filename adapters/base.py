"""Shared machinery for adapters of families that splice visual features into placeholder tokens.

An adapter wraps the model's ``forward`` and ``generate`` on the instance: when the inputs carry the processor's
native placeholder runs, it shrinks them to the counts the method will produce (vltok.rewrite), then calls the
original. Family subclasses say where grids live (``image_counts``) and install the feature reduction
(``install``); they never know which method runs.
"""
from __future__ import annotations

import functools
import inspect
import time

import torch

from vltok.errors import IncompatibleError
from vltok import compat
from vltok.prompt_cache import PromptCaches
from vltok.stages import CallInfo, GridReducer, VisionFacts, run_reducer
from vltok.hooks import set_instance_attr  # noqa: F401 (adapters import it from here)
from vltok.rewrite import restore_prompt, shrink_runs

PER_TOKEN = ("attention_mask", "labels", "token_type_ids", "mm_token_type_ids")


def _bind(sig: inspect.Signature, args, kwargs) -> dict:
    if not args:   # keywords only (model(**inputs)): binding would flatten them into the same dict
        return dict(kwargs)
    bound = sig.bind_partial(*args, **kwargs).arguments
    out = {}
    for name, value in bound.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def features_entry(sig: inspect.Signature, config, ahead: dict, kind: str, args, kwargs):
    """The start of a wrapped ``get_{kind}_features`` (Qwen2-VL / 2.5-VL): ``(bound arguments, pixels, as_dict,
    early)``. ``return_dict`` is popped from ``kwargs``: the reduction needs the output object, and the caller gets
    what the original returns (a tuple where return_dict=False is passed or set in the config, as transformers'
    can_return_tuple decides). ``early``: the output encoded ahead in prepare for these very pixels (taken from
    ``ahead``), already in the caller's form; None otherwise."""
    bound = _bind(sig, args, kwargs)
    pixels = next(iter(bound.values()), None)
    as_dict = kwargs.pop("return_dict", None)
    as_dict = getattr(config, "return_dict", True) if as_dict is None else as_dict
    got = ahead.pop(kind, None)
    early = None
    if got is not None and got[0] is pixels:
        early = got[1] if as_dict else got[1].to_tuple()
    return bound, pixels, as_dict, early


def apply_grid(reducer: GridReducer, x: torch.Tensor, grid: tuple[int, int], record=None, prefix: int = 0,
               side: dict | None = None, kept: bool = False):
    """THE way an adapter applies a pre-LLM reducer: x [B, prefix + h*w, C] (``prefix`` leading tokens, e.g. a kept
    CLS, pass through) -> ``(y [B, prefix + count, C], plan, idx)``; idx [B, k] = the kept raster indices of a
    selection (None for a resampling or an identity plan, where y is x itself). ``record`` (the handle's
    vltok.record.Recorder, or None): the time spent is added to the call's stats and, with ``kept``, the reduction
    is recorded for handle.kept_patches() (a merging selection also records every patch's group when
    ``record.record_kept`` is on). ``side``: the side inputs the reducer ``needs`` (keyword arguments)."""
    h, w = grid
    plan = reducer.plan(h, w)
    B = x.shape[0]
    if plan.identity:
        if record is not None and kept:
            record.kept("none", (h, w), B)
        return x, plan, None
    t0 = time.perf_counter()
    groups = record is not None and kept and reducer.merges and record.record_kept
    idx, y, g = run_reducer(reducer, x[:, prefix:] if prefix else x, plan, groups=groups, **(side or {}))
    if record is not None and kept:
        if idx is None:
            record.kept("resample", (h, w), B, out_grid=tuple(plan.grid))
        else:
            record.kept("merge" if g is not None else "select", (h, w), B, idx, g)
    if prefix:
        y = torch.cat([x[:, :prefix], y], dim=1)
    if record is not None:
        record.seconds(time.perf_counter() - t0)
    return y, plan, idx


class Adapter:
    """What every adapter declares (read by vltok.support and vltok.patch without a model) and the sites it exposes
    (vltok.stages.Sites: a site that is None is not applicable to the family)."""

    family = "?"
    stages: tuple[str, ...] = ()
    #: the names of the sites whose accessor gives an object (vltok.stages.Sites)
    sites: tuple[str, ...] = ()
    #: the side inputs (vltok.stages.SIDE_INPUTS) this adapter passes to a GridReducer that ``needs`` them
    side_inputs: tuple[str, ...] = ()
    runs_temporal = False     # temporal reducers (evs, tmerge) reduce each video's frames together
    gives_saliency = False    # install_saliency() gives the in-LLM engine a vision-side CLS score
    not_applicable: dict = {}   # stage -> why the family has no such stage
    #: positions="original" of pre-LLM selection reducers: kept tokens keep the full grid's position ids
    original_positions = False

    @staticmethod
    def vision_refusal(merger) -> str | None:
        """Why this adapter cannot run ``merger`` (a VisionMerger) in its vision stage, None when it can (e.g. the
        Qwen tower needs a merge count known before the model runs). Read by vltok.support without a model."""
        return None

    def __init__(self, model, method, handle):
        self.model, self.method, self.handle = model, method, handle

    @property
    def record(self):
        """The handle's recorder (vltok.record.Recorder)."""
        return self.handle.recorder

    # -- sites (vltok.stages.Sites) ------------------------------------------------------------------------------
    def vision_layers(self):
        return None

    def projector(self):
        return None

    def llm(self):
        return None

    def decoder_layers(self):
        return None

    placeholder_runs = None

    def vision_facts(self) -> VisionFacts | None:
        return None

    def rotary(self):
        return None

    def current_call(self) -> CallInfo:
        return CallInfo()

    def install_extras(self, undo: list) -> None:
        """Each stage's own extras on this adapter's sites (vltok.stages: ``install(sites, undo)``)."""
        for stage in (self.method.vision, self.method.pre_llm):   # (the in-LLM / decode stages: their engine)
            if stage is not None:
                stage.install(self, undo)


class PlaceholderAdapter(Adapter):
    family = "?"
    stages: tuple[str, ...] = ("pre_llm",)
    sites = ("llm", "decoder_layers", "placeholder_runs")
    pixel_keys: tuple[str, ...] = ("pixel_values",)

    def __init__(self, model, method, handle):
        super().__init__(model, method, handle)
        self._in_generate = False
        self.prompt_caches = PromptCaches()   # caches filled from a shortened prompt (generate() continues them)
        self.engine = None   # vltok.inllm.InLLMEngine when the method has an in-LLM stage
        self._call_info = CallInfo()

    def current_call(self) -> CallInfo:
        return self._call_info

    def past_length(self, llm_kwargs: dict) -> int:
        from vltok import compat

        past = compat.get_cache(llm_kwargs)
        return 0 if past is None else int(past.get_seq_length())

    def llm(self):
        return self.language_model()

    def rotary(self):
        from vltok import compat

        return compat.rotary_embedding(self.language_model())

    # -- family-specific -------------------------------------------------------------------------------------
    def image_token_id(self) -> int:
        raise NotImplementedError

    def image_counts(self, call: dict) -> tuple[list[int], list[int]]:
        """Per image: (native placeholder count, count after the method)."""
        raise NotImplementedError

    def install(self, undo: list) -> None:
        """Install the feature reduction (hooks / instance wrappers); append restore callables to undo."""
        raise NotImplementedError

    def placeholder_runs(self, call: dict) -> list[tuple[int, list[int], list[int]]]:
        """Per placeholder kind (image, video, ...): (token id, native counts, reduced counts), one count per item.

        Families with one kind keep the default; families with videos (Qwen2-VL, OneVision) list both."""
        return [(self.image_token_id(), *self.image_counts(call))]

    def pad_token_id(self) -> int:
        for cfg in (getattr(self.model, "generation_config", None), self.model.config,
                    getattr(self.model.config, "text_config", None)):
            pid = getattr(cfg, "pad_token_id", None) if cfg is not None else None
            if isinstance(pid, int):
                return pid
        return 0

    # -- in-LLM stage (vltok.inllm): what the engine needs to know about the family ----------------------------
    def language_model(self):
        """The decoder stack whose forward builds the masks / position embeddings and loops over the layers."""
        return self.model.model.language_model

    def decoder_layers(self):
        return self.language_model().layers

    def attention(self, layer):
        """A decoder layer's attention module: has q_proj / k_proj (pre-RoPE outputs), head_dim and scaling."""
        return layer.self_attn

    # the rotary convention of apply_rope: "rotate_half" (Llama / Qwen2; Qwen2-VL's M-RoPE too, whose sections HF
    # merges into the loop-level cos / sin [B, S, hd]) lets the engine fuse it into its scoring kernel; an adapter
    # that overrides apply_rope with another convention sets "custom" (the engine then calls apply_rope)
    rope_convention = "rotate_half"

    def apply_rope(self, q, k, cos, sin):
        """Rotate q, k [B, H, S, hd] with the loop-level cos / sin [B, S, hd] (rotate-half convention)."""
        from vltok.inllm import rotate_half_rope

        return rotate_half_rope(q, k, cos, sin)

    def visual_layout(self, call: dict) -> list:
        """Per sample, the list of vltok.inllm.VisualImage (sequence columns of the LLM input + grid) of the
        call as the LLM will see it (after any placeholder rewrite)."""
        raise NotImplementedError(f"{type(self).__name__} does not locate visual tokens for the in-LLM stage")

    def install_saliency(self, engine, undo: list) -> None:
        """Hook the vision tower so each grid gets a vision-side score (engine.set_saliency) before the LLM runs;
        return False when the family has none (the engine then warns and runs without it)."""
        return False

    # -- shared ----------------------------------------------------------------------------------------------
    def attach(self, undo: list) -> None:
        self.install_extras(undo)   # (before the adapter's hooks: a method's hook on a site sees the full grid)
        if self.method.pre_llm is not None or self.method.vision is not None:
            self.install(undo)
        if self.method.in_llm is not None:
            from vltok.inllm import InLLMEngine

            self.engine = InLLMEngine(self, self.method, self.handle)
            self.engine.attach(undo)
        model = self.model
        fwd, gen = model.forward, model.generate
        fsig, gsig = inspect.signature(fwd), inspect.signature(gen)
        positional = [p.name for p in fsig.parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]

        @functools.wraps(fwd)
        def forward(*args, **kwargs):
            if torch.compiler.is_compiling():   # traced by torch.compile (e.g. generate's compiled decode steps)
                return self._traced_forward(fwd, positional, args, kwargs)
            t0 = time.perf_counter()
            call = _bind(fsig, args, kwargs)
            call, _ = self._prepare_call(call, default_side="right", t0=t0)
            return fwd(**call)

        @functools.wraps(gen)
        def generate(*args, **kwargs):
            t0 = time.perf_counter()
            call = _bind(gsig, args, kwargs)
            if call.get("input_ids") is None and isinstance(call.get("inputs"), torch.Tensor):
                call["input_ids"] = call.pop("inputs")
            original_ids = call.get("input_ids")
            self._check_generate_mode(call)
            call, rw = self._prepare_call(call, default_side="left", t0=t0)
            new_len = None if rw is None else rw.new_len
            if rw is None and not self.has_pixels(call):   # continuing from a cache vltok filled (prompt_cache.py)
                call, shrink = self.prompt_caches.resume(call, compat.get_cache(call))
                if shrink:
                    new_len = original_ids.shape[1] - shrink
            if new_len is not None and original_ids is not None:
                self._shift_lengths(call, original_ids.shape[1] - new_len)
            self._in_generate = True
            try:
                out = gen(**call)
            finally:
                self._in_generate = False
            if new_len is None:
                return out
            if original_ids is None:   # from inputs_embeds only: the output holds the new tokens only
                return out
            seq = out if isinstance(out, torch.Tensor) else out.sequences
            if seq.shape[0] != original_ids.shape[0]:   # num_return_sequences: rows repeated per sample, in order
                original_ids = original_ids.repeat_interleave(seq.shape[0] // original_ids.shape[0], dim=0)
            cache = getattr(out, "past_key_values", None)
            cache = compat.get_cache(call) if cache is None else cache
            gc = call.get("generation_config") or getattr(self.model, "generation_config", None)
            beams = call.get("num_beams") or getattr(gc, "num_beams", 1) or 1   # (a beam cache's rows are beams)
            if cache is not None and beams == 1 and seq.shape[0] == original_ids.shape[0]:
                am = call.get("attention_mask")
                am = am[:, :new_len] if isinstance(am, torch.Tensor) and am.dim() == 2 else None
                if am is not None and am.shape[0] != seq.shape[0]:
                    am = am.repeat_interleave(seq.shape[0] // am.shape[0], dim=0)
                self.prompt_caches.remember(cache, original_ids, seq[:, :new_len], am)
            if isinstance(out, torch.Tensor):
                return restore_prompt(out, original_ids, new_len)
            out.sequences = restore_prompt(out.sequences, original_ids, new_len)
            return out

        set_instance_attr(model, "forward", forward, undo)
        set_instance_attr(model, "generate", generate, undo)

    def _check_generate_mode(self, call: dict) -> None:
        """Refuse assisted / prompt-lookup decoding with an in-LLM stage: it verifies several tokens per step and
        crops the cache to a common length, which the per-layer pruned caches do not have. (Pre-LLM and vision
        stages only shorten the prompt: every decoding mode works.)"""
        if self.engine is None or not self.has_pixels(call):
            return
        gc = call.get("generation_config") or getattr(self.model, "generation_config", None)
        used = [k for k in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")
                if call.get(k) is not None or getattr(gc, k, None) is not None]
        if used:
            raise IncompatibleError(
                f"{self.method.name} prunes tokens inside the LLM, so each layer's cache has its own length; assisted "
                f"decoding ({', '.join(used)}) crops the cache to one length and is not supported. Drop "
                f"{', '.join(used)}, use a pre-LLM method (e.g. 'pool', 'fourier'), or vltok.unpatch(model)")

    def _placeholder_ids(self, emb: torch.Tensor, runs=None) -> torch.Tensor:
        """For a call with inputs_embeds and no input_ids: [B, L] ids holding each placeholder kind's token id where
        the embedding row equals that token's embedding (as the model finds its placeholders then) and -1
        elsewhere, so the placeholder runs can be found and shrunk as in input_ids."""
        if runs is not None:
            token_ids = [r[0] for r in runs]
        else:   # (in-LLM methods: no counts to plan) every placeholder kind of the config
            video = getattr(self.model.config, "video_token_id", None)
            token_ids = [self.image_token_id()] + ([video] if isinstance(video, int) else [])
        table = self.model.get_input_embeddings()
        out = torch.full(emb.shape[:2], -1, dtype=torch.long, device=emb.device)
        with torch.no_grad():
            for tok in token_ids:
                row = table(torch.tensor(tok, dtype=torch.long, device=table.weight.device)).to(emb.device, emb.dtype)
                out.masked_fill_((emb == row).all(-1), tok)
        return out

    def _passes_through(self) -> bool:
        """Whether this patch leaves every call with images unchanged (keep=1.0 of a plain pre-LLM reducer): then
        a traced call needs none of the host-side work."""
        m = self.method
        return (m.identity and m.vision is None and m.in_llm is None and m.pre_llm is not None
                and not m.pre_llm.needed_sites())

    def _traced_forward(self, fwd, positional, args, kwargs):
        """The forward wrapper under torch.compile: only dynamo-traceable code on the paths where vltok has nothing
        to do (a call without images, e.g. a decode step; any call when the patch changes nothing); a call it must
        rewrite runs eagerly (a graph break: torch.compile(fullgraph=True) refuses it, naming the reason)."""
        call = dict(zip(positional, args))
        call.update(kwargs)
        if not self.has_pixels(call):
            if self.engine is not None and call.get("mm_encoder_outputs") is None:
                self.engine.no_images()
            return fwd(*args, **kwargs)
        if self._passes_through():
            if not self._in_generate:
                self.record.start_call()
            return fwd(*args, **kwargs)
        return _eager_forward(self, fwd, call)

    def _shift_lengths(self, call: dict, shrink: int) -> None:
        """Keep max_length / min_length meaning 'prompt + new tokens' for the caller's (longer) prompt."""
        gc = call.get("generation_config") or getattr(self.model, "generation_config", None)
        if call.get("max_new_tokens") is None and getattr(gc, "max_new_tokens", None) is None:
            max_len = call.get("max_length", getattr(gc, "max_length", None))
            if max_len is not None:
                call["max_length"] = max_len - shrink
        if call.get("min_new_tokens") is None and getattr(gc, "min_new_tokens", None) is None:
            min_len = call.get("min_length", getattr(gc, "min_length", 0)) or 0
            if min_len > 0:
                call["min_length"] = max(min_len - shrink, 0)

    def _prepare_call(self, call: dict, default_side: str, t0: float | None = None):
        """``prepare``, then the call as the LLM will see it noted for the sites' ``current_call()``."""
        call, rw = self.prepare(call, default_side, t0)
        ids = call.get("input_ids")
        prompt = self._call_info.prompt
        if not self._in_generate and ids is not None:   # generate(): the columns after the prompt are generated
            prompt = ids.shape[1]
        self._call_info = CallInfo(ids, call.get("labels"), prompt, self.has_pixels(call))
        return call, rw

    def has_pixels(self, call: dict) -> bool:
        """Whether the call brings images or videos (a decode step of generate() does not)."""
        return any(call.get(k) is not None for k in self.pixel_keys)

    def prepare(self, call: dict, default_side: str, t0: float | None = None):
        """The call as the model should see it (placeholder runs shrunk) and the rewrite (None: unchanged). The
        time from ``t0`` (the wrapper's start; this call's start when None) counts as time in vltok."""
        t0 = time.perf_counter() if t0 is None else t0
        if not self.has_pixels(call):
            if self.engine is not None and call.get("mm_encoder_outputs") is None:
                self.engine.no_images()   # (generate() hands precomputed image features as mm_encoder_outputs)
            return call, None
        ids, emb = call.get("input_ids"), call.get("inputs_embeds")
        if ids is None and emb is None:
            return call, None   # the model raises its own error
        am = call.get("attention_mask")
        if am is not None and am.dim() != 2:
            if not self._in_generate:
                raise IncompatibleError("vltok supports 2-D attention_mask only (the processor's); got a "
                                        f"{am.dim()}-D mask")
            # transformers 5.17's generate() with a static cache hands the prefill forward pixel_values and a 4-D
            # mask built from the 2-D one that the generate wrapper already rewrote (5.23 passes the pre-encoded
            # features instead): the call must need no further rewrite, checked without the 4-D mask
            call, rw = PlaceholderAdapter.prepare(self, {k: v for k, v in call.items() if k != "attention_mask"},
                                                  default_side, t0)
            if rw is not None:
                raise IncompatibleError("vltok supports 2-D attention_mask only (the processor's); got a "
                                        f"{am.dim()}-D mask")
            return {**call, "attention_mask": am}, None
        if not self._in_generate:
            self.record.start_call()
        if self.method.pre_llm is None and self.method.vision is None:   # in-LLM only: layer 0 keeps full length
            if self.engine is not None:
                find = call if ids is not None else {**call, "input_ids": self._placeholder_ids(emb)}
                self.engine.begin_call(find, self.visual_layout(find))
            self.record.seconds(time.perf_counter() - t0)
            return call, None
        runs = self.placeholder_runs(call)
        if ids is None and self.engine is None and all(native == new for _, native, new, *_ in runs):
            self.record.seconds(time.perf_counter() - t0)   # inputs_embeds, nothing to shrink: the model
            return call, None                                    # finds its placeholders as it would unpatched
        tensors = {k: call[k] for k in PER_TOKEN if isinstance(call.get(k), torch.Tensor)}
        if emb is not None:   # shrunk with the placeholder columns (its pad rows: zeros, masked out)
            tensors["inputs_embeds"] = emb
        # every placeholder kind (Qwen: images, then videos) in one pass: one read-back of input_ids / mask, the
        # index work on the host, one upload (vltok.rewrite.shrink_runs)
        find = ids if ids is not None else self._placeholder_ids(emb, runs)
        try:
            rw = shrink_runs(find, runs, tensors, self.pad_token_id(), default_side=default_side, add_mask=True)
        except IncompatibleError as e:
            if ids is not None:
                raise
            raise IncompatibleError(f"{e} (from inputs_embeds: a placeholder is a row equal to the placeholder "
                                    "token's embedding, as the model finds them)") from None
        if rw is not None:
            call = dict(call)
            call.update(rw.tensors if ids is not None else {k: v for k, v in rw.tensors.items() if k != "input_ids"})
            if call.get("position_ids") is not None:
                am = call.get("attention_mask")
                am = am if am is not None else torch.ones(rw.tensors["input_ids"].shape, dtype=torch.long,
                                                          device=call["position_ids"].device)
                call["position_ids"] = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)
            self.record.rewrite(rw)
        if self.engine is not None:   # the layout reads the rewrite's host copy of the ids (no second read-back)
            seen = call if ids is not None else {**call, "input_ids": find if rw is None else rw.tensors["input_ids"]}
            self.engine.begin_call(seen, self.visual_layout(seen if rw is None else {**call, "input_ids": rw.host_ids}))
        self.record.seconds(time.perf_counter() - t0)
        return call, rw


def _eager_forward(adapter, fwd, call):
    call, _ = adapter._prepare_call(call, default_side="right")
    return fwd(**call)


_NOT_TRACED = ("vltok shrinks the image placeholder runs on the host before the model runs; compile without "
               "fullgraph=True (a graph break), pass no images to the compiled forward, or use keep=1.0 with a "
               "pre-LLM method")
try:
    _eager_forward = torch._dynamo.disable(_eager_forward, reason=_NOT_TRACED)
except TypeError:   # torch without disable(reason=): the graph break still happens, without the reason
    _eager_forward = torch._dynamo.disable(_eager_forward)


def infer_grid(n_tokens: int, prefix: int) -> tuple[int, int]:
    side = int(round((n_tokens - prefix) ** 0.5))
    if side * side != n_tokens - prefix:
        raise IncompatibleError(f"cannot lay {n_tokens - prefix} visual tokens out as a square grid")
    return side, side
