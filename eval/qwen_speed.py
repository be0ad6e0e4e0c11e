"""Qwen2-VL / Qwen2.5-VL prefill speed, every reduction against IDEAL in the same run, with the ViT / LLM split.

One command on one GPU (random bf16 weights of the full-size 7B configs from vltok.eval.configs, no network):

    python3 -P -m vltok.eval.qwen_speed --out OUTDIR            # ~6-8 min on an H100
    python3 -P -m vltok.eval.qwen_speed --tiny --out OUTDIR     # CPU smoke run on tiny configs (tests)

Per model x input (an image of ~1.3k visual tokens, a 32-frame video) x batch (1, 8) x keep, rows:

* ``unpatched``; ``IDEAL``: the unpatched model fed an input of exactly the token count the methods produce
  (per image / temporal slice kept_count(units, keep), as a smaller grid of that many units: its ViT and LLM both
  run short); ``resize``: the unpatched model on the grid ``vltok.resize`` would ask the processor for (each side
  scaled by sqrt(keep), whole units; its count differs slightly from IDEAL's);
* ``tome`` / ``crossget`` merging inside the Qwen vision tower (adapters/qwen_tower.py), with the default schedule
  (merges spread over all 32 blocks) and ``schedule=early`` (merges in the first 8 blocks);
* ``pool`` / ``fourier`` (after the tower), ``fastv`` / ``feather`` (inside the LLM).

Each row: prefill time (``model(**inputs, logits_to_keep=1)``, median of CUDA-event timings after warm-up), the
time inside the vision tower (CUDA events around every ``model.model.visual`` call of that forward) and the rest
(LLM, splice, vltok's host work), the visual tokens entering the LLM, the speed-up over unpatched and its ratio to
IDEAL's speed-up. Writes ``qwen-speed.md`` and ``qwen-speed.json`` under ``--out``; prints one line per row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import vltok
from vltok.eval.speed import time_ms

IMAGE_GRID = (1, 82, 64)     # patches: a 1148 x 896 image -> 41 x 32 = 1312 tokens
VIDEO_GRID = (16, 20, 28)    # 32 frames of 280 x 392 (temporal patch 2) -> 16 slices of 10 x 14 = 2240 tokens
TINY_IMAGE, TINY_VIDEO = (1, 8, 12), (4, 8, 8)
TEXT_BEFORE, TEXT_AFTER = 35, 64
# method specs: name[:option=value]; "schedule=early" merges in the first quarter of the tower's blocks
METHODS = ("tome", "tome:schedule=early", "crossget", "crossget:schedule=early", "pool", "fourier", "fastv",
           "feather")
MODELS = ("qwen2-vl-7b", "qwen2.5-vl-7b")


# -- models --------------------------------------------------------------------------------------------------------
def tiny_model(name: str, device="cpu", dtype=torch.float32):
    """Tiny random configs of the real classes (4 vision blocks, 24 LLM layers: fastv / feather reach keep 0.16)
    for the CPU smoke run."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=24, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]})
    ids = dict(image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)
    common = dict(depth=4, num_heads=4, patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if name.startswith("qwen2-"):
        cfg = Qwen2VLConfig(text_config=dict(text, model_type="qwen2_vl_text"),
                            vision_config=dict(common, embed_dim=32, hidden_size=32, mlp_ratio=2), **ids)
        m = Qwen2VLForConditionalGeneration(cfg)
    else:
        cfg = Qwen2_5_VLConfig(text_config=dict(text, model_type="qwen2_5_vl_text"),
                               vision_config=dict(common, hidden_size=32, intermediate_size=64, out_hidden_size=32,
                                                  window_size=16, fullatt_block_indexes=[1, 3], tokens_per_second=2),
                               **ids)
        m = Qwen2_5_VLForConditionalGeneration(cfg)
    return m.to(device=device, dtype=dtype).eval()


def build(name: str, tiny: bool, device, attn: str):
    if tiny:
        m = tiny_model(name, device)
    else:
        from vltok.eval import configs

        m = configs.build_random(name, device=device, dtype=torch.bfloat16)
    m.set_attn_implementation(attn)
    return m


# -- inputs --------------------------------------------------------------------------------------------------------
def make_inputs(model, kind: str, batch: int, grid, device, seed: int = 0):
    """``batch`` samples of [text, vision start, placeholders, vision end, text], one image or video each, random
    pixels of the given (t, h, w) patch grid."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vc = cfg.vision_config
    t, h, w = grid
    n = t * h * w // vc.spatial_merge_size ** 2
    tok, code = (cfg.image_token_id, 1) if kind == "image" else (cfg.video_token_id, 2)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}

    def text(k):
        x = torch.randint(3, cfg.text_config.vocab_size - 1, (k,), generator=g)
        for s in special:
            x = x.masked_fill(x == s, 5)
        return x

    row = torch.cat([text(TEXT_BEFORE), torch.tensor([cfg.vision_start_token_id]), torch.full((n,), tok),
                     torch.tensor([cfg.vision_end_token_id]), text(TEXT_AFTER)])
    ids = row.expand(batch, -1).clone()
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pix = torch.randn(batch * t * h * w, patch_dim, generator=g)
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == tok).long() * code)
    key = "pixel_values" if kind == "image" else "pixel_values_videos"
    out[key] = pix
    out[f"{kind}_grid_thw"] = torch.tensor([list(grid)] * batch)
    return {k: v.to(device) for k, v in out.items()}


def ideal_grid(grid, keep: float, m: int):
    """A (t, h, w) patch grid whose slices have exactly kept_count(units, keep) units, as square as possible."""
    from vltok.stages import kept_count

    t, h, w = grid
    hu, wu = h // m, w // m
    n = kept_count(hu * wu, keep)
    best = min(((a, n // a) for a in range(1, n + 1) if n % a == 0),
               key=lambda p: abs(math.log(p[0] / p[1]) - math.log(hu / wu)))
    return (t, best[0] * m, best[1] * m)


def resize_grid(grid, keep: float, m: int, patch: int):
    """The grid vltok.resize asks a Qwen processor for (ResizedProcessor.qwen_sizes on the native size)."""
    from vltok.resize import ResizedProcessor

    t, h, w = grid
    ip = SimpleNamespace(size={"shortest_edge": 4 * (patch * m) ** 2, "longest_edge": 10 ** 9}, patch_size=patch,
                         merge_size=m)
    fake = SimpleNamespace(keep=keep, _bounds=ResizedProcessor._bounds)
    _, (rh, rw) = ResizedProcessor.qwen_sizes(fake, h * patch, w * patch, ip)
    return (t, rh // patch, rw // patch)


# -- timing --------------------------------------------------------------------------------------------------------
class TowerClock:
    """CUDA events (host clock on CPU) around every call of the vision tower."""

    def __init__(self, visual, cuda: bool):
        self.cuda, self.spans, self._open = cuda, [], None
        self.hooks = [visual.register_forward_pre_hook(self._pre), visual.register_forward_hook(self._post)]

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _pre(self, *a):
        self._open = self._mark()

    def _post(self, *a):
        self.spans.append((self._open, self._mark()))

    def take_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            ms = sum(a.elapsed_time(b) for a, b in self.spans)
        else:
            ms = sum((b - a) * 1e3 for a, b in self.spans)
        self.spans = []
        return ms

    def remove(self):
        for h in self.hooks:
            h.remove()


def time_forward(model, inputs, reps: int, warmup: int, clock: TowerClock) -> tuple[float, float]:
    """(median prefill ms, median ViT ms of the same calls)."""
    cuda = clock.cuda
    fwd = lambda: model(**inputs, logits_to_keep=1)  # noqa: E731
    with torch.no_grad():
        for _ in range(warmup):
            fwd()
        clock.take_ms()
        tot, vit = [], []
        for _ in range(reps):
            tot.append(time_ms(fwd, cuda))
            vit.append(clock.take_ms())
    return statistics.median(tot), statistics.median(vit)


# -- the run -------------------------------------------------------------------------------------------------------
def bench(name, model, kinds, batches, keeps, methods, reps, warmup, device, log=print):
    vc = model.config.vision_config
    m = vc.spatial_merge_size
    tiny = vc.depth <= 8
    grids = {"image": TINY_IMAGE if tiny else IMAGE_GRID, "video": TINY_VIDEO if tiny else VIDEO_GRID}
    cuda = str(device).startswith("cuda")
    clock = TowerClock(model.model.visual, cuda)
    rows = []
    try:
        for kind in kinds:
            grid = grids[kind]
            for batch in batches:
                def row(label, keep, inputs, handle=None, grid_used=grid):
                    t0 = time.perf_counter()
                    try:
                        ms, vit = time_forward(model, inputs, reps, warmup, clock)
                        stats = dict(handle.stats) if handle is not None else {}
                        tokens = stats.get("llm_input_tokens") or (
                            grid_used[0] * grid_used[1] * grid_used[2] // m ** 2 * batch)
                        r = dict(model=name, input=kind, batch=batch, row=label, keep=keep, ms=ms, vit_ms=vit,
                                 llm_ms=ms - vit, visual_tokens=int(tokens) // batch, grid=list(grid_used))
                    except Exception as e:   # one failing row (e.g. out of memory) must not sink the run
                        r = dict(model=name, input=kind, batch=batch, row=label, keep=keep, ms=float("nan"),
                                 error=f"{type(e).__name__}: {str(e)[:300]}")
                        if cuda:
                            torch.cuda.empty_cache()
                    rows.append(r)
                    log(json.dumps({**r, "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)
                    return r

                base = row("unpatched", 1.0, make_inputs(model, kind, batch, grid, device))
                for keep in keeps:
                    ig = ideal_grid(grid, keep, m)
                    row("IDEAL", keep, make_inputs(model, kind, batch, ig, device), grid_used=ig)
                    rg = resize_grid(grid, keep, m, vc.patch_size)
                    row("resize", keep, make_inputs(model, kind, batch, rg, device), grid_used=rg)
                    inputs = make_inputs(model, kind, batch, grid, device)
                    for method in methods:
                        name_, _, opt = method.partition(":")
                        opts = dict(o.split("=", 1) for o in opt.split(",") if o)
                        try:
                            handle = vltok.patch(model, name_, keep=keep, **opts)
                        except vltok.VltokError as e:
                            rows.append(dict(model=name, input=kind, batch=batch, row=method, keep=keep,
                                             ms=float("nan"), error=str(e)[:300]))
                            log(f"skip {method}: {e}", flush=True)
                            continue
                        try:
                            row(method, keep, inputs, handle)
                        finally:
                            handle.remove()
                del base
    finally:
        clock.remove()
    add_ratios(rows)
    return rows


def add_ratios(rows):
    """speed-up = unpatched ms / row ms; vs IDEAL = speed-up / IDEAL's speed-up (same model, input, batch, keep)."""
    base = {(r["model"], r["input"], r["batch"]): r["ms"] for r in rows if r["row"] == "unpatched"}
    ideal = {(r["model"], r["input"], r["batch"], r["keep"]): r["ms"] for r in rows if r["row"] == "IDEAL"}
    for r in rows:
        b = base.get((r["model"], r["input"], r["batch"]))
        r["speedup"] = b / r["ms"] if b and r["ms"] == r["ms"] else float("nan")
        i = ideal.get((r["model"], r["input"], r["batch"], r["keep"]))
        r["vs_ideal"] = r["speedup"] / (b / i) if (b and i and r["row"] != "unpatched") else float("nan")


def markdown(rows, header: str) -> str:
    def f(v, fmt="{:.1f}"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    out = [header, ""]
    groups = []
    for r in rows:
        k = (r["model"], r["input"], r["batch"])
        if k not in groups:
            groups.append(k)
    for model, kind, batch in groups:
        out += [f"### {model}, {kind}, batch {batch}", "",
                "| row | keep | visual tokens | prefill ms | ViT ms | LLM + rest ms | speed-up | vs IDEAL |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if (r["model"], r["input"], r["batch"]) != (model, kind, batch):
                continue
            if "error" in r:
                out.append(f"| {r['row']} | {r['keep']} | - | failed: {r['error'][:120]} | | | | |")
                continue
            out.append(f"| {r['row']} | {r['keep']} | {r['visual_tokens']} | {f(r['ms'])} | {f(r['vit_ms'])} | "
                       f"{f(r['llm_ms'])} | {f(r['speedup'], '{:.2f}x')} | {f(r['vs_ideal'], '{:.2f}')} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -P -m vltok.eval.qwen_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for qwen-speed.md / qwen-speed.json")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--inputs", nargs="+", default=["image", "video"], choices=["image", "video"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--keeps", nargs="+", type=float, default=[0.16])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation of the whole model (sdpa, eager)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    rows = []
    for name in args.models:
        t0 = time.perf_counter()
        model = build(name, args.tiny, device, args.attn)
        print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        rows += bench(name, model, args.inputs, args.batches, args.keeps, args.methods, args.reps, args.warmup,
                      device)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    import transformers

    dev = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    header = (f"# Qwen2-VL / Qwen2.5-VL prefill speed vs IDEAL ({dev})\n\n"
              f"command: python3 -P -m vltok.eval.qwen_speed {' '.join(sys.argv[1:] if argv is None else argv)}\n"
              f"torch {torch.__version__}, transformers {transformers.__version__}, vltok {vltok.__version__}, "
              f"attn {args.attn}, {args.reps} reps after {args.warmup} warm-up, random bf16 weights"
              f"{' (tiny configs, CPU)' if args.tiny else ''}; total {time.perf_counter() - t_start:.0f} s\n\n"
              "prefill = model(**inputs, logits_to_keep=1); ViT = CUDA events around the vision tower calls; "
              "speed-up = unpatched / row; vs IDEAL = speed-up / IDEAL's speed-up.")
    md = markdown(rows, header)
    with open(os.path.join(args.out, "qwen-speed.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.out, "qwen-speed.json"), "w") as f:
        json.dump(dict(device=dev, torch=torch.__version__, transformers=transformers.__version__,
                       args=vars(args), rows=rows), f, indent=1)
    print(md, flush=True)
    return rows


if __name__ == "__main__":
    main()
