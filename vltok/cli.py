"""The `vltok` command line: `vltok methods`, `vltok bench ...`, and the subcommands other modules register
(`vltok shapes`, `vltok eval` from vltok.eval.cli; `vltok train` from vltok.train; `vltok demo` from vltok.demos.app)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import VltokError

# modules that may add subcommands through register(subparsers); absent ones are skipped
PLUGINS = ("vltok.eval.cli", "vltok.train", "vltok.video.cli", "vltok.eval.shapes_video", "vltok.demos.app")


def _methods(args):
    import vltok

    print(vltok.methods())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vltok", description="Visual-token reduction for Hugging Face VLMs")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered methods",
                   description="List vltok's registered token-reduction methods: name, the stages it works in "
                               "and what it does (the names --method takes).").set_defaults(func=_methods)
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

        run = lambda: speed.main(argv[1:])  # noqa: E731
    else:
        args = build_parser().parse_args(argv)
        args.argv = argv   # the command as typed (recorded in result files)
        run = lambda: args.func(args)  # noqa: E731
    try:
        return run()
    except (VltokError, FileNotFoundError, NotADirectoryError) as e:
        # bad input (vltok's own errors, a missing path): one line and exit code 2, as argparse does; a real bug
        # (any other exception) still shows its traceback
        return fail(e)


def fail(error) -> int:
    """Print ``vltok: error: <message>`` (one line) on stderr; returns exit code 2."""
    msg = " ".join((error if isinstance(error, str) else _message(error)).split())
    print(f"vltok: error: {msg}", file=sys.stderr)
    return 2


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
