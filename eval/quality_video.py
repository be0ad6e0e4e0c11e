"""Video quality tables: every method x keep (per-frame and temporal methods) on the shapes-video test split with the
video reference VLM (``vltok-ref-video``), per question type, plus the frames x tokens-per-frame trade-off at equal
visual-token budgets (fewer frames at full tokens vs more frames at fewer tokens each).

    python -m vltok.eval.quality_video data/shapes-video-test --out eval/results/video --device cuda

DATA is a shapes-video folder (``vltok shapes-video DIR``); when it does not exist it is generated first (mp4s only
when PyAV is installed; otherwise the scene descriptions, re-rendered when read). Frames come from the mp4s when PyAV
is installed (``--source auto``), else they are re-rendered from the scene descriptions (``--source rendered``: the
same pictures without the codec's loss); the choice is recorded. Writes ``quality-video.json``, ``.md`` and ``.png``
into ``--out``. ``--max-minutes`` stops between runs and writes what it has (marked ``partial``); the JSON is also
rewritten after every run, so a process killed mid-way leaves the runs it finished (marked ``partial``).

:func:`predict` / :func:`clips_tensor` are shared with the training script (``vltok.train_reference_video``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vltok import reference_video as RV

from . import shapes_video as S

DEFAULT_KEEPS = (0.5, 0.25, 0.11)
TRADEOFF = ((4, 1.0), (8, 0.5), (16, 0.25), (8, 1.0), (16, 0.5))   # (frames, keep): budgets 576 and 1152 tokens
TRADEOFF_METHODS = ("pool", "evs", "tmerge")
SKIP_BY_DEFAULT = ("mustdrop",)   # three in-LLM stages on 2304-token prompts: slow; ask for it with --methods


def _clip_pixels(rec: dict, frames: int, source: str, single: bool = False) -> torch.Tensor:
    """uint8 [T, 3, 336, 336]: the record's sampled frames (resized as frames_to_pixels does, not normalised)."""
    import numpy as np
    from PIL import Image

    n = rec.get("n_frames") or rec["scene"]["n_frames"]
    idx = S.sample_indices(n, 1 if single else frames)
    if source == "rendered" or (source == "auto" and not (S.have_av() and Path(rec.get("video_path", "")).exists())):
        ims = [S.render_frame(rec["scene"], f) for f in idx]
    else:
        all_ = S.read_mp4(rec["video_path"])
        ims = [all_[f] for f in idx]
    out = []
    for im in ims:
        im = im.convert("RGB").resize((336, 336), Image.BICUBIC) if im.size != (336, 336) else im.convert("RGB")
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out)


class _Clips(torch.utils.data.Dataset):
    def __init__(self, records, frames, source, single):
        self.records, self.frames, self.source, self.single = records, frames, source, single

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return _clip_pixels(self.records[i], self.frames, self.source, self.single)


def clips_tensor(records: list[dict], frames: int, source: str = "auto", single: bool = False,
                 workers: int = 0) -> torch.Tensor:
    """uint8 [N, T, 3, 336, 336] for the records (T = 1 with ``single``: the middle frame)."""
    ds = _Clips(records, frames, source, single)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=torch.stack)
    return torch.cat(list(dl)) if len(ds) else torch.zeros(0, 1, 3, 336, 336, dtype=torch.uint8)


def normalize(u8: torch.Tensor, dtype) -> torch.Tensor:
    from vltok import reference as R

    mean = torch.tensor(R.IMAGENET_MEAN, device=u8.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(R.IMAGENET_STD, device=u8.device).view(1, 1, 3, 1, 1)
    return ((u8.float() / 255.0 - mean) / std).to(dtype)


@torch.inference_mode()
def predict(model, processor, records: list[dict], clips: torch.Tensor, *, batch_size: int = 16,
            max_new_tokens: int = 10, on_batch=None) -> list[str]:
    """Greedy answers; ``clips`` uint8 [N, T, 3, 336, 336] (see :func:`clips_tensor`)."""
    tok = processor.tokenizer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    preds = []
    for i in range(0, len(records), batch_size):
        batch = records[i:i + batch_size]
        px = normalize(clips[i:i + batch_size].to(device, non_blocking=True), dtype)
        seqs = [RV.encode(tok, r["question"], px.shape[1])[0] for r in batch]
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), tok.pad_token_id, dtype=torch.long)
        am = torch.zeros((len(seqs), n), dtype=torch.long)
        for j, s in enumerate(seqs):   # left padding
            ids[j, n - len(s):], am[j, n - len(s):] = torch.tensor(s), 1
        ids, am = ids.to(device), am.to(device)
        out = model.generate(input_ids=ids, attention_mask=am, pixel_values_videos=px, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        preds.extend(t.strip() for t in tok.batch_decode(out[:, n:], skip_special_tokens=True))
        if on_batch is not None:
            on_batch()
    return preds


def evaluate(model, processor, records, clips, patch: dict | None = None, *, batch_size: int = 16,
             label: str | None = None) -> dict:
    import vltok

    handle = None
    agg = {"tokens_in": 0, "tokens_out": 0, "flops": 0.0}
    if patch:
        cfg = dict(patch)
        keep = cfg.pop("keep", None)   # None: not given (0.16, or what a budget-fixing option gives)
        handle = vltok.patch(model, cfg.pop("method"), keep=None if keep is None else float(keep), **cfg)

    def on_batch():
        st = handle.stats or {}
        agg["tokens_in"] += int(st.get("tokens_in", 0))
        agg["tokens_out"] += int(st.get("tokens_out", 0))
        agg["flops"] += float(st.get("flops_keep", 1.0)) * int(st.get("tokens_in", 0))

    t0 = time.perf_counter()
    try:
        preds = predict(model, processor, records, clips, batch_size=batch_size,
                        on_batch=on_batch if handle is not None else None)
    finally:
        if handle is not None:
            vltok.unpatch(model)
    frames = clips.shape[1]
    native = frames * RV.FRAME_TOKENS
    per_video = agg["tokens_out"] / len(records) if handle is not None and records else native
    flops = agg["flops"] / agg["tokens_in"] if handle is not None and agg["tokens_in"] else per_video / native
    if patch and patch.get("keep") is None:   # not given: the keep it ran at (an option's: known after a call)
        patch = dict(patch, keep=handle.keep)   # for the label and the record
        if handle.keep_set_by is not None:
            patch["keep_set_by"] = handle.keep_set_by
    if not patch:
        lab = "full"
    elif patch.get("keep") is None:   # an option's keep that no call has measured
        lab = patch["method"]
    else:
        lab = f"{patch['method']}@{patch['keep']:g}"
    return {"label": label or lab, "patch": patch,
            "frames": frames, "tokens_per_video": per_video, "keep_achieved": per_video / native,
            "flops_keep": flops,
            "score": S.score(records, preds), "seconds": round(time.perf_counter() - t0, 2),
            "predictions": [{"id": r["id"], "type": r["type"], "answer": r["answer"], "pred": p}
                            for r, p in zip(records, preds)]}


def default_methods() -> list[str]:
    """Every registered method that runs on LLaVA-NeXT-Video (the support matrix), minus SKIP_BY_DEFAULT."""
    from vltok import support
    from vltok.adapters.llava_next_video import LlavaNextVideoAdapter

    out = []
    for name in sorted(support.registry.methods()):
        if name in SKIP_BY_DEFAULT:
            continue
        if support.incompatibility(LlavaNextVideoAdapter, support.default_method(name)) is None:
            out.append(name)
    return out


# ---------------------------------------------------------------------------------------------------------------
# tables and plot


def _row(res: dict, types) -> list[str]:
    s = res["score"]
    return [res["label"], str(res["frames"]), f"{res['tokens_per_video']:.0f}", f"{res['keep_achieved']:.3f}",
            f"{res.get('flops_keep', res['keep_achieved']):.3f}",
            f"{100 * s['overall']:.1f}", *("-" if s[k] is None else f"{100 * s[k]:.1f}"   # '-': no item of the group
                                             for k in ("temporal", "single_frame_types")),
            *[f"{100 * s['by_type'][t]['acc']:.1f}" if t in s["by_type"] else "-" for t in types]]


def markdown(doc: dict) -> str:
    types = list(S.TYPES)
    head = ["run", "frames", "tokens/video", "keep", "flops keep", "overall", "temporal", "single-frame types", *types]
    sep = "|" + "---|" * len(head)
    lines = [f"# Video quality: {doc['model']} on {doc['dataset']} (n = {doc['n']}, frames from: {doc['source']})", ""]
    if doc.get("partial"):
        lines += ["**Partial: stopped at --max-minutes.**", ""]
    lines += ["Chance per type: " + ", ".join(f"{t} {100 * S.chance(t):.0f}" for t in types) + " (%).", ""]
    lines += ["## Methods x keep (%d frames)" % doc["frames"], "", "| " + " | ".join(head) + " |", sep]
    lines += ["| " + " | ".join(_row(r, types)) + " |" for r in doc["runs"]]
    if doc.get("single_frame"):
        from vltok.train_reference_video import single_frame_verdict

        lines += ["", "## One frame (the middle one) instead of the clip", "", "| " + " | ".join(head) + " |", sep,
                  "| " + " | ".join(_row(doc["single_frame"], types)) + " |", "",
                  single_frame_verdict(doc["single_frame"]["score"])]
    if doc.get("tradeoff"):
        lines += ["", "## Frames x tokens per frame at equal visual-token budget", "",
                  "| " + " | ".join(head) + " |", sep]
        lines += ["| " + " | ".join(_row(r, types)) + " |" for r in doc["tradeoff"]]
    lines += ["", f"Command: `{doc['command']}`; {doc['device']}; {doc['seconds']:.0f} s."]
    for m in doc.get("merged", []):
        lines += ["", f"Rows added ({', '.join(m['labels']) or 'none'}) by `{m['command']}`; {m['device']}; "
                      f"{m['seconds']} s; its full-model run answered {100 * m['full_agreement']:.1f} % of the "
                      f"questions as this table's did" + (" (partial: stopped at --max-minutes)" if m["partial"]
                                                          else "") + "."]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pct(r, key):   # a group with no question (a small --limit) has no score: no point, no bar
        v = r["score"].get(key)
        return float("nan") if v is None else 100 * v

    fig, axes = plt.subplots(1, 3 if doc.get("tradeoff") else 2, figsize=(15, 4.5))
    full = next((r for r in doc["runs"] if r["patch"] is None), None)
    by: dict[str, list] = {}
    for r in doc["runs"]:
        if r["patch"]:
            by.setdefault(r["patch"]["method"], []).append(r)
    for ax, key, title in ((axes[0], "overall", "all types"), (axes[1], "temporal", "temporal types")):
        for m, rs in sorted(by.items()):
            rs = sorted(rs, key=lambda r: r.get("flops_keep", r["keep_achieved"]))
            ax.plot([r.get("flops_keep", r["keep_achieved"]) for r in rs] + ([1.0] if full else []),
                    [pct(r, key) for r in rs] + ([pct(full, key)] if full else []),
                    marker="o", label=m, lw=2.2 if m in ("evs", "tmerge") else 1.0)
        ax.set_xscale("log")
        ax.set_xlabel("FLOPs-equivalent keep (share of frames x 144 tokens)")
        ax.set_ylabel("accuracy %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if doc.get("tradeoff"):
        ax = axes[2]
        rs = doc["tradeoff"]
        ax.bar(range(len(rs)), [pct(r, "temporal") for r in rs])
        ax.set_xticks(range(len(rs)), [r["label"] for r in rs], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("temporal accuracy %")
        ax.set_title("frames x keep at equal token budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _full_run(doc: dict, which: str) -> dict:
    """The table's full-model run (what merges and joins check question ids and answers against)."""
    run = next((r for r in doc.get("runs", []) if r["patch"] is None), None)
    if run is None:
        raise ValueError(f"the {which} table has no full-model run to check the merge against; rerun it without "
                         "--max-minutes cutting the first run")
    return run


def question_ids(doc: dict, which: str = "given") -> list[str]:
    """The ids of the questions a table scores, in order (its full-model run's)."""
    return [p["id"] for p in _full_run(doc, which)["predictions"]]


def merge_docs(base: dict, new: dict, min_agreement: float = 0.99) -> dict:
    """``base``'s tables with ``new``'s method and trade-off rows added (a row with the label of one of ``base``'s is
    replaced; ``base``'s full run and single-frame run always stay). Both must be the same questions and the same
    full model: the full runs' question ids must match, and their answers must agree on at least ``min_agreement`` of
    the questions (the same model and data on another GPU may flip a near-tie).
    Otherwise ValueError, naming what differs. ``merged`` records each addition's command, device and agreement."""
    import copy

    fa, fb = _full_run(base, "base"), _full_run(new, "new")
    ids_a, ids_b = [p["id"] for p in fa["predictions"]], [p["id"] for p in fb["predictions"]]
    if ids_a != ids_b:
        raise ValueError(f"the tables score different questions ({len(ids_a)} vs {len(ids_b)}, "
                         f"{len(set(ids_a) ^ set(ids_b))} ids differ): generate DATA with the base table's --n and seed")
    agree = sum(a["pred"] == b["pred"] for a, b in zip(fa["predictions"], fb["predictions"])) / max(1, len(ids_a))
    if agree < min_agreement:
        raise ValueError(f"the full model answers only {100 * agree:.1f} % of the questions the same way in both "
                         f"tables (at least {100 * min_agreement:.0f} % needed): a different delta or frames source?")
    out = copy.deepcopy(base)
    added = []
    for key in ("runs", "tradeoff"):
        for r in new.get(key, []):
            if key == "runs" and r["patch"] is None:
                continue
            rows = out.setdefault(key, [])
            at = next((i for i, x in enumerate(rows) if x["label"] == r["label"]), None)
            if at is None:
                rows.append(r)
            else:
                rows[at] = r
            added.append(r["label"])
    out.setdefault("merged", []).append({"command": new["command"], "device": new["device"],
                                         "seconds": round(new.get("seconds", 0.0)), "full_agreement": agree,
                                         "labels": added, "partial": bool(new.get("partial"))})
    return out


def _rescored(run: dict, preds: list[dict]) -> dict:
    """``run`` over these per-question predictions (dicts with id, type, answer, pred), scored again."""
    return dict(run, predictions=preds, score=S.score(preds, [p["pred"] for p in preds]))


def restrict(doc: dict, ids) -> dict:
    """``doc`` with every run (full, methods, trade-off, single frame) scored again on the questions ``ids`` only,
    in ``ids``' order. Every id must be in every run."""
    ids = list(ids)

    def cut(run):
        by_id = {p["id"]: p for p in run["predictions"]}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"run {run['label']!r} has no prediction for {len(missing)} of the ids "
                             f"(e.g. {missing[0]})")
        return _rescored(run, [by_id[i] for i in ids])

    out = dict(doc, n=len(ids), runs=[cut(r) for r in doc.get("runs", [])],
               tradeoff=[cut(r) for r in doc.get("tradeoff", [])])
    if doc.get("single_frame"):
        out["single_frame"] = cut(doc["single_frame"])
    return out


def join(docs: list[dict]) -> dict:
    """One table from runs over disjoint question sets (the same model and frames; e.g. a long CPU run split into
    parts): each label's predictions concatenated and scored again. Every part must have the same labels; a question
    in two parts is refused."""
    if not docs:
        raise ValueError("nothing to join")
    first = docs[0]
    for d in docs[1:]:
        for key in ("model", "frames", "source"):
            if d.get(key) != first.get(key):
                raise ValueError(f"the parts differ in {key} ({first.get(key)!r} vs {d.get(key)!r})")
    seen: set = set()
    for d in docs:
        ids = set(question_ids(d, "part's"))
        if ids & seen:
            raise ValueError(f"{len(ids & seen)} questions are in more than one part (e.g. {sorted(ids & seen)[0]})")
        seen |= ids

    def joined_one(parts):
        n = [len(r["predictions"]) for r in parts]
        row = _rescored(parts[0], [p for r in parts for p in r["predictions"]])
        for k in ("tokens_per_video", "keep_achieved", "flops_keep"):   # question-weighted means
            if all(k in r for r in parts):
                row[k] = sum(r[k] * m for r, m in zip(parts, n)) / sum(n)
        row["seconds"] = sum(r.get("seconds", 0.0) for r in parts)
        return row

    def joined(key):   # rows matched by label, in the first part's order
        labels = [r["label"] for r in first.get(key, [])]
        for d in docs[1:]:
            if sorted(r["label"] for r in d.get(key, [])) != sorted(labels):
                raise ValueError(f"the parts have different {key} rows: {labels} vs "
                                 f"{[r['label'] for r in d.get(key, [])]}")
        by_label = [{r["label"]: r for r in d.get(key, [])} for d in docs]
        return [joined_one([b[lab] for b in by_label]) for lab in labels]

    out = dict(first, n=len(seen), runs=joined("runs"), tradeoff=joined("tradeoff"),
               seconds=sum(d.get("seconds", 0.0) for d in docs),
               command=" + ".join(d["command"] for d in docs), dataset=" + ".join(str(d["dataset"]) for d in docs))
    for key, value in (("merged", [m for d in docs for m in d.get("merged", [])]),
                       ("partial", any(d.get("partial") for d in docs))):
        out.pop(key, None)
        if value:
            out[key] = value
    have = [bool(d.get("single_frame")) for d in docs]
    if any(have) and not all(have):
        raise ValueError("only some parts have a single-frame run: rerun the others with it, or all with "
                         "--no-single-frame")
    if all(have):
        out["single_frame"] = joined_one([d["single_frame"] for d in docs])
    return out


def combine(docs: list[dict], min_agreement: float = 0.99) -> dict:
    """Parts over the same questions are merged (``merge_docs``: more rows), then the groups over disjoint questions
    joined (``join``: more questions). The group with the most rows comes first and gives the row order."""
    groups: dict[tuple, dict] = {}
    for d in docs:
        key = tuple(question_ids(d, "part's"))
        groups[key] = d if key not in groups else merge_docs(groups[key], d, min_agreement)
    parts = sorted(groups.values(), key=lambda d: -len(d["runs"]))
    return parts[0] if len(parts) == 1 else join(parts)


def _write_json(doc: dict, out: Path) -> None:
    """``out/quality-video.json``, replaced whole (a reader never sees half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "quality-video.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out / "quality-video.json")


def write(doc: dict, out: Path) -> None:
    _write_json(doc, out)
    (out / "quality-video.md").write_text(markdown(doc))
    plot(doc, out / "quality-video.png")


def checkpoint(doc: dict, out: Path, seconds: float) -> None:
    """The runs so far as ``quality-video.json`` (marked ``partial``); the final write replaces it."""
    _write_json(doc | {"partial": True, "seconds": seconds}, out)


def eval_folder(folder, method: str | None = None, keep: float | None = None, *, options: dict | None = None,
                device: str | None = None, dtype: str = "float32", frames: int = RV.NUM_FRAMES,
                limit: int | None = None, batch_size: int = 16, json_path=None, source: str = "auto",
                command: str | None = None) -> dict:
    """One run of ``vltok-ref-video`` (+ an optional method) on a shapes-video folder: what ``vltok eval DIR`` does
    when DIR is a video folder (``shapes_video.is_video_folder``). Prints and returns the result."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from vltok import reference as R

    records = S.load_dataset(folder, limit)
    model, processor = R.load("vltok-ref-video", device=device, dtype=getattr(torch, dtype))
    patch = {"method": method, "keep": keep, **(options or {})} if method else None   # keep None: not given
    res = evaluate(model, processor, records, clips_tensor(records, frames, source), patch, batch_size=batch_size)
    doc = {"model": "vltok-ref-video", "dataset": str(folder), "n": len(records), "source": source, "frames": frames,
           "runs": [res], "device": device, "command": command or f"vltok eval {folder}", "seconds": res["seconds"]}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=1) + "\n")
        Path(json_path).with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc), end="")
    return res


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="shapes-video folder (generated when absent)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=420, help="questions when DATA is generated (balanced over the 14 types)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N questions of DATA")
    ap.add_argument("--frames", type=int, default=RV.NUM_FRAMES)
    ap.add_argument("--methods", default=None, help="comma list (default: every method that runs on the family)")
    ap.add_argument("--keeps", default=",".join(map(str, DEFAULT_KEEPS)))
    ap.add_argument("--tradeoff", default=";".join(f"{f}:{k}" for f, k in TRADEOFF),
                    help="FRAMES:KEEP pairs, ';'-separated ('' = none)")
    ap.add_argument("--tradeoff-methods", default=",".join(TRADEOFF_METHODS))
    ap.add_argument("--no-single-frame", action="store_true")
    ap.add_argument("--source", choices=["auto", "decoded", "rendered"], default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--delta", default=None, help="video delta file (default: the committed one in assets/)")
    ap.add_argument("--untrained", action="store_true", help="the untrained video init (smoke tests)")
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--add-to", metavar="JSON", type=Path, default=None,
                    help="an earlier quality-video.json on the same DATA and delta: write it with this run's rows added")
    args = ap.parse_args(argv)
    base = None
    if args.add_to is not None:   # read it before hours of GPU work, not after
        try:
            base = json.loads(args.add_to.read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--add-to {args.add_to}: cannot read it as a quality-video.json ({e})")
    t_start = time.time()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = Path(args.data)
    if not (data / "questions.jsonl").exists():
        S.generate(data, n=args.n, write_videos=S.have_av())
    records = S.load_dataset(data, args.limit)
    source = args.source
    if source == "auto":
        source = "decoded" if S.have_av() and all(Path(r["video_path"]).exists() for r in records) else "rendered"
    from vltok import reference as R

    delta = False if args.untrained else (args.delta or True)
    model, processor = R.load("vltok-ref-video", device=args.device, dtype=getattr(torch, args.dtype), delta=delta)
    methods = args.methods.split(",") if args.methods else default_methods()
    keeps = [float(k) for k in args.keeps.split(",") if k]
    doc = {"model": "vltok-ref-video" + (" (UNTRAINED)" if args.untrained else ""), "dataset": str(data),
           "n": len(records), "source": source, "frames": args.frames, "runs": [], "tradeoff": [],
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "command": "python -m vltok.eval.quality_video " + " ".join(argv if argv is not None else sys.argv[1:])}
    cache: dict = {}

    def clips(frames, single=False):
        key = (frames, single)
        if key not in cache:
            cache[key] = clips_tensor(records, frames, source, single, args.workers)
        return cache[key]

    def out_of_time():
        return args.max_minutes is not None and time.time() - t_start > 60 * args.max_minutes

    jobs = [("runs", args.frames, None)] + [("runs", args.frames, {"method": m, "keep": k}) for m in methods
                                             for k in keeps]
    if not args.no_single_frame:
        jobs.append(("single_frame", 1, None))
    for pair in [p for p in args.tradeoff.split(";") if p]:
        f, k = pair.split(":")
        f, k = int(f), float(k)
        if k >= 1.0:
            jobs.append(("tradeoff", f, None))
        else:
            jobs += [("tradeoff", f, {"method": m, "keep": k}) for m in args.tradeoff_methods.split(",")]
    for where, frames, patch in jobs:
        if out_of_time():
            doc["partial"] = True
            break
        single = where == "single_frame"
        label = None
        if where == "tradeoff":
            label = f"{frames}f " + (f"{patch['method']}@{patch['keep']:g}" if patch else "full")
        res = evaluate(model, processor, records, clips(frames, single), patch, batch_size=args.batch_size,
                       label=label)
        print(json.dumps({k: res[k] for k in ("label", "frames", "tokens_per_video")} |
                         {"overall": round(res["score"]["overall"], 4), "temporal": res["score"]["temporal"],
                          "s": res["seconds"]}), flush=True)
        if where == "single_frame":
            doc["single_frame"] = res
        else:
            doc[where].append(res)
        # after every run: a process killed mid-way (a time limit) still leaves the runs it finished, marked partial
        checkpoint(doc, Path(args.out), time.time() - t_start)
    doc["seconds"] = time.time() - t_start
    if base is not None:
        try:
            merged = merge_docs(base, doc)
        except ValueError as e:   # keep this run's own table; say why it was not merged
            write(doc, Path(args.out))
            print(f"quality_video: --add-to {args.add_to}: not merged: {e}; this run's table is in {args.out}",
                  file=sys.stderr)
            return 1
        doc = merged
    write(doc, Path(args.out))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
