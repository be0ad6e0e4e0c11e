"""Speed benchmark: full-size architectures with random bf16 weights on one GPU.

For each model x method x keep x batch: prefill time (TTFT), decode tokens/s, peak GPU memory and the time spent
inside vltok, next to the IDEAL row (the unpatched model fed the same number of visual tokens: its features are
computed in full and sliced for free) and the unpatched baseline; batch-1 TTFT through the CUDA-graph fast path
(vltok.fast.PrefillGraph). Timings are medians of CUDA-event measurements after warm-up; all ratios in a table
come from the same run.

    python -m vltok.eval.speed --models llava-1.5-7b llava-next-7b --out eval/results/speed-h100.md
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import vltok

TEXT_BEFORE, TEXT_AFTER = 35, 64


# -- inputs --------------------------------------------------------------------------------------------------------
QWEN_GRID = (1, 72, 104)   # patches; 36 x 52 = 1872 tokens after the 2x2 merger (a 1008 x 1456 image)


def make_inputs(model, family: str, batch: int, device, seed=0, grid=None):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    img = cfg.image_token_id

    def text(n):
        t = torch.randint(3, vocab - 1, (n,), generator=g)
        return t.masked_fill(t == img, 5)

    if family in ("llava", "llava_next"):
        vc = cfg.vision_config
        if family == "llava":
            n_img = (vc.image_size // vc.patch_size) ** 2
            pv = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
            extra = {}
        else:
            from vltok import compat

            image_size_to_num_patches = compat.image_size_to_num_patches("llava_next")

            from vltok.adapters.llava import llava_next_unpadded

            size = [672, 672]
            t = vc.image_size // vc.patch_size
            h_u, w_u = llava_next_unpadded(cfg, size)
            n_img = t * t + h_u * (w_u + 1)
            tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, vc.image_size)
            pv = torch.randn(batch, tiles, 3, vc.image_size, vc.image_size, generator=g)
            extra = {"image_sizes": torch.tensor([size] * batch)}
        ids = torch.stack([torch.cat([torch.tensor([1]), text(TEXT_BEFORE - 1), torch.full((n_img,), img),
                                      text(TEXT_AFTER)]) for _ in range(batch)])
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, **extra)
    elif family == "qwen2_vl":
        vc = cfg.vision_config
        t, h, w = grid or QWEN_GRID
        n_img = t * h * w // vc.spatial_merge_size ** 2
        row = torch.cat([text(TEXT_BEFORE - 1), torch.tensor([cfg.vision_start_token_id]), torch.full((n_img,), img),
                         torch.tensor([cfg.vision_end_token_id]), text(TEXT_AFTER)])
        ids = row.masked_fill((row == cfg.video_token_id), 5).expand(batch, -1).clone()
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == img).int(),
                   pixel_values=torch.randn(batch * t * h * w, patch_dim, generator=g),
                   image_grid_thw=torch.tensor([[t, h, w]] * batch))
    elif family == "blip2":   # the query placeholders first (as the processor puts them), then the prompt
        vc, img = cfg.vision_config, cfg.image_token_index
        row = torch.cat([torch.full((cfg.num_query_tokens,), img), torch.tensor([2]),
                         text(TEXT_BEFORE + TEXT_AFTER - 1)])
        ids = row.masked_fill(row == 1, 5).expand(batch, -1).clone()
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                   pixel_values=torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g))
    else:
        raise ValueError(f"no input builder for family {family!r}")
    dtype = model.dtype
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}


# -- timing --------------------------------------------------------------------------------------------------------
def time_ms(fn, cuda: bool | None = None) -> float:
    """Milliseconds of one fn() call: CUDA events (host clock without CUDA, for smoke tests)."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cuda_time(fn, warmup=2, reps=5) -> float:
    """Median milliseconds of fn() over reps: CUDA events after warm-up (host clock on CPU, for smoke tests)."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_ms(fn) for _ in range(reps))


def vltok_host_time(handle, fwd, reps: int = 5) -> float:
    """Host ms that vltok spends per call of fwd (median over reps): the handle's ``stats["seconds"]``, the host
    time of every vltok entry point of the call (the forward wrapper and placeholder rewrite, the reduction, every
    in-LLM layer hook). At batch 1 the eager prefill is bound by the host (launches), so this is what vltok adds to
    TTFT there."""
    host = []
    for _ in range(reps):   # each call starts on an idle GPU, as a request does (a call queued behind the last one
        if torch.cuda.is_available():   # would count the wait in vltok's one read-back as vltok's time)
            torch.cuda.synchronize()
        fwd()
        host.append(handle.stats.get("seconds", 0.0) * 1e3)
    return statistics.median(host)


def vltok_device_time(handle, fwd) -> float:
    """GPU ms of the kernels launched inside vltok's entry points per call of fwd (median of 3 profiled calls;
    torch.profiler attributes each kernel to the op that launched it, and vltok's entry points are wrapped in
    record_function ranges here). Run after every timing of a benchmark, so that no profiler state can touch the
    timed launches."""
    if not torch.cuda.is_available():
        return float("nan")
    from torch.profiler import ProfilerActivity, profile

    dev = []
    # the in-LLM cut runs eagerly here: the profiler then sees each of its kernels under vltok's ranges (a replayed
    # cut graph runs the same kernels, plus the copies of its inputs into the graph's buffers)
    with _eager_cut(handle), _vltok_ranges(handle):
        fwd()
        torch.cuda.synchronize()
        for _ in range(3):
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fwd()
                torch.cuda.synchronize()
            evs = [e for e in prof.events() if e.name.startswith("vltok::")
                   and e.device_type == torch.autograd.DeviceType.CPU]
            dev.append(sum(e.device_time_total for e in evs if not _has_vltok_parent(e)) / 1e3)
    return statistics.median(dev)


@contextlib.contextmanager
def _eager_cut(handle):
    """The handle's in-LLM cut run eagerly (``handle.cut_graphs = False``) for the duration, then restored."""
    old = handle.cut_graphs
    handle.cut_graphs = False
    try:
        yield
    finally:
        handle.cut_graphs = old


def _has_vltok_parent(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("vltok::"):
            return True
        p = p.cpu_parent
    return False


@contextlib.contextmanager
def _vltok_ranges(handle):
    """vltok's entry points (eval.tools.profile_vltok's list: the forward's rewrite, the reduction, the in-LLM hooks)
    inside record_function ranges."""
    from torch.profiler import record_function

    from vltok.eval.tools.profile_vltok import wrapped_entry_points

    def ranged(fn, name):
        @functools.wraps(fn)
        def inner(*a, **k):
            with record_function(f"vltok::{name}"):
                return fn(*a, **k)
        return inner

    with wrapped_entry_points(handle, ranged):
        yield


@contextlib.contextmanager
def ideal_features(model, counts):
    """The unpatched model keeps only the first counts[j] features of image j (free slicing, no reduction op)."""
    inner = model.model
    orig = inner.get_image_features

    @functools.wraps(orig)   # generate() selects this function's arguments by its signature
    def sliced(*a, **kw):
        out = orig(*a, **kw)
        out.pooler_output = [f[:k] for f, k in zip(out.pooler_output, counts)]
        return out

    inner.get_image_features = sliced
    try:
        yield
    finally:
        del inner.get_image_features


def measure(model, inputs, n_new, reps, run_forward=None):
    fwd = run_forward or (lambda: model(**inputs, logits_to_keep=1))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ttft = cuda_time(fwd, reps=reps)
    gen = lambda: model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)  # noqa: E731
    t_gen = cuda_time(gen, warmup=1, reps=max(1, reps // 2))
    steps = []
    for _ in range(max(1, reps // 2)):   # decode from per-step marks, not (generate - TTFT): see decode_bench
        steps += generate_steps(model, inputs, n_new)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    decode = 1e3 / statistics.median(steps) if steps else float("nan")
    return dict(ttft_ms=ttft, gen_ms=t_gen, decode_tok_s=decode, peak_gib=peak)


# -- decode: per-step timing, interleaved rows ---------------------------------------------------------------------
def _step_clock_class():
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        """A stopping criterion that never stops and marks the end of every generation step: a CUDA event (recorded
        on the stream, no sync) on the GPU, a synced perf_counter elsewhere. Consecutive marks bound one decode step
        (the forward on the new token plus generate's own per-token work)."""

        def __init__(self, device):
            self.cuda = torch.device(device).type == "cuda"
            self.marks = []

        def __call__(self, input_ids, scores, **kwargs):
            if self.cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                self.marks.append(e)
            else:
                self.marks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        def step_ms(self) -> list[float]:
            if self.cuda:
                torch.cuda.synchronize()
                return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
            return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]

    return StepClock


def generate_steps(model, inputs, n_new) -> list[float]:
    """Milliseconds of each decode step of one greedy ``generate`` of ``n_new`` tokens (n_new - 1 steps: the first
    token comes from the prefill)."""
    from transformers import StoppingCriteriaList

    dev = inputs["input_ids"].device
    clock = _step_clock_class()(dev)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
    return clock.step_ms()


def _module_hooks(model) -> set:
    return {(id(m), kind, k) for m in model.modules() for kind in ("_forward_pre_hooks", "_forward_hooks")
            for k in getattr(m, kind)}


@contextlib.contextmanager
def vltok_host_per_call(model, before: set):
    """Host seconds spent inside vltok per forward call of ``model`` (a list, one entry per call, filled while the
    context is open): vltok's forward wrapper work (argument binding, ``prepare``: the placeholder rewrite, the
    in-LLM engine's call set-up) and every module hook vltok registered (``before``: the hooks present before the
    patch; e.g. the in-LLM engine's per-layer decode hooks, which gather each layer's mask). Nested vltok code
    counts once. The timers cost ~0.1 us per call: measure in separate runs, never inside timed ones."""
    from vltok.adapters import base

    handle = vltok.get_handle(model)
    per_call, depth, undo = [], [0], []

    def timed(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            if depth[0] or not per_call:
                return fn(*a, **k)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                per_call[-1] += time.perf_counter() - t0
        return inner

    def boundary(module, args, kwargs):
        per_call.append(0.0)

    try:
        for m in model.modules():
            for kind in ("_forward_pre_hooks", "_forward_hooks"):
                d = getattr(m, kind)
                for k, fn in list(d.items()):
                    if (id(m), kind, k) not in before:
                        d[k] = timed(fn)
                        undo.append(lambda d=d, k=k, fn=fn: d.__setitem__(k, fn))
        cls = type(handle.adapter)
        prep = cls.prepare
        cls.prepare = timed(prep)
        undo.append(lambda: setattr(cls, "prepare", prep))
        bind = base._bind
        base._bind = timed(bind)
        undo.append(lambda: setattr(base, "_bind", bind))
        h = model.register_forward_pre_hook(boundary, with_kwargs=True, prepend=True)
        undo.append(h.remove)
        yield per_call
    finally:
        while undo:
            undo.pop()()


def _ideal_inputs(model, family, inputs, methods, keep):
    """(visual tokens per image, rewritten inputs) of the first pre-LLM method that patches: the IDEAL row feeds the
    unpatched model that many (sliced) features; None where no IDEAL applies."""
    if family in ("qwen2_vl", "blip2"):
        return None
    for m in methods:
        try:
            h = vltok.patch(model, m, keep=keep)
        except vltok.VltokError:
            continue
        try:
            if h.method.pre_llm is not None:
                counts = h.adapter.image_counts(inputs)[1]
                prep, _ = h.adapter.prepare(dict(inputs), default_side="left")
                return counts, prep
        finally:
            h.remove()
    return None


def decode_bench(model, name, family, methods, keep, batch, n_new=64, rounds=5, device="cuda"):
    """Decode speed per step: greedy ``generate`` of ``n_new`` tokens, each decode step timed by CUDA events
    (synced perf_counter on CPU), for the unpatched model, IDEAL (the unpatched model fed the tokens a pre-LLM method
    keeps) and each method at ``keep``. The rows are interleaved: each of ``rounds`` rounds runs every row once, in
    an order rotated by one per round, so drifts (clocks, thermals, allocator state) spread over all rows instead of
    landing on whichever ran last. vltok's own host time per decode step comes from one extra, instrumented run per
    method (vltok_host_per_call), kept out of the timed runs."""
    inputs = make_inputs(model, family, batch, device)
    ideal = _ideal_inputs(model, family, inputs, methods, keep)
    runners, kinds, errors = {}, {}, {}

    def patched_run(method):
        def run():
            with vltok.patched(model, method, keep=keep):
                return generate_steps(model, inputs, n_new)
        return run

    runners["unpatched"] = lambda: generate_steps(model, inputs, n_new)
    kinds["unpatched"] = "baseline"
    if ideal is not None:
        counts, prep = ideal

        def run_ideal():
            with ideal_features(model, counts):
                return generate_steps(model, prep, n_new)
        runners["IDEAL"], kinds["IDEAL"] = run_ideal, "baseline"
    for m in methods:
        try:
            with vltok.patched(model, m, keep=keep) as h:
                kinds[m] = "in_llm" if h.method.in_llm is not None else "pre_llm"
        except vltok.VltokError as e:
            errors[m] = f"{type(e).__name__}: {e}"
            continue
        runners[m] = patched_run(m)
    names = list(runners)
    steps = {n: [] for n in names}
    for n in names:   # warm-up: caches, autotuning, allocator growth
        try:
            runners[n]()
        except Exception as e:  # one broken row must not sink the run: record it
            errors[n] = f"{type(e).__name__}: {e}"
    names = [n for n in names if n not in errors]
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for n in order:
            steps[n] += runners[n]()
    host = {}
    for n in names:
        if kinds[n] == "baseline":
            continue
        before = _module_hooks(model)
        with vltok.patched(model, n, keep=keep), vltok_host_per_call(model, before) as per_call:
            generate_steps(model, inputs, n_new)
        host[n] = statistics.median(per_call[1:]) * 1e6 if len(per_call) > 1 else float("nan")   # [0]: prefill
    rows = []
    base = statistics.median(steps["unpatched"]) if steps.get("unpatched") else None
    ref = statistics.median(steps["IDEAL"]) if steps.get("IDEAL") else None
    for n in names:
        st = sorted(steps[n])
        med = statistics.median(st)
        q = lambda f: st[min(len(st) - 1, int(f * len(st)))]  # noqa: E731
        row = dict(model=name, batch=batch, keep=keep, row=n, kind=kinds[n], steps=len(st), decode_ms=med,
                   decode_ms_mean=statistics.fmean(st), p10_ms=q(0.1), p90_ms=q(0.9), steps_per_s=1e3 / med,
                   tok_s=batch * 1e3 / med, vs_unpatched=med / base if base else None,
                   vs_ideal=med / ref if ref else None, timer="cuda events" if st and torch.device(
                       inputs["input_ids"].device).type == "cuda" else "perf_counter (synced)")
        if n in host:
            row["host_us"] = host[n]
            row["host_pct"] = 100 * host[n] / 1e3 / med
        rows.append(row)
        print(json.dumps(row), flush=True)
    for n, e in errors.items():
        rows.append(dict(model=name, batch=batch, keep=keep, row=n, kind=kinds.get(n, "?"), error=e[:300]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


DECODE_TARGET = {"pre_llm": 1.0, "in_llm": 3.0}   # % of a decode step that vltok may add (issue 14)


def decode_markdown(rows, header) -> str:
    lines = [header, "",
             "| model | batch | keep | row | decode ms/step (median) | p10-p90 ms | steps/s | tok/s (batch x steps/s) "
             "| vs unpatched | vs IDEAL | vltok host us/step | host share | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['batch']} | {r['keep']:.2f} | {r['row']} | FAILED: "
                         f"{r['error'][:120].replace('|', '/')} | | | | | | | | | |")
            continue
        target = DECODE_TARGET.get(r["kind"])
        share = r.get("host_pct")
        ratio = lambda x: "-" if x is None else f"{x:.3f}x"  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['keep']:.2f} | {r['row']} | {r['decode_ms']:.3f} | "
            f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f} | {r['steps_per_s']:.1f} | {r['tok_s']:.1f} | "
            f"{ratio(r.get('vs_unpatched'))} | {ratio(r.get('vs_ideal'))} | "
            + ("-" if share is None else f"{r['host_us']:.1f}") + " | "
            + ("-" if share is None else f"{share:.2f}%") + " | "
            + ("-" if target is None else f"< {target:g}%") + " | "
            + ("-" if target is None or share is None else ("yes" if share < target else "no")) + " |")
    lines += ["", f"Each row: {rows[0].get('steps', '?') if rows else '?'} decode steps (greedy generate, rounds "
              "interleaved across rows), timed per step; vltok host us/step: the median host time inside vltok's "
              "entry points per decode step (an extra instrumented run); host share = that / the row's median step."]
    return "\n".join(lines)


def bench_model(name, methods, keeps, batches, n_new, reps, fast, model=None, family=None, device="cuda"):
    if model is None:
        from vltok.eval import configs

        model = configs.build_random(name, device=device, dtype=torch.bfloat16)
        family = configs.family(name)
    rows, profile_later = [], []
    for batch in batches:
        inputs = make_inputs(model, family, batch, device)
        with torch.no_grad():   # first-use costs (cuBLAS handles and autotuning, allocator growth) stay out
            for _ in range(3):
                model(**inputs, logits_to_keep=1)
            model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            base = measure(model, inputs, n_new, reps)
        base.update(model=name, batch=batch, method="none", keep=1.0, visual_tokens=None, vltok_ms=0.0)
        rows.append(base)
        print(json.dumps(base), flush=True)
        for keep in keeps:
            ideal_done = False
            for method in methods:
                try:
                    handle = vltok.patch(model, method, keep=keep)
                except vltok.VltokError as e:
                    print(f"skip {name} {method}: {e}", flush=True)
                    continue
                failed = None
                try:
                    with torch.no_grad():
                        model(**inputs, logits_to_keep=1)     # compiles / caches first, outside the timed run
                        host_ms = vltok_host_time(handle, lambda: model(**inputs, logits_to_keep=1))
                        stats = dict(handle.stats)
                        r = measure(model, inputs, n_new, reps)
                        new_counts = prep = None
                        if handle.method.pre_llm is not None and family not in ("qwen2_vl", "blip2"):
                            new_counts = handle.adapter.image_counts(inputs)[1]
                            prep, _ = handle.adapter.prepare(dict(inputs), default_side="left")
                        images = stats.get("images") or [{}]
                        grid_out = (images[0].get("grids_out") or [None])[0]
                except Exception as e:  # one broken method must not sink the whole run: record it
                    failed = f"{type(e).__name__}: {e}"
                finally:
                    handle.remove()
                if failed is not None:
                    rows.append(dict(model=name, batch=batch, method=method, keep=keep, ttft_ms=float("nan"),
                                     error=failed[:300]))
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                r.update(model=name, batch=batch, method=method, keep=keep, visual_tokens=stats["tokens_out"] // batch,
                         flops_keep=stats.get("flops_keep"), vltok_ms=host_ms)
                r["vltok_pct"] = 100 * r["vltok_ms"] / r["ttft_ms"]
                profile_later.append((r, method, keep, inputs))
                r["speedup"] = base["ttft_ms"] / r["ttft_ms"]
                rows.append(r)
                print(json.dumps(r), flush=True)
                if ideal_done or handle.method.pre_llm is None:
                    continue
                if new_counts is not None:
                    ideal_done = True
                    with torch.no_grad(), ideal_features(model, new_counts):
                        ideal = measure(model, prep, n_new, reps)
                    n_vis = sum(new_counts) // batch
                elif family == "qwen2_vl" and grid_out is not None and len(grid_out) == 3:
                    # Qwen: the unpatched model fed an image whose merged grid is the reduced one; its ViT also
                    # runs on fewer patches, so this IDEAL is optimistic (the ratio to it is conservative)
                    ideal_done = True
                    t, r_h, r_w = grid_out
                    small = make_inputs(model, family, batch, device, grid=(t, 2 * r_h, 2 * r_w))
                    with torch.no_grad():
                        ideal = measure(model, small, n_new, reps)
                    n_vis = t * r_h * r_w
                else:
                    continue
                ideal.update(model=name, batch=batch, method="IDEAL", keep=keep, visual_tokens=n_vis, vltok_ms=0.0)
                ideal["speedup"] = base["ttft_ms"] / ideal["ttft_ms"]
                rows.append(ideal)
                print(json.dumps(ideal), flush=True)
        if fast and batch == 1 and family == "llava":
            rows += bench_fast(model, inputs, name, methods, keeps, reps)
    for r, method, keep, inputs in profile_later:   # the profiler last: it slows the host down afterwards
        with vltok.patched(model, method, keep=keep) as handle, torch.no_grad():
            model(**inputs, logits_to_keep=1)
            dev_ms = vltok_device_time(handle, lambda: model(**inputs, logits_to_keep=1))
        if math.isnan(dev_ms):   # no CUDA: no device profile (the row says "not measured", never "nan%")
            continue
        r["vltok_dev_ms"], r["vltok_dev_pct"] = dev_ms, 100 * dev_ms / r["ttft_ms"]
        print(json.dumps({k: r[k] for k in ("model", "batch", "method", "keep", "vltok_dev_ms")}), flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def bench_fast(model, inputs, name, methods, keeps, reps):
    from vltok.fast import PrefillGraph

    rows = []
    args = dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    fast0 = PrefillGraph(model)
    with torch.no_grad():
        base = cuda_time(lambda: fast0(**args), reps=reps)
    rows.append(dict(model=name, batch=1, method="none+fast", keep=1.0, ttft_ms=base, speedup=1.0))
    print(json.dumps(rows[-1]), flush=True)
    for keep in keeps:
        for method in methods:
            if method not in ("fourier", "pool", "random", "feather", "fastv"):
                continue
            with vltok.patched(model, method, keep=keep), torch.no_grad():
                fast = PrefillGraph(model)
                t = cuda_time(lambda: fast(**args), reps=reps)
            rows.append(dict(model=name, batch=1, method=f"{method}+fast", keep=keep, ttft_ms=t, speedup=base / t))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows, header):
    lines = [header, "", "| model | batch | method | keep | visual tok | FLOPs keep | TTFT ms | speedup vs unpatched | "
             "decode tok/s | peak GiB | in vltok: host ms (% of TTFT) | in vltok: device ms (% of TTFT) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['batch']} | {r['method']} | {r['keep']:.2f} | FAILED: "
                         f"{r['error'][:120].replace('|', '/')} | | | | | | | |")
            continue
        fk = r.get("flops_keep")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['method']} | {r['keep']:.2f} | {r.get('visual_tokens') or '-'} | "
            f"{'-' if fk is None else f'{fk:.3f}'} | {r['ttft_ms']:.2f} | {r.get('speedup', 1.0):.2f}x | "
            f"{r.get('decode_tok_s', float('nan')):.1f} | {r.get('peak_gib', float('nan')):.2f} | "
            + (f"{r['vltok_ms']:.3f} ({r.get('vltok_pct', 0):.2f}%)" if r.get("vltok_ms") else "-") + " | "
            + (f"{r['vltok_dev_ms']:.3f} ({r.get('vltok_dev_pct', 0):.2f}%)"
               if r.get("vltok_dev_ms") is not None and not math.isnan(r["vltok_dev_ms"]) else "-") + " |")
    return "\n".join(lines)


def targets(rows, keep=0.16) -> str:
    """The issue's targets, as ratios computed from one run's rows (no number typed by hand)."""
    def find(model, batch, method):
        return next((r for r in rows if r["model"] == model and r["batch"] == batch and r["method"] == method
                     and abs(r["keep"] - keep) < 1e-9 and not r.get("error")), None)

    def base(model, batch, method="none"):
        return next((r for r in rows if r["model"] == model and r["batch"] == batch and r["method"] == method
                     and r["keep"] == 1.0 and not r.get("error")), None)

    out = [f"## Targets at keep {keep} (ratios from this run)", "",
           "| target | model | batch | method | measured | target | met |", "|---|---|---|---|---|---|---|"]
    methods = sorted({r["method"] for r in rows} - {"none", "IDEAL"} - {m for m in {r["method"] for r in rows}
                                                                         if m.endswith("+fast")})
    for model, batch in [("llava-1.5-7b", 8), ("llava-next-7b", 1), ("qwen2-vl-7b", 1)]:
        ideal = find(model, batch, "IDEAL")
        for m in methods:
            r = find(model, batch, m)
            if r is None or ideal is None:
                continue
            ratio = r["speedup"] / ideal["speedup"]
            out.append(f"| prefill speedup / IDEAL speedup | {model} | {batch} | {m} | {r['speedup']:.2f}x / "
                       f"{ideal['speedup']:.2f}x = {ratio:.2f} | >= 0.9 | {'yes' if ratio >= 0.9 else 'no'} |")
    for r in rows:
        if abs(r["keep"] - keep) < 1e-9 and r.get("vltok_ms") and not r.get("error") and r["method"] in methods:
            b = base(r["model"], r["batch"])
            vs_base = f" ({100 * r['vltok_ms'] / b['ttft_ms']:.1f}% of unpatched)" if b else ""
            dev = r.get("vltok_dev_pct")   # absent (or nan in older JSON) where no device profile ran (no CUDA)
            has_dev = dev is not None and not math.isnan(dev)
            if has_dev:
                met = "yes" if r["vltok_pct"] < 2 and dev < 2 else ("device time only" if dev < 2 else "no")
            else:
                met = "host yes, device not measured" if r["vltok_pct"] < 2 else "no"
            out.append(f"| time in vltok / prefill | {r['model']} | {r['batch']} | {r['method']} | host "
                       f"{r['vltok_pct']:.1f}% of patched TTFT{vs_base}, device "
                       f"{f'{dev:.2f}%' if has_dev else 'not measured'} | < 2% | {met} |")
    for m in methods:   # the fast path replays a graph: no vltok host work per call, the same device work
        r, e = find("llava-1.5-7b", 1, f"{m}+fast"), find("llava-1.5-7b", 1, m)
        if r is not None and e is not None and e.get("vltok_dev_ms") is not None:
            pct = 100 * e["vltok_dev_ms"] / r["ttft_ms"]
            out.append(f"| time in vltok / prefill, fast path | llava-1.5-7b | 1 | {m} | host 0 (graph replay), "
                       f"device {e['vltok_dev_ms']:.3f} ms = {pct:.2f}% of {r['ttft_ms']:.1f} ms | < 2% | "
                       f"{'yes' if pct < 2 else 'no'} |")
    fb = base("llava-1.5-7b", 1, "none+fast")
    e = base("llava-1.5-7b", 1)
    for m in methods:
        r = find("llava-1.5-7b", 1, f"{m}+fast")
        if r is not None and fb is not None:
            sp = e["ttft_ms"] / r["ttft_ms"] if e else float("nan")
            out.append(f"| batch-1 TTFT speedup, fast path | llava-1.5-7b | 1 | {m} | {fb['ttft_ms']:.1f} -> "
                       f"{r['ttft_ms']:.1f} ms = {r['speedup']:.2f}x (vs eager unpatched {sp:.2f}x) | >= 2.5x | "
                       f"{'yes' if r['speedup'] >= 2.5 else 'no'} |")
    return "\n".join(out)


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Model names, method names and keeps checked before anything is built (a GPU is not needed to be told a name
    is wrong); a method that does not fit a model is not an error here: its rows record why."""
    from vltok.cli_args import check_method
    from vltok.errors import VltokError
    from vltok.eval import configs

    try:
        for name in args.models:
            configs.family(name)
        for method in args.methods:
            for keep in args.keeps:
                check_method(method, keep)
    except (VltokError, ValueError) as e:
        ap.error(str(e))


def main(argv=None, prog="vltok bench"):   # python -m vltok.eval.speed is the same command
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llava-1.5-7b", "llava-next-7b"])
    ap.add_argument("--methods", nargs="+", default=["fourier", "pool", "random"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.5, 0.25, 0.16, 0.11])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-fast", action="store_true")
    ap.add_argument("--out", default=None, help="Markdown file to write")
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode", action="store_true",
                    help="decode speed only: per-step timing of every method next to the unpatched model and IDEAL, "
                    "rows interleaved over --rounds rounds, vltok's host time per step (writes --out / --json)")
    ap.add_argument("--rounds", type=int, default=5, help="--decode: interleaved rounds per row")
    ap.add_argument("--summarize", default=None, metavar="JSON",
                    help="print the targets table of an earlier run's JSON (no GPU needed) and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as f:
            print(targets(json.load(f)))
        return
    from vltok.eval import configs

    check_args(ap, args)
    if not torch.cuda.is_available():
        sys.exit("vltok bench needs a CUDA GPU (it builds 7B-size models with random bf16 weights)")
    import transformers

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "not installed"
    header = (f"# vltok speed benchmark\n\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
              f"transformers {transformers.__version__}; triton {tv}; python {platform.python_version()}; "
              f"random bf16 weights, sdpa; prompt = {TEXT_BEFORE} text + image + {TEXT_AFTER} text tokens; "
              f"{args.new_tokens} new tokens; medians of {args.reps} CUDA-event timings after warm-up.\n\n"
              f"command: python -m vltok.eval.speed {' '.join(argv if argv is not None else sys.argv[1:])}")
    rows = []
    for path in (args.out, args.json):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.decode:
        for name in args.models:
            model = configs.build_random(name, device="cuda", dtype=torch.bfloat16)
            for batch in args.batches:
                for keep in args.keeps:
                    rows += decode_bench(model, name, configs.family(name), args.methods, keep, batch,
                                         n_new=args.new_tokens, rounds=args.rounds)
            del model
            torch.cuda.empty_cache()
        md = decode_markdown(rows, header.replace("# vltok speed benchmark", "# vltok decode benchmark").replace(
            f"medians of {args.reps} CUDA-event timings after warm-up", f"{args.rounds} interleaved rounds per row "
            "after a warm-up run, every decode step timed by CUDA events"))
        print(md)
        if args.out:
            with open(args.out, "w") as f:
                f.write(md + "\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    for name in args.models:
        rows += bench_model(name, args.methods, args.keeps, args.batches if configs.family(name) == "llava" else [1],
                            args.new_tokens, args.reps, not args.no_fast)
    md = markdown(rows, header) + "\n\n" + targets(rows)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
