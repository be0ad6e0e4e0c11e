"""dpp's greedy MAP on one GPU: the torch loop (vltok.methods.dpp.dpp_greedy_torch) vs the fused Triton kernel
(vltok.kernels.dpp), milliseconds per call as the method calls it (host launches included).

    python -P -m vltok.eval.tools.dpp_kernel_speed --out-dir OUT [--sweep]

Cases: batch 1 and 8, N = 576 (LLaVA-1.5) and 2880 (LLaVA-NeXT, 5 tiles of 576), keep 0.16 and 0.11 (k = the
method's kept count); the kernel L = dpp_kernel(x, relevance(x, text)) of random bf16 features x [B, N, 4096] and a
random 20-token text, built once per case (not timed). Times are medians of ``--reps`` calls of
vltok.eval.speed.time_ms (CUDA events) after warm-up; "same picks" compares the two results. ``--sweep`` also times
the kernel's tile / warp settings (vltok.kernels.dpp.config) per case, to pick its defaults. Writes
OUT/dpp-kernel-speed.md and .json. Without CUDA it runs under TRITON_INTERPRET=1 on CPU (a smoke test: give tiny
--batch / --n / --dim).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

SWEEP = [(tile, warps) for tile in (2048, 8192, 16384) for warps in (4, 8, 16)]


def median_ms(fn, warmup: int, reps: int, cuda: bool) -> float:
    from vltok.eval.speed import time_ms

    for _ in range(warmup):
        fn()
    return statistics.median(time_ms(fn, cuda) for _ in range(reps))


def run(batches, ns, keeps, dim, reps, warmup, sweep, device):
    from vltok.kernels import dpp as kernel
    from vltok.methods.dpp import dpp_greedy_torch, dpp_kernel, relevance
    from vltok.stages import kept_count

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    rows = []
    for N in ns:
        for B in batches:
            x = torch.randn(B, N, dim, generator=g).to(device, dtype)
            text = [torch.randn(20, dim, generator=g).to(device, dtype) for _ in range(B)]
            L = dpp_kernel(x, relevance(x, text))
            for keep in keeps:
                k = kept_count(N, keep)
                same = torch.equal(dpp_greedy_torch(L, k), kernel.dpp_greedy_triton(L, k))
                t_torch = median_ms(lambda: dpp_greedy_torch(L, k), warmup, reps, cuda)
                t_triton = median_ms(lambda: kernel.dpp_greedy_triton(L, k), warmup, reps, cuda)
                row = dict(B=B, N=N, keep=keep, k=k, torch_ms=t_torch, triton_ms=t_triton,
                           speedup=t_torch / t_triton, same_picks=same, config=list(kernel.config(N)))
                if sweep:
                    row["sweep"] = {f"tile={t} warps={w}": median_ms(lambda: kernel._launch(L, k, False, t, w),
                                                                     warmup, reps, cuda) for t, w in SWEEP}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def table(rows, device_name) -> str:
    md = [f"# dpp greedy MAP: torch loop vs fused Triton kernel\n\ndevice: {device_name}; torch {torch.__version__}. "
          "Median ms per call (CUDA events, host launches included); kernel config = (BLOCK_N, BLOCK_T, warps).\n",
          "| B | N | keep | k | torch ms | triton ms | torch / triton | same picks | kernel config |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['B']} | {r['N']} | {r['keep']} | {r['k']} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | "
                  f"{r['speedup']:.1f}x | {r['same_picks']} | {tuple(r['config'])} |")
    if any("sweep" in r for r in rows):
        names = list(rows[0]["sweep"])
        md += ["", "Kernel settings (ms, the kernel alone):", "",
               "| B | N | k | " + " | ".join(names) + " |", "|---" * (3 + len(names)) + "|"]
        for r in rows:
            md.append(f"| {r['B']} | {r['N']} | {r['k']} | " + " | ".join(f"{r['sweep'][n]:.3f}" for n in names)
                      + " |")
    return "\n".join(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=None, help="write dpp-kernel-speed.md / .json here")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--n", type=int, nargs="+", default=[576, 2880], help="tokens per image")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.16, 0.11])
    ap.add_argument("--dim", type=int, default=4096, help="feature width (LLaVA-7B's hidden size)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also time the kernel's tile / warp settings")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device, name = "cuda", torch.cuda.get_device_name()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, name = "cpu", "CPU, TRITON_INTERPRET=1 (smoke test: times mean nothing)"
    else:
        sys.exit("dpp_kernel_speed needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke test)")
    rows = run(args.batch, args.n, args.keep, args.dim, args.reps, args.warmup, args.sweep, device)
    text = table(rows, name)
    print(text)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "dpp-kernel-speed.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out_dir, "dpp-kernel-speed.json"), "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
