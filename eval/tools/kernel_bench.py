"""Kernel micro-benchmarks on one GPU: the Triton kernels against their torch references, with floors.

    python -m vltok.eval.tools.kernel_bench --out eval/results/kernels-h100.md

DCT low-pass: torch dense GEMM (one cuBLAS call on the cached basis) vs the Triton kernel; floor = bytes moved
(input read once, output written once, basis once) / measured device-to-device copy bandwidth.
CGSM matching: torch reference (materialises S) vs Triton (tiled, never stores S), bf16 metric; once as called
(host launches included) and once replayed as CUDA graphs (device time alone).
Token gather (vltok.kernels.gather, --only gather): one gather per tensor (torch) vs one fused Triton launch for the
hidden, cos, sin and position-id rows of the kept tokens; the engine keeps Triton as the default on CUDA only if
it is not slower here.
In-LLM cut selection (vltok.kernels.select, --only select): last-row attention scores (FEATHER's softmax over the
visual keys and FastV's over the whole prefix, RoPE applied), the stable top-k per row and the column compaction,
torch reference vs Triton at LLaVA-1.5 (Sc=676, 576 visual) and LLaVA-NeXT (Sc=2980, 2880 visual) shapes.
Times are medians of triton.testing.do_bench (CUDA events), correctness checked on fresh random inputs each case.
"""
from __future__ import annotations

import argparse
import sys

import torch


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    from triton.testing import do_bench

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * n / (ms / 1e3)


def bench_dct(bw, rows):
    from triton.testing import do_bench

    from vltok.methods.fourier import dct_lowpass

    for (B, h, r, C) in [(1, 24, 10, 1024), (8, 24, 10, 1024), (64, 24, 10, 1024), (256, 24, 10, 1024),
                         (8, 24, 10, 4096), (64, 24, 12, 4096), (5, 24, 12, 1024)]:
        x = torch.randn(B, h * h, C, device="cuda", dtype=torch.bfloat16)
        ref = dct_lowpass(x.double(), h, h, r, r, impl="dense")
        out = {}
        for impl in ("dense", "triton"):
            y = dct_lowpass(x, h, h, r, r, impl=impl)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            ms = do_bench(lambda: dct_lowpass(x, h, h, r, r, impl=impl), warmup=25, rep=100, return_mode="median")
            out[impl] = (ms, err)
        nbytes = (B * (h * h + r * r) * C + r * r * h * h) * 2
        floor_ms = nbytes / bw * 1e3
        rows.append(("dct", f"B={B} {h}x{h}->{r}x{r} C={C}", out["dense"][0] * 1e3, out["triton"][0] * 1e3,
                     floor_ms * 1e3, out["triton"][0] / floor_ms, out["dense"][0] / out["triton"][0],
                     max(out["dense"][1], out["triton"][1])))
        print(rows[-1], flush=True)


def bench_cgsm(rows):
    from triton.testing import do_bench

    from vltok.kernels.cgsm import cgsm_match_torch, cgsm_match_triton

    for (B, N, d, r) in [(1, 577, 1024, 100), (1, 2880, 1024, 720), (8, 2880, 1024, 720), (1, 8192, 1280, 2048)]:
        m = torch.nn.functional.normalize(torch.randn(B, N, d, device="cuda"), dim=-1).to(torch.bfloat16)
        imp = torch.rand(B, N, device="cuda") * 1e-3
        prot = torch.zeros(B, N, dtype=torch.bool, device="cuda")
        prot[:, 0] = True
        a = cgsm_match_torch(m, imp, r, prot)
        b = cgsm_match_triton(m, imp, r, prot)
        same_src = (a[0].sort(-1).values == b[0].sort(-1).values).float().mean().item()
        same_dst = (a[1] == b[1]).float().mean().item()
        try:
            t_ref = do_bench(lambda: cgsm_match_torch(m, imp, r, prot), warmup=5, rep=50, return_mode="median")
        except torch.OutOfMemoryError:
            t_ref = float("nan")
        t_tri = do_bench(lambda: cgsm_match_triton(m, imp, r, prot), warmup=5, rep=50, return_mode="median")
        rows.append(("cgsm", f"B={B} N={N} d={d} r={r}", t_ref * 1e3, t_tri * 1e3, float("nan"), float("nan"),
                     t_ref / t_tri, f"same src {same_src:.4f}, same dst {same_dst:.4f}"))
        print(rows[-1], flush=True)
        # the same work replayed as CUDA graphs: device time alone, without the host's launch cost
        g = {}
        for name, fn in (("torch", cgsm_match_torch), ("triton", cgsm_match_triton)):
            try:
                fn(m, imp, r, prot)   # warm (the Triton tile shapes are timed before capture)
                g[name] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g[name]):
                    fn(m, imp, r, prot)
                g[name] = do_bench(g[name].replay, warmup=5, rep=50, return_mode="median")
            except (RuntimeError, torch.OutOfMemoryError) as e:
                print(f"cgsm graph capture of {name} failed: {e}", flush=True)
                g[name] = float("nan")
        rows.append(("cgsm (CUDA graph)", f"B={B} N={N} d={d} r={r}", g["torch"] * 1e3, g["triton"] * 1e3,
                     float("nan"), float("nan"), g["torch"] / g["triton"], "device time only"))
        print(rows[-1], flush=True)


def bench_gather(bw, rows):
    """Token compaction at a cut: hidden rows plus cos / sin / position-id rows; torch = one gather per tensor."""
    from triton.testing import do_bench

    from vltok.kernels.gather import gather_rows

    for (B, S, D, k, hd) in [(1, 675, 4096, 199, 128), (8, 675, 4096, 199, 128), (8, 675, 4096, 110, 128),
                             (1, 2980, 4096, 600, 128), (8, 2980, 4096, 600, 128), (8, 675, 4096, 600, 128)]:
        x = torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16)
        cos = torch.randn(1, S, hd, device="cuda", dtype=torch.bfloat16)
        sin = torch.randn_like(cos)
        pid = torch.arange(S, device="cuda")[None]
        idx = torch.stack([torch.randperm(S, device="cuda")[:k].sort().values for _ in range(B)])
        args = (x, idx, cos, sin, idx, pid)
        a, b = gather_rows(*args, impl="torch"), gather_rows(*args, impl="triton")
        same = all(torch.equal(p, q) for p, q in zip(a, b))
        t = {impl: do_bench(lambda: gather_rows(*args, impl=impl), warmup=25, rep=100, return_mode="median")
             for impl in ("torch", "triton")}
        floor_ms = 2 * (B * k * (D + 2 * hd) * 2 + B * k * 8) / bw * 1e3   # read + write the kept rows
        rows.append(("gather", f"B={B} S={S} D={D} k={k} +cos/sin/pid", t["torch"] * 1e3, t["triton"] * 1e3,
                     floor_ms * 1e3, t["triton"] / floor_ms, t["torch"] / t["triton"], f"equal {same}"))
        print(rows[-1], flush=True)


def bench_select(rows):
    """The three in-LLM cut functions as called (host launches included), with their kernel launches per call and
    summed kernel time (torch.profiler): 7B shapes, H=32, hd=128, bf16."""
    from triton.testing import do_bench

    from vltok.kernels import select

    from .profile_fast import kernel_table

    def timed(fn):
        """impl -> (µs as called, kernel launches per call, summed kernel µs per call)."""
        out = {}
        for impl in ("torch", "triton"):
            ms = do_bench(lambda: fn(impl), warmup=25, rep=100, return_mode="median")
            kernel_ms, table = kernel_table(lambda: fn(impl), reps=3, top=10_000)
            out[impl] = (ms * 1e3, sum(n for _, _, n in table), kernel_ms * 1e3)
        return out

    def check(t, what):
        return (f"{what}; launches {t['torch'][1]} vs {t['triton'][1]}; "
                f"kernel µs {t['torch'][2]:.1f} vs {t['triton'][2]:.1f}")

    for (B, Sc, K, keep) in [(1, 676, 576, 60), (8, 676, 576, 60), (1, 2980, 2880, 460), (8, 2980, 2880, 460)]:
        H, hd, first = 32, 128, 35            # visual tokens at current columns [first, first + K)
        q = torch.randn(B, Sc, H * hd, device="cuda", dtype=torch.bfloat16).view(B, Sc, H, hd)
        k = torch.randn(B, Sc, H * hd, device="cuda", dtype=torch.bfloat16).view(B, Sc, H, hd)
        cos = torch.randn(1, Sc, hd, device="cuda", dtype=torch.bfloat16)
        sin = torch.randn_like(cos)
        prev = torch.arange(Sc, device="cuda").expand(B, Sc).contiguous()
        am = torch.ones(B, Sc, dtype=torch.long, device="cuda")
        rows_ = torch.full((B,), Sc - 1, device="cuda")
        keys = (first + torch.arange(K, device="cuda")).expand(B, K).contiguous()
        for norm_all, who in ((False, "feather"), (True, "fastv")):
            args = (q, k, rows_, keys, hd ** -0.5, norm_all, prev, am, cos, sin)
            err = (select.last_row_scores(*args, impl="torch") - select.last_row_scores(*args, impl="triton"))
            t = timed(lambda impl: select.last_row_scores(*args, impl=impl))
            rows.append((f"select scores ({who})", f"B={B} Sc={Sc} H={H} hd={hd} K={K} +rope", t["torch"][0],
                         t["triton"][0], float("nan"), float("nan"), t["torch"][0] / t["triton"][0],
                         check(t, f"max abs err {err.abs().max().item():.1e}")))
            print(rows[-1], flush=True)
        scores = torch.rand(B, K, device="cuda")
        force = torch.zeros(K, dtype=torch.bool, device="cuda")
        force[::max(1, K // (keep // 4))] = True
        for f in (None, force):
            same = torch.equal(select.topk_rows(scores, keep, f, impl="torch"),
                               select.topk_rows(scores, keep, f, impl="triton"))
            t = timed(lambda impl: select.topk_rows(scores, keep, f, impl=impl))
            case = f"[{B}, {K}] k={keep}" + (f" force {int(force.sum())}" if f is not None else "")
            rows.append(("select topk", case, t["torch"][0], t["triton"][0], float("nan"), float("nan"),
                         t["torch"][0] / t["triton"][0], check(t, f"equal {same}")))
            print(rows[-1], flush=True)
        drop = keys
        kept = first + torch.stack([torch.randperm(K, device="cuda")[:keep] for _ in range(B)])
        n_out = Sc - K + keep
        a = select.cut_columns(prev, drop, kept, n_out, impl="torch")
        b = select.cut_columns(prev, drop, kept, n_out, impl="triton")
        same = torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        t = timed(lambda impl: select.cut_columns(prev, drop, kept, n_out, impl=impl))
        rows.append(("select cut_columns", f"B={B} Sc={Sc} drop {K} keep {keep}", t["torch"][0], t["triton"][0],
                     float("nan"), float("nan"), t["torch"][0] / t["triton"][0], check(t, f"equal {same}")))
        print(rows[-1], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", nargs="+", choices=("dct", "cgsm", "gather", "select"),
                    default=("dct", "cgsm", "gather", "select"),
                    help="run only these kernels' benchmarks")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    bw = copy_bandwidth()
    rows = []
    if "dct" in args.only:
        bench_dct(bw, rows)
    if "cgsm" in args.only:
        bench_cgsm(rows)
    if "gather" in args.only:
        bench_gather(bw, rows)
    if "select" in args.only:
        bench_select(rows)
    md = [f"# vltok kernel micro-benchmarks\n\ndevice: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"triton {triton.__version__}; measured copy bandwidth {bw / 1e12:.2f} TB/s (read + write). "
          "Medians of triton.testing.do_bench.\n",
          "| kernel | case | torch µs | triton µs | floor µs | triton / floor | torch / triton | check |",
          "|---|---|---|---|---|---|---|---|"]
    for k, case, t_ref, t_tri, floor, ratio, speed, chk in rows:
        chk = f"rel err {chk:.1e}" if isinstance(chk, float) else chk
        md.append(f"| {k} | {case} | {t_ref:.1f} | {t_tri:.1f} | {floor:.1f} | {ratio:.2f} | {speed:.2f}x | {chk} |")
    text = "\n".join(md)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
