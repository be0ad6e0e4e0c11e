"""Quality tables: every method x keep on the reference VLM, against the full model and the random / pooling
baselines at the same budgets (``make quality``; GPU recommended).

    python -m vltok.eval.quality DATA_DIR --device cuda --out eval/results/quality-h100

writes ``OUT.json`` (every run: score overall / per type / per region, achieved keep, FLOPs-equivalent keep, one
0/1 character per question), ``OUT.md`` (a method x keep summary, then every run in full) and ``OUT.png`` (accuracy
vs FLOPs-equivalent keep, one line per method). DATA_DIR is any folder in the shapes format (``vltok shapes DIR``);
``--per-cell N`` takes the first N questions of every (type, region) cell so that a subset stays balanced.

Questions are run grouped by type: answers of one type have one length, so ``generate`` stops early for every
batch but the grounding ones (the accuracy of a question does not depend on its batch).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import runner, shapes

KEEPS = (1.0, 0.5, 0.33, 0.22, 0.16, 0.11, 0.05)
BASELINES = ("random", "pool")
PROCESSOR_SIDE = ("resize",)   # not model patches: the runner wraps the processor (vltok.resize)
# budgets a method reaches exactly, beside the common grid (token-shuffle: keep = 1 / (s_h * s_w))
NATURAL = {"tokenshuffle": (1 / 4, 1 / 9, 1 / 16)}


def balanced(records: list[dict], per_cell: int | None) -> list[dict]:
    """The first ``per_cell`` records of every (type, region) cell, in file order; all records when None."""
    if per_cell is None:
        return list(records)
    seen: dict[tuple, int] = {}
    out = []
    for r in records:
        key = (r["type"], r.get("region"))
        if seen.get(key, 0) < per_cell:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out


def by_answer_length(records: list[dict]) -> list[dict]:
    """Stable order by question type (short-answer types first, grounding last)."""
    order = {t: i for i, t in enumerate(("exist", "relation", "count", "color", "shape", "position",
                                         "located_attribute", "text", "grounding"))}
    return sorted(records, key=lambda r: order.get(r["type"], len(order)))


def plan(methods: list[str], keeps: list[float], natural: bool = True) -> list[tuple[str, float]]:
    """(method, keep) runs: the full model once, then every method at every keep < 1 and (``natural``) at its
    natural budgets."""
    runs = [("full", 1.0)]
    for m in methods:
        nat = NATURAL.get(m, ()) if natural else ()
        ks = sorted({k for k in keeps if k < 1.0} | {round(k, 6) for k in nat}, reverse=True)
        runs += [(m, k) for k in ks]
    return runs


def parse_variants(specs: list[str], registered) -> dict[str, tuple[str, dict]]:
    """``LABEL=METHOD:JSON`` -> {label: (method, keywords)}: a configured method measured as its own row."""
    out = {}
    for v in specs:
        label, _, rest = v.partition("=")
        base, _, kw = rest.partition(":")
        if not label or base not in registered:
            raise ValueError(f"--variant {v!r}: expected LABEL=METHOD:JSON with a registered METHOD "
                             f"({', '.join(sorted(registered))})")
        if label in registered or label in out:
            raise ValueError(f"--variant {v!r}: the label {label!r} is already a method or another variant")
        try:
            kwargs = json.loads(kw) if kw else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"--variant {v!r}: the keywords are not JSON ({e})") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--variant {v!r}: the keywords must be a JSON object")
        out[label] = (base, kwargs)
    return out


def compact(res: dict, method: str, keep: float) -> dict:
    """A result without per-question text: the score, stats and one '0'/'1' per question (in ``ids`` order)."""
    out = {k: v for k, v in res.items() if k != "predictions"}
    out["method"], out["keep"] = method, keep
    out["correct"] = "".join("1" if p["correct"] else "0" for p in res.get("predictions", []))
    return out


def summary(results: list[dict], methods: list[str]) -> str:
    """Overall accuracy (%) per method x requested keep, with FLOPs-equivalent keep in brackets, and the
    retention vs the full model."""
    full = next(r for r in results if r["method"] == "full")
    base = full["score"]["overall"]
    keeps = sorted({r["keep"] for r in results if r["method"] != "full"}, reverse=True)
    head = ["method"] + [f"{k:.3g}" for k in keeps]
    lines = [f"Full model: **{100 * base:.1f} %** ({full['n']} questions). Cells: accuracy % "
             f"(retention vs full %, FLOPs-equivalent keep achieved); '-' = not run; 'err' = the method refused.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m]
        for k in keeps:
            r = next((x for x in results if x["method"] == m and abs(x["keep"] - k) < 1e-6), None)
            if r is None:
                row.append("-")
            elif "error" in r:
                row.append("err")
            else:
                acc = r["score"]["overall"]
                keq = r.get("stats", {}).get("flops_keep")
                row.append(f"{100 * acc:.1f} ({100 * acc / base:.0f}%, {keq:.3f})" if keq is not None
                           else f"{100 * acc:.1f} ({100 * acc / base:.0f}%)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def region_table(results: list[dict], methods: list[str], keep: float) -> str:
    """Accuracy per image third of the evidence at one keep: where a method loses what it drops ("-" for a third
    with no question, as on a small --n)."""
    lines = [f"| method (keep {keep:g}) | @top | @middle | @bottom | bottom - top |", "|---|---|---|---|---|"]
    for r in results:
        if (r["method"] == "full" or (r["method"] in methods and abs(r["keep"] - keep) < 1e-6)) and "error" not in r:
            g = r["score"]["by_region"]
            t, m, b = (100 * g[x]["acc"] if x in g else None for x in ("top", "middle", "bottom"))
            cells = " | ".join("-" if v is None else f"{v:.1f}" for v in (t, m, b))
            diff = "-" if t is None or b is None else f"{b - t:+.1f}"
            lines.append(f"| {r['method']} | {cells} | {diff} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: str | Path) -> None:
    """Accuracy vs FLOPs-equivalent keep, one line per method (log x), the full model as a dashed line."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the quality plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next(r for r in results if r["method"] == "full")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in results if r["method"] != "full"))
    for m in methods:
        pts = sorted((r.get("stats", {}).get("flops_keep", r["keep"]), 100 * r["score"]["overall"])
                     for r in results if r["method"] == m and "error" not in r)
        if pts:
            style = "--" if m in BASELINES else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=m)
    ax.axhline(100 * full["score"]["overall"], color="k", ls=":", lw=1, label="full model")
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs-equivalent keep (achieved)")
    ax.set_ylabel("accuracy on shapes test subset (%)")
    ax.set_title(f"vltok-ref: accuracy vs visual-token budget ({full['n']} questions)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)


def write_all(results: list[dict], methods: list[str], out: str | Path, header: str = "",
              question_ids: list | None = None) -> None:
    """``OUT.json`` = {"question_ids": [...], "runs": results} (each run's ``correct`` follows question_ids) and
    ``OUT.md``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"question_ids": question_ids, "runs": results}, indent=1) + "\n")
    ok = [r for r in results if "error" not in r]
    full = next(r for r in ok if r["method"] == "full")
    md = [header, "## Summary", "", summary(results, methods), "## Accuracy per image third at keep 0.16", "",
          region_table(results, methods, 0.16), "## Every run", "", runner.markdown(ok, baseline=full)]
    errs = [r for r in results if "error" in r]
    if errs:
        md += ["## Refused runs", ""] + [f"- {r['method']} keep {r['keep']:g}: {r['error']}" for r in errs] + [""]
    out.with_suffix(".md").write_text("\n".join(md))


def main(argv=None) -> int:
    import torch

    import vltok
    from vltok import registry

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder in the shapes format")
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out")
    ap.add_argument("--keeps", nargs="*", type=float, default=list(KEEPS))
    ap.add_argument("--per-cell", type=int, default=None, help="questions per (type, region) cell (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--delta", default=None, help="reference delta (default: the committed one)")
    ap.add_argument("--out", default="eval/results/quality")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in OUT.json, do the rest")
    ap.add_argument("--no-natural", action="store_true",
                    help="only --keeps (e.g. a trained variant that exists for one budget)")
    ap.add_argument("--arg", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="extra keyword for one method, value parsed as JSON (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD:JSON",
                    help="a configured method measured as its own table row, e.g. "
                         "'feather-1cut=feather:{\"layers\": [2, 3]}' (repeatable; the label joins --methods)")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    methods = args.methods if args.methods is not None else sorted(vltok.methods()) + list(PROCESSOR_SIDE)
    try:
        variants = parse_variants(args.variant, vltok.methods())
    except ValueError as e:
        ap.error(str(e))
    methods = [m for m in methods if m not in args.skip] + [v for v in variants if v not in args.skip]
    unknown = sorted(set(methods) - set(vltok.methods()) - set(variants) - set(PROCESSOR_SIDE))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; registered: {sorted(vltok.methods())} and {list(PROCESSOR_SIDE)}")
    extra: dict[str, dict] = {}
    for a in args.arg:
        m, _, kv = a.partition(":")
        k, _, v = kv.partition("=")
        if not k or not _:
            ap.error(f"--arg {a!r}: expected METHOD:KEY=VALUE")
        try:
            extra.setdefault(m, {})[k] = json.loads(v)
        except json.JSONDecodeError:
            extra.setdefault(m, {})[k] = v

    from vltok import reference

    records = by_answer_length(balanced(shapes.load_dataset(args.data), args.per_cell))
    model, processor = reference.load(device=args.device, dtype=getattr(torch, dtype),
                                      delta=args.delta if args.delta else True)
    results: list[dict] = []
    ids = [r["id"] for r in records]
    done_path = Path(args.out).with_suffix(".json")
    if args.resume and done_path.exists():
        old = json.loads(done_path.read_text())
        if old.get("question_ids") != ids:
            ap.error(f"--resume: {done_path} was measured on other questions; remove it or change --out")
        results = [r for r in old["runs"] if "error" not in r]
        print(f"resuming: {len(results)} runs kept from {done_path}", flush=True)
    t0 = time.time()
    runs = plan(methods, args.keeps, natural=not args.no_natural)
    fixed_done: set[str] = set()   # variants whose options fix the budget: run once, keep not given
    for i, (m, k) in enumerate(runs, 1):
        if any(r["method"] == m and abs(r["keep"] - k) < 1e-9 for r in results):
            continue
        base, kw = variants.get(m, (m, {}))
        kw = {**kw, **extra.get(m, {})}
        fixed = m != "full" and base in vltok.methods() and registry.get(base).fixed_budget(kw) is not None
        if fixed and (m in fixed_done or any(r["method"] == m for r in results)):
            continue   # its budget is the option's, measured once (at the keep it gave)
        patch = None if m == "full" else {"method": base, "keep": None if fixed else k, **kw}
        t = time.time()
        try:
            res = runner.evaluate(model, processor, records, patch=patch, batch_size=args.batch_size,
                                  progress=False)
            if fixed:
                fixed_done.add(m)
                k = round(float(res["keep"]), 6)   # the column of the keep the option gave
            results.append(compact(res, m, k))
            msg = f"{100 * res['score']['overall']:.1f}%"
        except Exception as e:  # noqa: BLE001 - recorded in the table, the sweep goes on
            results.append({"method": m, "keep": k, "patch": patch, "error": f"{type(e).__name__}: {e}"})
            msg = f"refused: {type(e).__name__}: {e}"
        print(f"[{i}/{len(runs)}] {m} keep={k:g}: {msg} ({time.time() - t:.1f} s)", flush=True)
        dev = results[0].get("gpu") or args.device
        v = results[0].get("versions", {})
        header = (f"# Quality tables: vltok-ref on shapes ({len(records)} questions, "
                  f"{args.per_cell or 'all'} per type x region cell)\n\n"
                  f"Device {dev}, {dtype}, greedy, batch {args.batch_size}; torch {v.get('torch')}, transformers "
                  f"{v.get('transformers')}; {i} of {len(runs)} runs, {time.time() - t0:.0f} s. Command: "
                  "`python -m vltok.eval.quality " + " ".join(argv if argv is not None else sys.argv[1:]) + "`.\n")
        if results[0]["method"] == "full" and "error" not in results[0]:  # rewritten after every run: a cut
            write_all(results, methods, args.out, header, ids)  # sweep keeps its tables
    if not args.no_plot:
        plot([r for r in results if "error" not in r], Path(args.out).with_suffix(".png"))
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
