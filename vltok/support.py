"""Which method works on which model family, and why not where it does not: generated from the registry and the
adapters, so the README table, the test matrix and ``vltok.patch``'s error all say the same thing.

    python -m vltok.support            # print the Markdown table
    python -m vltok.support --write    # replace the table in README.md between the marker comments
"""
from __future__ import annotations

import argparse
import pathlib

from . import registry

BEGIN, END = "<!-- support-matrix:begin (python -m vltok.support --write) -->", "<!-- support-matrix:end -->"


def incompatibility(adapter_cls, method) -> str | None:
    """None when an adapter can run a method (a built ``Method``, or just its stages), else the reason, from the
    adapter's code: a stage it does not provide, or a vision-side score it cannot give (``needs_saliency``)."""
    stages = method.stages if hasattr(method, "stages") else tuple(method)
    missing = [s for s in stages if s not in adapter_cls.stages]
    if not missing:
        if getattr(getattr(method, "pre_llm", None), "projector", None) is not None and \
                not getattr(adapter_cls, "runs_method_projector", False):
            return (f"brings a trained projector, which vltok's {adapter_cls.family} adapter cannot run in place of "
                    "the model's (LLaVA-1.5 only); use the training-free mode (no projector=)")
        needs = getattr(getattr(method, "in_llm", None), "needs_saliency", False)
        if needs and not _gives_saliency(adapter_cls):
            return (f"needs a vision-side token score (CLS attention) for its key set, which vltok's "
                    f"{adapter_cls.family} adapter does not provide (pass key_rate=0 to run without it)")
        return None
    reasons = getattr(adapter_cls, "not_applicable", {})
    why = "; ".join(reasons[s] for s in missing if s in reasons)
    return (f"works in stage(s) {', '.join(missing)}, which vltok's {adapter_cls.family} adapter does not provide "
            f"(it provides: {', '.join(adapter_cls.stages)})" + (f": {why}" if why else ""))


def _gives_saliency(adapter_cls) -> bool:
    from vltok.adapters.base import PlaceholderAdapter

    own = getattr(adapter_cls, "install_saliency", None)
    return own is not None and own is not getattr(PlaceholderAdapter, "install_saliency", None)


def default_method(name: str):
    """The method as ``vltok.patch(model, name, keep=0.5)`` builds it (its default options)."""
    return registry.get(name).factory(0.5)


def families() -> dict[str, list[str]]:
    """family -> the model classes its adapter covers (the adapters' registration order)."""
    from vltok.adapters import SUPPORTED

    out: dict[str, list[str]] = {}
    for cls_name, adapter in SUPPORTED.items():
        out.setdefault(adapter.family, []).append(cls_name)
    return out


def matrix() -> dict[tuple[str, str], str | None]:
    """(method, family) -> None when it works (with the method's default options), else the reason it does not."""
    from vltok.adapters import SUPPORTED

    adapters = {a.family: a for a in SUPPORTED.values()}
    return {(name, fam): incompatibility(adapters[fam], default_method(name))
            for name in registry.methods() for fam in adapters}


def markdown() -> str:
    fams = families()
    table = matrix()
    names = list(registry.methods())
    head = "| method | stages | " + " | ".join(f"`{f}`" for f in fams) + " |"
    lines = [head, "|" + "---|" * (len(fams) + 2)]
    notes: dict[str, int] = {}
    for name in names:
        cells = []
        for fam in fams:
            reason = table[(name, fam)]
            if reason is None:
                cells.append("works")
            else:
                k = notes.setdefault(reason, len(notes) + 1)
                cells.append(f"n/a [{k}]")
        stages = ", ".join(registry.methods()[name].stages)
        lines.append(f"| `{name}` | {stages} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Families: " + "; ".join(f"`{f}` = {', '.join(c)}" for f, c in fams.items()) + ".")
    if notes:
        lines.append("")
        for reason, k in notes.items():
            lines.append(f"[{k}] {reason}.")
    return "\n".join(lines)


def write_readme(path: pathlib.Path) -> bool:
    """Replace the table between the markers; True when the file changed."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no support-matrix markers ({BEGIN} ... {END})")
    a, rest = text.split(BEGIN, 1)
    _, b = rest.split(END, 1)
    new = f"{a}{BEGIN}\n{markdown()}\n{END}{b}"
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vltok.support", description=__doc__.splitlines()[0])
    ap.add_argument("--write", nargs="?", const="README.md", help="update the table in README.md (or this file)")
    args = ap.parse_args(argv)
    if args.write:
        changed = write_readme(pathlib.Path(args.write))
        print(f"{args.write}: {'updated' if changed else 'already up to date'}")
    else:
        print(markdown())


if __name__ == "__main__":
    main()
