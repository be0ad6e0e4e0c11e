"""`vltok video run ...`: the offline video batch job from the command line (vltok.video.run)."""
from __future__ import annotations

import json
import sys

from .. import cli_args


def register(sub):
    vp = sub.add_parser("video", help="offline video batch processing (vltok video run --help)")
    vsub = vp.add_subparsers(dest="video_command", required=True)
    ap = vsub.add_parser("run", help="answer questions about every video of a folder / glob / list file",
                         description="Run a (patched) video VLM over many videos; resumable (rerun the same command "
                                     "after a crash or kill), one row per (video, question). Docs: docs/video.md")
    ap.add_argument("videos", nargs="+", help="folder (recursive), glob pattern, video file or list file")
    ap.add_argument("--out", required=True, help="output folder (shards, results, summary)")
    ap.add_argument("--model", default="reference-video",
                    help="local checkpoint folder of a Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision / LLaVA-NeXT-Video / "
                         "Video-LLaVA model, or 'reference-video' (default: vltok's video reference VLM, "
                         "vltok-ref-video)")
    ap.add_argument("--method", default="fourier",
                    help="vltok method (vltok methods lists them), or 'none' for the unpatched model "
                         "(default: fourier)")
    ap.add_argument("--keep", type=float, default=None,
                    help=f"share of visual tokens kept per frame, in (0, 1] (default {cli_args.DEFAULT_KEEP}); a "
                         "--method-arg that fixes the budget (e.g. r=10) sets it instead")
    ap.add_argument("--method-arg", "--arg", dest="method_arg", type=cli_args.key_value, action="append", default=[],
                    metavar="KEY=VALUE", help="extra method option (value parsed as JSON when possible); repeatable")
    q = ap.add_mutually_exclusive_group()
    q.add_argument("--task", choices=["caption"], help="caption every video (the default)")
    q.add_argument("--question", help="one question asked of every video")
    q.add_argument("--questions", help='JSONL file: {"id": ..., "question": ..., "video": optional key}')
    s = ap.add_mutually_exclusive_group()
    s.add_argument("--fps", type=float, help="frames per second, Qwen2-VL style (default 2; even count, min 4)")
    s.add_argument("--frames", type=int, help="N frames spread uniformly (LLaVA-NeXT-Video / lmms-eval style)")
    ap.add_argument("--max-frames", type=int, default=None, help="cap on sampled frames (fps mode: 768)")
    ap.add_argument("--min-frames", type=int, default=4, help="fps mode: at least this many frames (default 4)")
    ap.add_argument("--start", type=float, default=None, help="window start (seconds)")
    ap.add_argument("--end", type=float, default=None, help="window end (seconds)")
    ap.add_argument("--batch-size", type=int, default=4, help="(video, question) samples per model call (default 4)")
    ap.add_argument("--num-workers", type=int, default=None, help="decode processes (0: decode inline)")
    ap.add_argument("--num-threads", type=int, default=1, help="decoder threads per worker (default 1)")
    ap.add_argument("--decoder", choices=["auto", "decord", "av"], default="auto",
                    help="video decoder (default auto: decord when installed, else PyAV)")
    ap.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="results format (default jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (default 64)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", type=cli_args.dtype, default=None, metavar="DTYPE",
                    help=f"{cli_args.DTYPE_HELP}; default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--shard-size", type=int, default=16, help="videos per output shard (a kill loses at most one)")
    ap.add_argument("--shard-seconds", type=float, default=60.0, help="also commit a shard after this long")
    ap.add_argument("--no-progress", action="store_true", help="no progress line")
    ap.add_argument("--ray", action="store_true", help="run on a Ray cluster (Ray Data): decode tasks + GPU actors")
    ap.add_argument("--ray-address", default=None, help="e.g. auto (an existing cluster); default: start a local one")
    ap.add_argument("--num-gpus-per-worker", type=float, default=1, help="GPUs per model actor (Ray)")
    ap.add_argument("--concurrency", type=int, default=1, help="model actors (Ray)")
    ap.set_defaults(func=_run)


def _run(args):
    from . import run

    method = "none" if cli_args.is_none(args.method) else args.method
    if method == "none" and (args.keep is not None or args.method_arg):
        from ..cli import fail

        return fail(f"{'--keep' if args.keep is not None else '--method-arg'} needs a --method (with --method none "
                    "the unpatched model runs)")
    keep = args.keep   # None: not given (vltok.patch's default, or what a budget-fixing --method-arg implies)
    res = run(args.videos if len(args.videos) > 1 else args.videos[0], args.out, model=args.model,
              method=method, keep=keep, task=args.task, question=args.question, questions=args.questions,
              fps=args.fps, frames=args.frames, max_frames=args.max_frames, min_frames=args.min_frames,
              start=args.start, end=args.end, batch_size=args.batch_size, num_workers=args.num_workers,
              num_threads=args.num_threads, decoder=args.decoder, format=args.format,
              max_new_tokens=args.max_new_tokens, device=args.device, dtype=args.dtype,
              method_kwargs=dict(args.method_arg) or None, shard_size=args.shard_size,
              shard_seconds=args.shard_seconds, progress=not args.no_progress, ray=args.ray,
              ray_address=args.ray_address, num_gpus_per_worker=args.num_gpus_per_worker,
              concurrency=args.concurrency)
    print(json.dumps(res.summary, indent=1), file=sys.stderr)
    return 0
