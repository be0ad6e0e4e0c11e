"""The `vltok` command line: `vltok methods`, `vltok bench ...`, and the subcommands other modules register
(`vltok shapes`, `vltok eval` from vltok.eval.cli; `vltok train` from vltok.train)."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that may add subcommands through register(subparsers); absent ones are skipped
PLUGINS = ("vltok.eval.cli", "vltok.train")


def _methods(args):
    import vltok

    print(vltok.methods())


def _bench(args):
    from vltok.eval import speed

    speed.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vltok", description="Visual-token reduction for Hugging Face VLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered methods").set_defaults(func=_methods)
    b = sub.add_parser("bench", help="speed benchmark on a GPU (see python -m vltok.eval.speed --help)",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=_bench)
    for name in PLUGINS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        if hasattr(mod, "register"):
            mod.register(sub)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
