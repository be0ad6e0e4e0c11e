"""Where does the batch-1 prefill fast path spend its time? GPU kernel time per kernel family, eager vs graph.

Builds LLaVA-1.5-7B with random bf16 weights (eval/configs.py), runs ``vltok.fast.PrefillGraph`` unpatched and
patched (``--method`` at ``--keep``), and prints, for the eager run of the same function and the CUDA-graph replay:
the wall time (CUDA events), the summed GPU kernel time (torch.profiler), and the top kernels. The gap between wall
time and kernel time is launch / host overhead; the kernel time is the floor a graph can reach.

    python -m vltok.eval.tools.profile_fast --method pool --keep 0.16
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch


def kernel_table(fn, reps: int = 3, top: int = 12):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name][0] += ev.device_time / 1000.0 / reps   # ms per call
            per[ev.name][1] += 1
    total = sum(v[0] for v in per.values())
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return total, [(name[:90], ms, n // reps) for name, (ms, n) in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="pool")
    ap.add_argument("--keep", type=float, default=0.16)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    import vltok
    from vltok.fast import PrefillGraph

    from ..configs import build_random
    from ..speed import cuda_time, make_inputs

    model = build_random("llava-1.5-7b", device="cuda", dtype=torch.bfloat16)
    inputs = make_inputs(model, "llava", 1, "cuda")
    args_ = dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for label, patch in (("unpatched", None), (f"{args.method} keep {args.keep:g}", args.method)):
        handle = vltok.patch(model, patch, keep=args.keep) if patch else None
        try:
            with torch.no_grad():
                eager = PrefillGraph(model, graphs=False)
                graph = PrefillGraph(model)
                for name, fn in (("eager", lambda: eager(**args_)), ("graph", lambda: graph(**args_))):
                    wall = cuda_time(fn, reps=args.reps)
                    total, rows = kernel_table(fn)
                    print(f"\n## {label}, {name}: wall {wall:.2f} ms, GPU kernels {total:.2f} ms "
                          f"({len(rows)} top kernels below)")
                    for k, ms, n in rows:
                        print(f"  {ms:7.3f} ms  x{n:<4d} {k}")
        finally:
            if handle is not None:
                handle.remove()


if __name__ == "__main__":
    main()
