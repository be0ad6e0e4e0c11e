"""``vltok shapes`` and ``vltok eval``: call :func:`register` with the ``vltok`` parser's subparsers.

    vltok shapes data/shapes-test --n 2268 --seed 0
    vltok shapes data/shapes-vqa --n 270 --export vqav2          # the same split in the VQAv2 layout
    vltok eval data/shapes-test                                   # the full reference VLM
    vltok eval data/shapes-test --method fourier --keep 0.16 --json results/fourier-0.16.json
    vltok eval /data/pope --format pope --model /path/to/llava-1.5-7b-hf --device cuda --json out/pope.json
    vltok eval /data/pope --json out/pope.json --resume           # after Ctrl-C: continue where it stopped

Bad input (a missing folder, ``--batch-size 0``, an unwritable ``--json`` path, a malformed questions line, an
unknown ``--method``, a ``--keep`` outside (0, 1], an option the method does not take, a method the model's family
cannot run) ends with one line on stderr and exit code 2, before any model is loaded. Benchmark formats:
docs/benchmarks.md. A shapes-video folder (``vltok shapes-video DIR``) is scored with the video reference VLM
(vltok-ref-video, 16 frames unless ``--frames``); the options that do not apply to it are refused.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from vltok import cli_args
from vltok.errors import VltokError

_kv = cli_args.key_value
VIDEO_FRAMES = 8   # --frames default for the video benchmark formats (shapes-video: the video reference VLM's 16)


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
    e.add_argument("--scorer", choices=["official", "lmms"], default=None,
                   help="official scoring (default) or lmms-eval 0.7.3's, where they differ (vqav2, pope)")
    e.add_argument("--method", default=None,
                   help="vltok method (vltok methods lists them; none or not given = the full model)")
    e.add_argument("--keep", type=float, default=None,
                   help=f"share of visual tokens --method keeps, in (0, 1] (default {cli_args.DEFAULT_KEEP})")
    e.add_argument("--arg", "--method-arg", dest="arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra method option (value parsed as JSON when possible); repeatable")
    e.add_argument("--limit", type=int, default=None, help="only the first N questions")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    e.add_argument("--dtype", type=cli_args.dtype, default="float32", metavar="DTYPE",
                   help=f"{cli_args.DTYPE_HELP}; default float32")
    e.add_argument("--batch-size", type=int, default=16, help="questions per model call (default 16)")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the benchmark's (16 for short answers, 128 for POPE, 24 for shapes)")
    e.add_argument("--frames", type=int, default=None,
                   help=f"frames sampled per video (video formats; default {VIDEO_FRAMES}, shapes-video 16)")
    e.add_argument("--json", default=None, metavar="OUT",
                   help="write the result JSON here (+ the table as OUT with the suffix .md); finished batches go "
                        "to OUT.partial.jsonl as they complete")
    e.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT.partial.jsonl (needs --json; same model, method, "
                        "dataset); items that failed before are retried")
    e.add_argument("--model", default=None, metavar="PATH",
                   help="a checkpoint on disk (any family vltok supports; default: the reference VLM, "
                        "vltok.reference.load())")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)


def _fail(msg) -> int:
    from vltok.cli import fail

    return fail(msg)


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
    if cli_args.is_none(args.method):
        return None
    # keep None: not given (vltok.patch's default, or what a budget-fixing --arg implies); resize needs a number
    keep = cli_args.DEFAULT_KEEP if args.keep is None and args.method == "resize" else args.keep
    return {"method": args.method, "keep": keep, **dict(args.arg)}


def _check_common(args, model_cls: str | None) -> str | None:
    """The checks every folder kind shares (no model, no dataset needed): a message, or None."""
    if args.keep is not None and cli_args.is_none(args.method):
        return "--keep needs --method (a vltok method; without one the full model runs)"
    if args.arg and cli_args.is_none(args.method):
        return "--arg needs --method (the options are the method's)"
    if args.batch_size < 1:
        return f"--batch-size must be at least 1 (got {args.batch_size})"
    if args.limit is not None and args.limit < 1:
        return f"--limit must be at least 1 (got {args.limit})"
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})"
    if args.frames is not None and args.frames < 1:
        return f"--frames must be at least 1 (got {args.frames})"
    if args.resume and not args.json:
        return "--resume needs --json OUT (the run's partial results are kept in OUT.partial.jsonl)"
    d = Path(args.dir)
    if not d.exists():
        return f"{d}: no such folder"
    if not d.is_dir():
        return f"{d} is not a folder"
    if args.model is not None and str(args.model) not in ("vltok-ref", "reference") and not Path(args.model).exists():
        return f"--model {args.model}: no such checkpoint folder (no model hub is used: download it first)"
    patch = _patch(args)
    if patch is not None:
        options = {k: v for k, v in patch.items() if k not in ("method", "keep")}
        try:
            if args.method == "resize":   # eval's processor-side baseline (vltok.resize), not a registered method
                from vltok.api import _check_keep

                _check_keep(patch["keep"])
                if options:
                    return f"--method resize takes no --arg options (got {', '.join(sorted(options))})"
            else:   # the checks vltok.patch runs, before the model loads; the registered spelling from here on
                args.method = cli_args.check_method(args.method, patch["keep"], options, model_cls)
        except VltokError as e:
            return str(e)
    return None


def _check_args(args):
    """Every check that needs no model: a message, or the loaded dataset."""
    from . import datasets, runner

    msg = _check_common(args, cli_args.model_class(args.model))
    if msg:
        return msg
    d = Path(args.dir)
    try:
        ds = datasets.load(d, args.format, **({"split": args.split} if args.split else {}))
        if (args.scorer or "official") not in ds.scorers:
            return f"--scorer {args.scorer}: the {ds.format} format has only {', '.join(ds.scorers)}"
        if args.json:
            runner.check_writable(args.json)
        if args.resume:
            name = "vltok-ref" if args.model in (None, "vltok-ref", "reference") else str(args.model)
            runner.check_resume(args.json, runner.run_header(name, _patch(args), ds,
                                                             args.max_new_tokens or ds.max_new_tokens,
                                                             args.frames or VIDEO_FRAMES))
    except (datasets.DatasetError, FileNotFoundError) as e:
        return str(e)
    return ds


def _command(args) -> str:
    """The command as typed (``vltok`` + its arguments), for the result files."""
    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:]
    return "vltok " + shlex.join(str(a) for a in argv)


# options of `vltok eval` that have no meaning for a shapes-video folder (the video reference VLM's own evaluation)
_NOT_FOR_VIDEO = (("scorer", "--scorer", "one exact-match scorer"),
                  ("resume", "--resume", "the video evaluation keeps no partial results; rerun the command"),
                  ("max_new_tokens", "--max-new-tokens", "answers are one or two words, 10 new tokens"),
                  ("split", "--split", "a scienceqa option"))


def _is_video(args) -> bool:
    from . import shapes_video

    return args.format == "shapes-video" or (args.format is None and shapes_video.is_video_folder(args.dir))


def _cmd_eval_video(args) -> int:
    """vltok's video benchmark: scored with the video reference VLM (vltok-ref-video), 16 frames per clip unless
    --frames says otherwise."""
    from vltok import reference_video

    from . import quality_video, runner, shapes_video

    if args.model is not None:
        return _fail(f"--model does not apply to the shapes-video folder {args.dir}: it is scored with the video "
                     "reference VLM (vltok-ref-video); run other video models with `vltok video run`")
    for attr, flag, why in _NOT_FOR_VIDEO:
        if getattr(args, attr):
            return _fail(f"{flag} does not apply to shapes-video folders ({why})")
    msg = _check_common(args, cli_args.REFERENCE_CLASSES["vltok-ref-video"])
    if msg:
        return _fail(msg)
    if not shapes_video.is_video_folder(args.dir):
        return _fail(f"{args.dir} is not a shapes-video folder (its questions.jsonl has no 'video' records); "
                     "write one with `vltok shapes-video DIR`")
    if args.json:
        runner.check_writable(args.json)
    patch = _patch(args) or {"method": None, "keep": None}
    method, keep = patch.pop("method"), patch.pop("keep")
    if method and keep is None:   # not given: the default, unless an --arg fixes the budget (then it decides)
        from vltok.registry import get

        keep = None if get(method).fixed_budget(patch) is not None else cli_args.DEFAULT_KEEP
    quality_video.eval_folder(args.dir, method, keep, options=patch, device=args.device, dtype=args.dtype,
                              frames=args.frames or reference_video.NUM_FRAMES, limit=args.limit,
                              batch_size=args.batch_size, json_path=args.json, command=_command(args))
    return 0


def cmd_eval(args) -> int:
    import torch

    from . import runner
    from .datasets import DatasetError

    if Path(args.dir).is_dir() and _is_video(args):
        return _cmd_eval_video(args)
    ds = _check_args(args)
    if isinstance(ds, str):
        return _fail(ds)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    (model, processor), name = load_model(args.model, device, args.dtype)
    patch = _patch(args)
    try:
        res = runner.evaluate(model, processor, ds, patch, limit=args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=not args.no_progress, model_name=name,
                              scorer=args.scorer or "official", frames=args.frames or VIDEO_FRAMES,
                              save=args.json, resume=args.resume)
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
    args.argv = argv if argv is not None else sys.argv[1:]
    try:
        return args.func(args)
    except (VltokError, FileNotFoundError) as e:
        return _fail(e)


if __name__ == "__main__":
    raise SystemExit(main())
