"""The `vltok` command line: `vltok methods`, `vltok bench ...`, and the subcommands other modules register
(`vltok shapes`, `vltok eval` from vltok.eval.cli; `vltok train` from vltok.train; `vltok demo` from vltok.demos.app)."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules that may add subcommands through register(subparsers); absent ones are skipped
PLUGINS = ("vltok.eval.cli", "vltok.train", "vltok.video.cli", "vltok.eval.shapes_video", "vltok.demos.app")


def _methods(args):
    import vltok

    print(vltok.methods())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vltok", description="Visual-token reduction for Hugging Face VLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered methods").set_defaults(func=_methods)
    sub.add_parser("bench", help="speed benchmark on a GPU: vltok bench --help lists its options")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:   # its options belong to vltok.eval.speed; hand them over untouched
        from vltok.eval import speed

        return speed.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
