"""lmms-eval tasks over local benchmark folders, read and scored by vltok (no hub download).

    python -m vltok.eval.lmms_tasks /data/pope tasks/ --name pope_local          # writes tasks/pope_local.yaml
    lmms-eval --model vltok --model_args pretrained=PATH --tasks pope_local --include_path tasks/

The task's documents are vltok's items (:mod:`vltok.eval.datasets`: the same prompt text, image / video and target
as ``vltok eval``), saved as JSON lines beside the YAML; its metrics are vltok's official scores (``overall``, plus
the format's extras: POPE F1, MME perception / cognition) and, for VQAv2 and POPE, lmms-eval's own scorer run on the
same answers (lmms-eval's ``vqav2_process_results`` / ``pope_process_results``, imported from lmms-eval).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import datasets

UTILS = '''"""vltok task helpers (written by vltok.eval.lmms_tasks)."""
from vltok.eval.lmms_tasks import doc_to_text, doc_to_visual, process_results  # noqa: F401
from vltok.eval.lmms_tasks import agg_overall, agg_f1, agg_perception, agg_cognition, agg_lmms  # noqa: F401
'''


def write_task(data_dir: str | Path, out_dir: str | Path, name: str, fmt: str | None = None, *,
               limit: int | None = None, max_new_tokens: int | None = None) -> Path:
    """Write ``out_dir/<name>.yaml`` (+ ``<name>.docs.jsonl`` and ``vltok_task_utils.py``); returns the YAML path."""
    ds = datasets.load(data_dir, fmt)
    items = ds.items[:limit] if limit else ds.items
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = out / f"{name}.docs.jsonl"
    with open(docs, "w") as f:
        for it in items:
            image = str(Path(it.image).resolve()) if it.image else ""
            video = str(Path(it.video).resolve()) if it.video else ""
            f.write(json.dumps({"id": it.id, "prompt": it.prompt, "image": image, "video": video,
                                "format": ds.format, "root": str(Path(ds.root).resolve())}) + "\n")
    (out / "vltok_task_utils.py").write_text(UTILS)
    metrics = ["overall"] + {"pope": ["f1"], "mme": ["perception", "cognition"]}.get(ds.format, [])
    if ds.format in ("vqav2", "pope"):
        metrics.append("lmms")
    metric_yaml = "".join(f"  - metric: vltok_{m}\n    aggregation: !function vltok_task_utils.agg_{m}\n"
                          "    higher_is_better: true\n" for m in metrics)
    yaml = (f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {docs.resolve()}\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            "doc_to_visual: !function vltok_task_utils.doc_to_visual\n"
            "doc_to_text: !function vltok_task_utils.doc_to_text\n"
            "doc_to_target: id\n"
            "process_results: !function vltok_task_utils.process_results\n"
            f"generation_kwargs:\n  max_new_tokens: {max_new_tokens or ds.max_new_tokens}\n"
            "  temperature: 0\n  do_sample: false\n  until: []\n"   # lmms-eval's default would cut at a blank line
            f"metric_list:\n{metric_yaml}"
            "metadata:\n  - version: 0.0\n")
    path = out / f"{name}.yaml"
    path.write_text(yaml)
    return path


def doc_to_visual(doc):
    from . import runner

    if doc.get("video"):
        return [doc["video"]]
    return [runner.load_image(doc["image"])] if doc.get("image") else []


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["prompt"]


def process_results(doc, results):
    row = {"id": doc["id"], "pred": results[0], "format": doc["format"], "root": doc["root"]}
    return {k: row for k in ("vltok_overall", "vltok_f1", "vltok_perception", "vltok_cognition", "vltok_lmms")}


_CACHE: dict = {}


def _score(rows, scorer="official") -> dict:
    fmt, root = rows[0]["format"], rows[0]["root"]
    key = (fmt, root)
    if key not in _CACHE:
        _CACHE[key] = datasets.load(root, fmt)
    ds = _CACHE[key]
    by_id = {it.id: it for it in ds.items}
    items = [by_id[r["id"]] for r in rows]
    return ds.score([r["pred"] for r in rows], items, scorer)


def agg_overall(rows):
    return _score(rows)["overall"]


def agg_f1(rows):
    return _score(rows)["f1"]


def agg_perception(rows):
    return _score(rows)["perception"]


def agg_cognition(rows):
    return _score(rows)["cognition"]


def agg_lmms(rows):
    """lmms-eval's own scorer on the same answers (its functions, imported from lmms-eval)."""
    fmt = rows[0]["format"]
    ds = _CACHE.get((fmt, rows[0]["root"])) or datasets.load(rows[0]["root"], fmt)
    by_id = {it.id: it for it in ds.items}
    if fmt == "vqav2":
        from lmms_eval.tasks.vqav2.utils import vqav2_process_results

        accs = []
        for r in rows:
            it = by_id[r["id"]]
            # as in the released annotations (and lmms-lab's copy): each answer dict carries its answer_id;
            # lmms-eval's leave-one-out compares whole dicts, so ten identical {"answer": a} would all be left out
            doc = {"question_id": it.meta["question_id"],
                   "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                               for k, a in enumerate(it.target)]}
            accs.append(vqav2_process_results(doc, [r["pred"]])["exact_match"])
        return sum(accs) / len(accs)
    if fmt == "pope":
        from lmms_eval.tasks.pope import utils as pu

        res = [pu.pope_process_results({"question_id": r["id"], "answer": by_id[r["id"]].target}, [r["pred"]])
               ["pope_accuracy"] for r in rows]
        return pu.pope_aggregate_accuracy(res)
    raise ValueError(f"no lmms-eval scorer wired for {fmt}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vltok.eval.lmms_tasks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="the benchmark folder")
    ap.add_argument("out", help="folder for the task YAML (pass it to lmms-eval --include_path)")
    ap.add_argument("--name", required=True, help="the task name (lmms-eval --tasks NAME)")
    ap.add_argument("--format", default=None, choices=datasets.FORMATS)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    a = ap.parse_args(argv)
    print(write_task(a.data, a.out, a.name, a.format, limit=a.limit, max_new_tokens=a.max_new_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
