"""``vltok shapes`` and ``vltok eval``: call :func:`register` with the ``vltok`` parser's subparsers.

    vltok shapes data/shapes-test --n 2268 --seed 0
    vltok shapes data/shapes-vqa --n 270 --export vqav2          # the same split in the VQAv2 layout
    vltok eval data/shapes-test                                   # the full reference VLM
    vltok eval data/shapes-test --method fourier --keep 0.16 --json results/fourier-0.16.json
    vltok eval /data/pope --format pope --model /path/to/llava-1.5-7b-hf --device cuda --json out/pope.json
    vltok eval /data/pope --json out/pope.json --resume           # after Ctrl-C: continue where it stopped

Bad input (a missing folder, ``--batch-size 0``, an unwritable ``--json`` path, a malformed questions line) ends
with one line on stderr and exit code 2, before any model is loaded. Benchmark formats: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _kv(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(subparsers) -> None:
    from .datasets import FORMATS

    p = subparsers.add_parser("shapes", help="write the shapes benchmark (images/ + questions.jsonl) into DIR",
                              description="Generate the balanced shapes test split (fixed seeds) into DIR.")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=2268, help="number of questions (balanced over 9 types x 3 regions)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the split")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR (its questions.jsonl and images/*.png are deleted first)")
    p.add_argument("--export", choices=["vqav2"], default=None,
                   help="write the split in an official benchmark layout instead (vqav2: questions + annotations "
                        "JSON + images; grounding questions left out)")
    p.add_argument("--from", dest="src", default=None, metavar="SHAPES_DIR",
                   help="with --export: convert this existing shapes folder instead of generating")
    p.set_defaults(func=cmd_shapes)

    e = subparsers.add_parser("eval", help="score a model (+ an optional vltok method) on a benchmark folder",
                              description="Evaluate the reference VLM or any supported checkpoint on a benchmark "
                                          "folder: vltok's shapes format or an official layout (docs/benchmarks.md).")
    e.add_argument("dir", help="the benchmark folder (shapes: images/ + questions.jsonl)")
    e.add_argument("--format", default=None, choices=FORMATS,
                   help="the folder's format (default: detected from its files where unambiguous)")
    e.add_argument("--split", default=None, help="scienceqa: the pid_splits.json split (default test)")
    e.add_argument("--scorer", choices=["official", "lmms"], default="official",
                   help="official scoring (default) or lmms-eval 0.7.3's, where they differ (vqav2, pope)")
    e.add_argument("--method", default=None, help="vltok method (none = the full model)")
    e.add_argument("--keep", type=float, default=None, help="keep ratio for --method")
    e.add_argument("--arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra method keyword argument (value parsed as JSON when possible); repeatable")
    e.add_argument("--limit", type=int, default=None, help="only the first N questions")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the benchmark's (16 for short answers, 128 for POPE, 24 for shapes)")
    e.add_argument("--frames", type=int, default=8, help="frames sampled per video (video formats)")
    e.add_argument("--json", default=None, metavar="OUT",
                   help="write the result JSON here (+ OUT.md table); finished batches go to OUT.partial.jsonl "
                        "as they complete")
    e.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.partial.jsonl (needs --json; same model, method, "
                        "dataset); items that failed before are retried")
    e.add_argument("--model", default=None, metavar="PATH",
                   help="a checkpoint on disk (any family vltok supports; default: the reference VLM, "
                        "vltok.reference.load())")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)


def _fail(msg: str) -> int:
    print(f"vltok: error: {msg}", file=sys.stderr)
    return 2


def cmd_shapes(args) -> int:
    from . import shapes
    from .datasets import DatasetError

    if args.n < 1:
        return _fail(f"--n must be at least 1 (got {args.n})")
    try:
        if args.export:
            recs = None
            if args.src:
                if not Path(args.src).is_dir():
                    return _fail(f"--from {args.src}: no such folder")
                recs = shapes.load_dataset(args.src)
            out = shapes.export_vqav2(args.dir, recs, n=args.n, seed=args.seed, force=args.force, progress=True)
            print(f"wrote the {args.export} layout to {out}")
            return 0
        out = shapes.generate(args.dir, n=args.n, seed=args.seed, progress=True, force=args.force)
    except (DatasetError, FileNotFoundError) as e:
        return _fail(str(e))
    print(f"wrote {args.n} questions to {out / 'questions.jsonl'}")
    return 0


def load_model(path: str | None, device: str, dtype: str):
    """``((model, processor), name)``: the reference VLM (path None or "vltok-ref") or a checkpoint on disk, its
    class picked from its config by transformers' auto class."""
    import torch

    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if path is None or str(path) in ("vltok-ref", "reference"):
        from vltok import reference

        return reference.load(device=device, dtype=dt), "vltok-ref"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dt).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return (model, processor), str(path)


def _patch(args) -> dict | None:
    if not args.method:
        return None
    return {"method": args.method, "keep": args.keep, **dict(args.arg)}   # keep None: not given (vltok.patch)


def _check_args(args):
    """Every check that needs no model: a message, or the loaded dataset."""
    from . import datasets, runner

    if args.keep is not None and args.method is None:
        return "--keep needs --method"
    if args.batch_size < 1:
        return f"--batch-size must be at least 1 (got {args.batch_size})"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be at least 1 (got {args.limit})"
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})"
    if args.frames < 1:
        return f"--frames must be at least 1 (got {args.frames})"
    if args.resume and not args.json:
        return "--resume needs --json OUT (the run's partial results are kept in OUT.partial.jsonl)"
    d = Path(args.dir)
    if not d.exists():
        return f"{d}: no such folder"
    if not d.is_dir():
        return f"{d} is not a folder"
    try:
        ds = datasets.load(d, args.format, **({"split": args.split} if args.split else {}))
        if args.scorer not in ds.scorers:
            return f"--scorer {args.scorer}: the {ds.format} format has only {', '.join(ds.scorers)}"
        if args.json:
            runner.check_writable(args.json)
        if args.resume:
            name = "vltok-ref" if args.model in (None, "vltok-ref", "reference") else str(args.model)
            runner.check_resume(args.json, runner.run_header(name, _patch(args), ds,
                                                             args.max_new_tokens or ds.max_new_tokens, args.frames))
    except (datasets.DatasetError, FileNotFoundError) as e:
        return str(e)
    return ds


def cmd_eval(args) -> int:
    import torch

    from . import runner, shapes_video
    from .datasets import DatasetError

    if args.format in (None, "shapes-video") and shapes_video.is_video_folder(args.dir) and args.model is None:
        # vltok's video benchmark: scored with the video reference VLM (vltok-ref-video), 16 frames per clip
        from . import quality_video

        if args.batch_size < 1:
            return _fail(f"--batch-size must be at least 1, got {args.batch_size}")
        quality_video.eval_folder(args.dir, args.method, args.keep, options=dict(args.arg), device=args.device,
                                  dtype=args.dtype, limit=args.limit, batch_size=args.batch_size,
                                  json_path=args.json)
        return 0
    ds = _check_args(args)
    if isinstance(ds, str):
        return _fail(ds)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    (model, processor), name = load_model(args.model, device, args.dtype)
    patch = _patch(args)
    try:
        res = runner.evaluate(model, processor, ds, patch, limit=args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=not args.no_progress, model_name=name,
                              scorer=args.scorer, frames=args.frames, save=args.json, resume=args.resume)
    except DatasetError as e:   # e.g. --resume over another run's partial file
        return _fail(str(e))
    except KeyboardInterrupt:
        if args.json:
            print(f"\nvltok: interrupted; finished batches are in {runner.partial_path(args.json)}: rerun the same "
                  "command with --resume to continue", file=sys.stderr)
        else:
            print("\nvltok: interrupted; nothing saved (pass --json OUT to keep finished batches and --resume)",
                  file=sys.stderr)
        return 130
    res["dataset"] = str(args.dir)
    if args.json:
        runner.write(res, args.json)
        runner.partial_path(args.json).unlink(missing_ok=True)
    print(runner.markdown([res]), end="")
    if res["n_errors"]:
        print(f"{res['n_errors']} item(s) could not be read and count as wrong; first: {res['errors'][0]['error']}",
              file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m vltok.eval.cli``) with just these two subcommands."""
    ap = argparse.ArgumentParser(prog="vltok")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
