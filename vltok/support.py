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


def _optional(method, stage) -> bool:
    """A stage the method can run without (``optional`` on its stage object, e.g. MustDrop's stage 1)."""
    obj = getattr(method, stage, None)
    return obj is not None and getattr(obj, "optional", False)   # (in-LLM / decode objects: see vltok.stages)


def _provides(adapter_cls, method, stage) -> bool:
    """Whether the adapter runs this stage of the method: in its stage list and, for the vision stage, not refused
    by the adapter's own check of the merger (``vision_refusal``, e.g. the Qwen tower needs a known merge count)."""
    if stage not in adapter_cls.stages:
        return False
    vision = getattr(method, "vision", None)
    return stage != "vision" or vision is None or adapter_cls.vision_refusal(vision) is None


def _not_applicable(adapter_cls, method) -> dict:
    reasons = dict(adapter_cls.not_applicable)
    why = adapter_cls.vision_refusal(method.vision) if getattr(method, "vision", None) is not None else None
    if why:
        reasons["vision"] = why
    return reasons


def _post_fallback(adapter_cls, method):
    """``schedule="auto"`` (tome, crossget): where the family has no vision stage but a pre-LLM one, the vision
    merger's post-encoder reducer (``.post``) runs instead, as if ``schedule="post"`` had been asked for."""
    post = method.vision.post if getattr(method, "vision", None) is not None else None
    if post is None or _provides(adapter_cls, method, "vision") or "pre_llm" not in adapter_cls.stages:
        return method
    import dataclasses

    return dataclasses.replace(method, vision=None, pre_llm=post, params={"schedule": "post"})


SIDE_INPUTS = {"cls_attention": "the vision tower's CLS-token attention; towers without CLS (SigLIP, Qwen's) have none",
               "text_embeds": "the LLM input embeddings of the prompt's text"}


def incompatibility(adapter_cls, method) -> str | None:
    """None when an adapter can run a method (a built ``Method``, or just its stages), else the reason, from the
    adapter's code: a stage it does not provide (unless the method marks that stage optional)."""
    method = _post_fallback(adapter_cls, method)
    stages = method.stages if hasattr(method, "stages") else tuple(method)
    missing = [s for s in stages if not (_provides(adapter_cls, method, s) if hasattr(method, "stages")
                                         else s in adapter_cls.stages) and not _optional(method, s)]
    reducer = getattr(method, "pre_llm", None)
    if reducer is not None and reducer.temporal and not adapter_cls.runs_temporal:
        return (f"reduces across video frames (a temporal method); vltok's {adapter_cls.family} adapter has no video "
                "input, and images pass through a temporal method unchanged")
    if not missing:
        if reducer is not None:   # what the stage's install() needs of the family, and its side inputs
            for site, reason in reducer.needed_sites().items():
                if site not in adapter_cls.sites:
                    return reason.format(family=adapter_cls.family)
            lacking = [n for n in reducer.needs if n not in adapter_cls.side_inputs]
            if lacking:   # the side-input contract (vltok/stages.py): an adapter gives what its family has
                return (f"needs {', '.join(lacking)} ({'; '.join(SIDE_INPUTS.get(n, n) for n in lacking)}) before "
                        f"the LLM, which vltok's {adapter_cls.family} adapter does not give (it gives: "
                        f"{', '.join(adapter_cls.side_inputs) or 'none'})")
            if getattr(reducer, "positions", "contiguous") == "original" and not adapter_cls.original_positions:
                return (f"with positions='original' keeps the full grid's position ids, which vltok's "
                        f"{adapter_cls.family} adapter does not do (LLaVA-1.5 only); use positions='contiguous'")
        return None
    reasons = _not_applicable(adapter_cls, method) if hasattr(method, "stages") else adapter_cls.not_applicable
    why = "; ".join(reasons[s] for s in missing if s in reasons)
    return (f"works in stage(s) {', '.join(missing)}, which vltok's {adapter_cls.family} adapter does not provide "
            f"(it provides: {', '.join(adapter_cls.stages)})" + (f": {why}" if why else ""))


def limitations(adapter_cls, method) -> str | None:
    """For a method that runs on an adapter: what of it does not apply there (None when all of it does), e.g.
    an optional stage the family lacks, or a key set without a vision-side score (the engine warns then)."""
    if not hasattr(method, "stages"):
        return None
    out = []
    fitted = _post_fallback(adapter_cls, method)
    if fitted is not method:
        out.append("merges after the vision encoder (schedule='post'): the family has no vision stage")
        method = fitted
    if method.pre_llm is not None and method.pre_llm.temporal:
        out.append("videos only: images (and one-frame videos) pass through unchanged")
    parts = [s for s in method.stages if not _provides(adapter_cls, method, s) and _optional(method, s)]
    if parts:
        refused = _not_applicable(adapter_cls, method)
        why = "; ".join(refused[s] for s in parts if s in adapter_cls.stages and s in refused)
        out.append(f"stage(s) {', '.join(parts)} not applicable ("
                   + (why or f"vltok's {adapter_cls.family} adapter has none") + ")")
    unused = [n for n in (method.pre_llm.wants if method.pre_llm is not None else ())
              if n not in adapter_cls.side_inputs]
    if unused:
        out.append(f"runs without {', '.join(unused)} (the adapter does not give it: no text conditioning)")
    if getattr(method.in_llm, "needs_saliency", False) and not adapter_cls.gives_saliency:
        out.append("key set not applicable: no vision-side CLS score (runs as key_rate=0)")
    if not out:
        return None
    runs = [s for s in method.stages if s not in parts]
    return "; ".join(out) + f"; stage(s) {', '.join(runs)} run"


def fit_to_family(adapter_cls, method):
    """The method as it runs on the adapter: ``schedule="auto"`` resolved (vision merging falls back to merging
    after the encoder where the family has no vision stage), and without the optional stages the adapter lacks
    (with a warning naming them)."""
    method = _post_fallback(adapter_cls, method)
    drop = [s for s in method.stages if not _provides(adapter_cls, method, s) and _optional(method, s)]
    if not drop:
        return method
    import dataclasses
    import warnings

    warnings.warn(f"{method.name}: stage(s) {', '.join(drop)} not applicable on vltok's {adapter_cls.family} "
                  "adapter; running the other stages", stacklevel=3)
    return dataclasses.replace(method, **{s: None for s in drop})


def default_method(name: str, **options):
    """The method as ``vltok.patch(model, name, keep=0.5, **options)`` builds it (its default options)."""
    return registry.get(name).factory(0.5, **options)


def rows() -> list[tuple[str, str, dict]]:
    """The matrix rows, (label, method name, options): every method with its default options, each followed by the
    variants its registration names (label ``"<method> <option>=<value>"``)."""
    out = []
    for name, info in registry.methods().items():
        out.append((name, name, {}))
        out += [(f"{name} {label}", name, dict(opts)) for label, opts in info.variants]
    return out


def families() -> dict[str, list[str]]:
    """family -> the model classes its adapter covers (the adapters' registration order)."""
    out: dict[str, list[str]] = {}
    for cls_name, adapter in registry.adapter_classes().items():
        out.setdefault(adapter.family, []).append(cls_name)
    return out


def matrix(notes: bool = False) -> dict:
    """(method, family) -> None when it works (with the method's default options), else the reason it does not;
    with ``notes``: (method, family) -> (reason, limitation) (limitation: what does not apply where it works)."""
    adapters = {a.family: a for a in registry.adapter_classes().values()}
    out = {}
    for label, name, opts in rows():
        m = default_method(name, **opts)
        for fam, ad in adapters.items():
            reason = incompatibility(ad, m)
            out[(label, fam)] = (reason, None if reason else limitations(ad, m)) if notes else reason
    return out


def markdown() -> str:
    fams = families()
    table = matrix(notes=True)
    head = "| method | stages | " + " | ".join(f"`{f}`" for f in fams) + " |"
    lines = [head, "|" + "---|" * (len(fams) + 2)]
    notes: dict[str, int] = {}
    for label, name, opts in rows():
        cells = []
        for fam in fams:
            reason, limit = table[(label, fam)]
            if reason is None and limit is None:
                cells.append("works")
            elif reason is None:
                k = notes.setdefault(limit, len(notes) + 1)
                cells.append(f"works [{k}]")
            else:
                k = notes.setdefault(reason, len(notes) + 1)
                cells.append(f"n/a [{k}]")
        stages = ", ".join(registry.methods()[name].stages if not opts else default_method(name, **opts).stages)
        row = f"`{name}`" + (f" {label[len(name) + 1:]}" if opts else "")
        lines.append(f"| {row} | {stages} | " + " | ".join(cells) + " |")
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
