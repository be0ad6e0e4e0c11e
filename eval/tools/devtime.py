"""Batch-1 prefill as GPU kernel time: the summed device time of every kernel of one forward (torch.profiler,
median of 3), next to the wall TTFT (CUDA events, median of 9); keep 0.16: unpatched, pool, fourier, feather,
fastv and IDEAL, on full-size architectures with random bf16 weights.

    python -m vltok.eval.tools.devtime llava-next-7b qwen2-vl-7b

Why: at batch 1 the eager forward is bound by the host's kernel launches (LLaVA-NeXT-7B at keep 0.16: ~25 ms of
GPU kernels under ~80 ms of host time on the lent H100), so wall-clock ratios against IDEAL mostly measure Python
and launch jitter; kernel time measures what the reduction saves on the device. IDEAL is eval.speed's: LLaVA
families get the unpatched model with the features sliced to the reduced counts; Qwen gets an image whose merged
grid is the reduced one (its ViT shrinks too, so that IDEAL is optimistic); the row "IDEAL, full ViT" swaps the
full image's ViT kernel time in for the small image's (ViT and merger timed alone), and the ratio column uses it.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import vltok
from vltok.eval import configs
from vltok.eval.tools.profile_fast import kernel_table
from vltok.eval.speed import cuda_time, ideal_features, make_inputs

METHODS = ("pool", "fourier", "feather", "fastv")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"feather"`` or ``"feather:layers=(2,6),a=0.3"`` -> (name, keyword arguments as Python literals)."""
    import ast

    name, _, rest = spec.partition(":")
    kw = {}
    for part in filter(None, _split_top(rest)):
        key, eq, val = part.partition("=")
        if not eq:
            raise SystemExit(f"devtime: method spec {spec!r}: expected key=value after ':', got {part!r}")
        kw[key.strip()] = ast.literal_eval(val.strip())
    return name, kw


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets ("layers=(2,6),a=0.3" -> two parts)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def kernel_ms(fn, reps: int = 3) -> float:
    """Median over reps of the summed device time of the kernels one fn() launches (eval.tools.profile_fast's table)."""
    return statistics.median(kernel_table(fn, reps=1)[0] for _ in range(reps))


def ideal_run(model, handle, family, inputs):
    """(inputs, context manager) of the IDEAL row for the counts the patched ``handle`` produced."""
    import contextlib

    if family == "qwen2_vl":
        t, r_h, r_w = handle.stats["images"][0]["grids_out"][0]
        return make_inputs(model, family, 1, "cuda", grid=(t, 2 * r_h, 2 * r_w)), contextlib.nullcontext()
    counts = handle.adapter.image_counts(inputs)[1]
    prep, _ = handle.adapter.prepare(dict(inputs), default_side="left")
    return prep, ideal_features(model, counts)


def bench(name: str, keep: float = 0.16, methods=METHODS) -> list[tuple[str, float, float]]:
    family = configs.family(name)
    model = configs.build_random(name, device="cuda", dtype=torch.bfloat16)
    inputs = make_inputs(model, family, 1, "cuda")
    fwd = lambda: model(**inputs, logits_to_keep=1)  # noqa: E731
    rows = []
    with torch.no_grad():
        for _ in range(3):
            fwd()
        rows.append(("none", kernel_ms(fwd), cuda_time(fwd, reps=9)))
        ideal = None
        for spec in methods:
            method, kw = parse_spec(spec)
            fixed = vltok.registry.get(method).fixed_budget(kw) is not None   # e.g. "feather:a=0.3": a decides
            with vltok.patched(model, method, keep=None if fixed else keep, **kw) as h:
                for _ in range(3):
                    fwd()
                rows.append((spec, kernel_ms(fwd), cuda_time(fwd, reps=9)))
                if ideal is None and h.method.pre_llm is not None:
                    ideal = ideal_run(model, h, family, inputs)
        ideal_inputs, ctx = ideal
        fn = lambda: model(**ideal_inputs, logits_to_keep=1)  # noqa: E731
        with ctx:
            for _ in range(2):
                fn()
            rows.append(("IDEAL", kernel_ms(fn), cuda_time(fn, reps=9)))
        if family == "qwen2_vl":   # the same IDEAL with the full-size ViT: its kernel time swapped in for the small one
            vit = lambda x: model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])  # noqa: E731
            full_vit, small_vit = kernel_ms(lambda: vit(inputs)), kernel_ms(lambda: vit(ideal_inputs))
            rows.append(("IDEAL, full ViT", rows[-1][1] - small_vit + full_vit, float("nan")))
    del model
    torch.cuda.empty_cache()
    return rows


def markdown(name: str, rows, keep: float = 0.16) -> str:
    base = rows[0][1]
    ideal = [k for n, k, _ in rows if n.startswith("IDEAL")][-1]   # "IDEAL, full ViT" where it exists
    out = [f"## {name}, batch 1, keep {keep}", "",
           "| run | GPU kernel ms | speed-up (kernel time) | of IDEAL's speed-up | wall TTFT ms |", "|---|---|---|---|---|"]
    out += [f"| {n} | {k:.2f} | {base / k:.2f}x | {ideal / k:.2f} | {w:.2f} |" for n, k, w in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--keep", type=float, default=0.16)
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help='method specs: a name, or name:key=value,... e.g. "feather:layers=(2,6)"')
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import transformers

    text = [f"# Batch-1 prefill: GPU kernel time vs wall time\n\ndevice: {torch.cuda.get_device_name()}; torch "
            f"{torch.__version__}; transformers {transformers.__version__}; random bf16 weights, sdpa.\n\ncommand: "
            f"python -m vltok.eval.tools.devtime {' '.join(args.models)}"
            + (f" --methods {' '.join(repr(m) for m in args.methods)}" if list(args.methods) != list(METHODS) else "")
            + "\n"]
    for name in args.models:
        text.append(markdown(name, bench(name, args.keep, args.methods), args.keep))
        print(text[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(text) + "\n")


if __name__ == "__main__":
    main()
