"""CPU profile of vltok's own work per forward: time inside vltok and host syncs, on a narrow LLaVA-1.5.

The model has LLaVA-1.5's token layout (CLIP 336/14: 576 visual tokens, the speed benchmark's prompt of 35 + 576 +
64 tokens) with narrow layers, so the per-layer Python work, launches and host syncs of vltok weigh as they would
at batch 8 on the GPU without the 7B matmuls. A *host sync* is an op that makes the host wait for the device on
CUDA: ``.item()`` / ``bool()`` / ``int()`` of a tensor, ``.tolist()``, ``nonzero``, boolean-mask indexing,
``unique``, ``masked_select``; counted at the dispatcher (CPU counts equal CUDA counts) only while vltok code runs
(the engine's hooks, the adapter's prepare step, the vision merge, the pre-LLM reduction).

    python -m vltok.eval.tools.profile_vltok --methods fourier pool feather fastv tome --keep 0.16 --batch 8
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
            "aten._unique2.default", "aten.unique_dim.default", "aten.unique_consecutive.default",
            "aten.repeat_interleave.Tensor"}


class SyncCounter(TorchDispatchMode):
    """Counts ops that force a device-to-host sync on CUDA, while ``self.depth > 0`` (or always, ``scoped=False``).
    ``.tolist()`` bypasses the dispatcher and is counted by a wrapper on ``torch.Tensor.tolist``."""

    def __init__(self, scoped=True):
        super().__init__()
        self.scoped, self.depth, self.count, self.where = scoped, 0, 0, {}

    suppress = 0

    def hit(self, name):
        if self.suppress:
            return
        if not self.scoped or self.depth > 0:
            self.count += 1
            self.where[name] = self.where.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS:
            self.hit(name)
        elif name.startswith(("aten.index.Tensor", "aten.index_put")):
            idx = args[1] if len(args) > 1 else ()
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (idx or ())):
                self.hit(name + " (bool mask)")
        return func(*args, **(kwargs or {}))


def vltok_entry_points(handle):
    """(owner, attribute) of the functions through which vltok code runs during a forward."""
    from vltok.adapters.base import PlaceholderAdapter
    from vltok.inllm import InLLMEngine

    out = [(InLLMEngine, n) for n in ("_lm_start", "_lm_end", "_prefill_layer", "begin_call", "set_saliency")]
    out.append((PlaceholderAdapter, "prepare"))
    m = handle.method
    if m.vision is not None:
        out.append((m.vision, "merge"))
    if m.pre_llm is not None:   # a GridReducer implements exactly one of reduce / select (vltok.stages.run_reducer)
        out.append((m.pre_llm, "reduce" if callable(getattr(type(m.pre_llm), "reduce", None)) else "select"))
    adapter = getattr(handle, "adapter", None)
    out += [(adapter, n) for n in ("_cls_row", "_text_embeds") if adapter is not None and hasattr(adapter, n)]
    return out


@contextlib.contextmanager
def count_syncs(handle=None, scoped=True):
    """``with count_syncs(handle) as c: model(...)`` -> ``c.count`` host syncs inside vltok code (``c.where``: by op).
    With ``scoped=False`` every sync of the forward counts (the model's own included)."""
    counter = SyncCounter(scoped=scoped)

    def depth(fn, name):
        @functools.wraps(fn)
        def inner(*a, **k):
            counter.depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter.depth -= 1
        return inner

    undo = []
    # a function of vltok.inllm / vltok.rewrite marked ``_vltok_host = n`` works on host tensors after n read-backs
    # (device-to-host copies, which the dispatcher does not flag): n syncs
    import vltok.inllm as inllm
    import vltok.rewrite as rewrite

    def host_wrap(fn, n, label):
        @functools.wraps(fn)
        def inner(*a, **k):
            for _ in range(n):
                counter.hit(label)
            counter.suppress += 1
            try:
                return fn(*a, **k)
            finally:
                counter.suppress -= 1
        return inner

    for mod in (inllm, rewrite):
        for name, fn in list(vars(mod).items()):
            n = getattr(fn, "_vltok_host", None)
            if callable(fn) and n is not None:
                setattr(mod, name, host_wrap(fn, int(n), f"{name} readback"))
                undo.append((mod, name, fn))
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        counter.hit("Tensor.tolist")
        return tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with (wrapped_entry_points(handle, depth) if scoped else contextlib.nullcontext()), counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist
        for mod, name, fn in reversed(undo):
            setattr(mod, name, fn)


@contextlib.contextmanager
def wrapped_entry_points(handle, wrap):
    """Each of vltok's entry points (``vltok_entry_points``) replaced by ``wrap(fn, name)`` for the duration; class
    and instance attributes are restored exactly (an attribute the owner did not hold itself is deleted again)."""
    undo = []
    try:
        for owner, name in vltok_entry_points(handle):
            orig = getattr(owner, name)
            undo.append((owner, name, orig, name in vars(owner)))
            setattr(owner, name, wrap(orig, name))
        yield
    finally:
        for owner, name, orig, had in reversed(undo):
            if had:
                setattr(owner, name, orig)
            else:
                delattr(owner, name)


def narrow_llava(layers=8, width=256, vision_layers=4, seed=0):
    """LLaVA-1.5's layout (CLIP 336/14, 576 tokens, Llama decoder) with narrow random layers, fp32, sdpa."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from vltok.eval.configs import CLIP_L_336, LLAMA_7B

    torch.manual_seed(seed)
    vis = dict(CLIP_L_336, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=vision_layers,
               num_attention_heads=4)
    txt = dict(LLAMA_7B, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=8, vocab_size=32064)
    cfg = LlavaConfig(vision_config=vis, text_config=txt, image_token_index=32000, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=576, tie_word_embeddings=False)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation("sdpa")
    return m


def profile(model, inputs, method, keep, reps, **kw):
    import vltok

    with vltok.patched(model, method, keep=keep, **kw) as h, torch.no_grad():
        model(**inputs, logits_to_keep=1)
        with count_syncs(h) as c:
            model(**inputs, logits_to_keep=1)
        with count_syncs(h, scoped=False) as c_all:
            model(**inputs, logits_to_keep=1)
        vt, tot = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            tot.append((time.perf_counter() - t0) * 1e3)
            vt.append(h.stats["seconds"] * 1e3)
        return dict(method=method, keep=keep, vltok_ms=statistics.median(vt), forward_ms=statistics.median(tot),
                    syncs_vltok=c.count, syncs_forward=c_all.count, where=dict(c.where),
                    tokens_out=h.stats.get("tokens_out"))


def main(argv=None):
    from vltok.eval.speed import make_inputs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["fourier", "pool", "feather", "fastv", "tome"])
    ap.add_argument("--keep", type=float, default=0.16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = narrow_llava(args.layers, args.width)
    inputs = make_inputs(model, "llava", args.batch, "cpu")
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
        with count_syncs(scoped=False) as c0:
            model(**inputs, logits_to_keep=1)
        t = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            t.append((time.perf_counter() - t0) * 1e3)
    print(f"narrow LLaVA-1.5 layout: {args.layers} LLM layers of width {args.width}, batch {args.batch}, "
          f"{inputs['input_ids'].shape[1]} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"unpatched: forward {statistics.median(t):.1f} ms, host syncs in the forward {c0.count}")
    print("| method | keep | tokens out | forward ms | in vltok ms | host syncs in vltok | host syncs in forward |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        kw = dict(K=1) if method == "fastv" else {}
        r = profile(model, inputs, method, args.keep, args.reps, **kw)
        print(f"| {method} | {args.keep} | {r['tokens_out']} | {r['forward_ms']:.1f} | {r['vltok_ms']:.2f} | "
              f"{r['syncs_vltok']} | {r['syncs_forward']} |", flush=True)
        if r["where"]:
            print(f"|   | syncs by op: {r['where']} | | | | | |")


if __name__ == "__main__":
    main()
