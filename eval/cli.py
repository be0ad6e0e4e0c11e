"""``vltok shapes`` and ``vltok eval``: call :func:`register` with the ``vltok`` parser's subparsers.

    vltok shapes data/shapes-test --n 2268 --seed 0
    vltok eval data/shapes-test                                   # the full reference VLM
    vltok eval data/shapes-test --method fourier --keep 0.16 --json results/fourier-0.16.json
    vltok eval DIR --model /path/to/llava-1.5-7b-hf --device cuda --limit 200
"""
from __future__ import annotations

import argparse
import json
import sys


def _kv(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(subparsers) -> None:
    p = subparsers.add_parser("shapes", help="write the shapes benchmark (images/ + questions.jsonl) into DIR",
                              description="Generate the balanced shapes test split (fixed seeds) into DIR.")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=2268, help="number of questions (balanced over 9 types x 3 regions)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the split")
    p.set_defaults(func=cmd_shapes)

    e = subparsers.add_parser("eval", help="score a model (+ an optional vltok method) on a shapes-format folder",
                              description="Evaluate the reference VLM or any LLaVA-family checkpoint on DIR.")
    e.add_argument("dir", help="folder with images/ and questions.jsonl")
    e.add_argument("--method", default=None, help="vltok method (none = the full model)")
    e.add_argument("--keep", type=float, default=None, help="keep ratio for --method")
    e.add_argument("--arg", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra method keyword argument (value parsed as JSON when possible); repeatable")
    e.add_argument("--limit", type=int, default=None, help="only the first N questions")
    e.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=24)
    e.add_argument("--json", default=None, metavar="OUT", help="write the result JSON here (+ OUT.md table)")
    e.add_argument("--model", default=None, metavar="PATH",
                   help="a LLaVA-family checkpoint on disk (default: the reference VLM, vltok.reference.load())")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)


def cmd_shapes(args) -> int:
    from . import shapes

    out = shapes.generate(args.dir, n=args.n, seed=args.seed, progress=True)
    print(f"wrote {args.n} questions to {out / 'questions.jsonl'}")
    return 0


def load_model(path: str | None, device: str, dtype: str):
    import torch

    dt = getattr(torch, dtype)
    if path is None:
        from vltok import reference

        return reference.load(device=device, dtype=dt), "vltok-ref"
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dt).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return (model, processor), str(path)


def cmd_eval(args) -> int:
    import torch

    from . import runner

    if args.keep is not None and args.method is None:
        print("--keep needs --method", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    (model, processor), name = load_model(args.model, device, args.dtype)
    patch = None
    if args.method:
        patch = {"method": args.method, "keep": args.keep if args.keep is not None else 0.16, **dict(args.arg)}
    res = runner.evaluate(model, processor, args.dir, patch, limit=args.limit, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, progress=not args.no_progress, model_name=name)
    if args.json:
        runner.write(res, args.json)
    print(runner.markdown([res]), end="")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m vltok.eval.cli``) with just these two subcommands."""
    ap = argparse.ArgumentParser(prog="vltok")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
