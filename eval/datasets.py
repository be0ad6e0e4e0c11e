"""Readers for the official on-disk formats of the standard benchmarks, behind one :class:`Dataset` protocol.

    from vltok.eval import datasets
    ds = datasets.load("/data/pope", fmt=None)          # format auto-detected where unambiguous
    ds.items[0]           # Item(id, prompt, image=path | video=path, target, meta)
    ds.score(preds)       # official scoring (vltok.eval.scoring); scorer="lmms" where lmms-eval differs

Formats (``FORMATS``) and what a folder must hold (the files as the benchmark distributes them; nothing is
downloaded):

* ``vqav2``: ``v2_OpenEnded_mscoco_<subtype>_questions.json`` (+ ``v2_mscoco_<subtype>_annotations.json`` to
  score; without it only the official results file is written), images ``<subtype>/COCO_<subtype>_<id:012d>.jpg``
  (or under ``images/``).
* ``gqa``: ``<split>_balanced_questions.json`` (e.g. ``testdev_balanced_questions.json``), ``images/<imageId>.jpg``.
* ``pope``: ``coco_pope_{random,popular,adversarial}.json`` (JSON lines: question_id, image, text, label), images
  in ``val2014/`` or ``images/``; every split present is read and scored separately.
* ``textvqa``: ``TextVQA_0.5.1_val.json`` (any ``TextVQA_*.json``), images ``train_images/<image_id>.jpg``.
* ``mme``: the ``MME_Benchmark_release_version`` folder: one folder per subtask holding ``*.txt`` files (two lines
  ``question<TAB>Yes|No`` per image) beside the images, or in ``questions_answers_YN/`` with ``images/``.
* ``scienceqa``: ``problems.json`` + ``pid_splits.json``, images ``<split>/<pid>/image.png`` (also under
  ``images/``); the questions with an image of the split (ScienceQA-IMG; default split ``test``).
* ``videomme``: ``videomme/test-00000-of-00001.parquet`` (or any ``*.parquet`` / ``*.json`` / ``*.jsonl`` with the
  same columns: videoID, question_id, duration, domain, sub_category, task_type, question, options, answer),
  videos ``data/<videoID>.mp4``.
* ``mvbench``: ``json/<task>.json`` (lists of video, question, candidates, answer; optional start / end seconds),
  videos or frame folders anywhere under ``video/`` (found by their relative path).
* ``shapes``: vltok's own format (``images/`` + ``questions.jsonl``, vltok.eval.shapes).
* ``shapes-video``: ``videos/`` + ``questions.jsonl`` (vltok.eval.shapes_video); detected only: such a folder is
  scored with the video reference VLM by vltok.eval.quality_video (``vltok eval DIR``), so load() refuses it.

Prompts: the LLaVA-1.5 / lmms-eval ones (``PROMPTS``); the runner wraps them in the model's chat template with one
image (or video) placeholder.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from vltok.errors import VltokError

from . import scoring

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
VIDEOMME_HEAD = ("Select the best answer to the following multiple-choice question based on the video. "
                 "Respond with only the letter (A, B, C, or D) of the correct option.")
PROMPTS = {"vqav2": SHORT, "gqa": SHORT, "pope": SHORT, "textvqa": SHORT, "mme": SHORT, "scienceqa": LETTER,
           "videomme": "\nThe best answer is:", "mvbench": LETTER}
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".webp", ".bmp")


class DatasetError(VltokError):
    """A benchmark folder or file that cannot be read; the message names the file (and line) and the fix."""


@dataclass
class Item:
    id: str
    prompt: str                     # the user text: question + the benchmark's instruction (no image placeholder)
    image: str | None = None        # image path
    video: str | None = None        # video file or frame folder
    target: Any = None              # what the scorer needs (answers, label, option index, ...)
    meta: dict = field(default_factory=dict)   # grouping keys (split, subtask, type, ...)


@runtime_checkable
class Dataset(Protocol):
    format: str
    root: Path
    items: list[Item]
    max_new_tokens: int
    scorers: tuple[str, ...]

    def score(self, preds: list[str], items: list[Item] | None = None, scorer: str = "official") -> dict:
        """{"overall": float in [0, 1] (the headline number), "n", ...format-specific breakdowns}."""
        ...


class Base:
    """Common part of the readers: ``items``, ``limit``, the scorer dispatch, the official results file."""

    format = ""
    max_new_tokens = 16
    scorers: tuple[str, ...] = ("official",)

    def __init__(self, root: Path, items: list[Item]):
        self.root = Path(root)
        self.items = items

    def __len__(self):
        return len(self.items)

    def score(self, preds, items=None, scorer="official"):
        items = self.items if items is None else items
        if len(items) != len(preds):
            raise ValueError(f"{len(items)} items but {len(preds)} predictions")
        if scorer not in self.scorers:
            raise DatasetError(f"format {self.format!r} has the scorers {', '.join(self.scorers)}; got {scorer!r}")
        return self._score(items, [p if p is not None else "" for p in preds], scorer)

    def _score(self, items, preds, scorer):  # pragma: no cover - every reader overrides it
        raise NotImplementedError

    def submission(self, preds, items=None) -> list[dict] | None:
        """The benchmark's official results file content (for an evaluation server), where it has one."""
        return None


def _grouped(items, hits, key) -> dict:
    groups: dict[str, list[float]] = {}
    for it, h in zip(items, hits):
        groups.setdefault(str(it.meta.get(key)), []).append(h)
    return {k: {"acc": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSON-lines file; blank lines skipped; a bad line names the file and line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{line_no}: not valid JSON ({e.msg}, column {e.colno}); fix or "
                                       "remove that line") from None
                if not isinstance(rec, dict):
                    raise DatasetError(f"{path}:{line_no}: expected a JSON object, got {type(rec).__name__}")
                out.append((line_no, rec))
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    return out


def _need(rec: dict, keys, where: str):
    for k in keys:
        if k not in rec:
            raise DatasetError(f"{where}: record lacks {k!r}")


def _first_dir(root: Path, names) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return root


# ---------------------------------------------------------------------------------------------------------------
# VQAv2


class VQAv2(Base):
    format = "vqav2"
    scorers = ("official", "lmms")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(root.glob("*OpenEnded*_questions.json"))

    @classmethod
    def read(cls, root: Path, **kw):
        qfiles = sorted(root.glob("*OpenEnded*_questions.json"))
        if len(qfiles) != 1:
            raise DatasetError(f"{root}: expected one v2_OpenEnded_mscoco_<subtype>_questions.json, found "
                               f"{[p.name for p in qfiles] or 'none'}")
        qdoc = _read_json(qfiles[0])
        sub = qdoc.get("data_subtype") or re.sub(r".*mscoco_(.*)_questions\.json", r"\1", qfiles[0].name)
        afiles = sorted(root.glob(f"*mscoco_{sub}_annotations.json"))
        anns = {}
        if afiles:
            for a in _read_json(afiles[0])["annotations"]:
                anns[a["question_id"]] = a
        img_dir = _first_dir(root, [sub, f"images/{sub}", "images"])
        items = []
        for i, q in enumerate(qdoc["questions"]):
            _need(q, ("question_id", "image_id", "question"), f"{qfiles[0]}: questions[{i}]")
            a = anns.get(q["question_id"])
            if afiles and a is None:
                raise DatasetError(f"{afiles[0]}: no annotation for question_id {q['question_id']}")
            items.append(Item(
                id=str(q["question_id"]), prompt=q["question"] + PROMPTS["vqav2"],
                image=str(img_dir / f"COCO_{sub}_{int(q['image_id']):012d}.jpg"),
                target=[x["answer"] for x in a["answers"]] if a else None,
                meta={"question_id": q["question_id"], "answer_type": a.get("answer_type") if a else None,
                      "question_type": a.get("question_type") if a else None}))
        ds = cls(root, items)
        ds.has_answers = bool(afiles)
        return ds

    def _score(self, items, preds, scorer):
        if not self.has_answers:
            return {"overall": None, "n": len(items), "note": "no annotations file: submit the results file"}
        fn = scoring.vqa_accuracy if scorer == "official" else scoring.vqa_accuracy_lmms
        accs = [fn(p, it.target) for it, p in zip(items, preds)]
        return {"overall": _mean(accs), "n": len(accs), "scorer": scorer,
                "by_answer_type": _grouped(items, accs, "answer_type")}

    def submission(self, preds, items=None):
        items = self.items if items is None else items
        return [{"question_id": it.meta["question_id"], "answer": p or ""} for it, p in zip(items, preds)]


# ---------------------------------------------------------------------------------------------------------------
# GQA


class GQA(Base):
    format = "gqa"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(root.glob("*_balanced_questions.json")) or any(root.glob("*_all_questions.json"))

    @classmethod
    def read(cls, root: Path, **kw):
        files = sorted(root.glob("*_balanced_questions.json")) or sorted(root.glob("*_all_questions.json"))
        if len(files) != 1:
            raise DatasetError(f"{root}: expected one <split>_balanced_questions.json, found {[p.name for p in files]}")
        doc = _read_json(files[0])
        img_dir = _first_dir(root, ["images"])
        items = []
        for qid, q in doc.items():
            _need(q, ("imageId", "question", "answer"), f"{files[0]}: question {qid}")
            types = q.get("types") or {}
            items.append(Item(id=str(qid), prompt=q["question"] + PROMPTS["gqa"],
                              image=str(img_dir / f"{q['imageId']}.jpg"), target=q["answer"],
                              meta={"structural": types.get("structural"), "semantic": types.get("semantic")}))
        return cls(root, items)

    def _score(self, items, preds, scorer):
        hits = [float(scoring.gqa_correct(p, it.target)) for it, p in zip(items, preds)]
        return {"overall": _mean(hits), "n": len(hits), "by_structural": _grouped(items, hits, "structural"),
                "by_semantic": _grouped(items, hits, "semantic")}

    def submission(self, preds, items=None):
        items = self.items if items is None else items
        return [{"questionId": it.id, "prediction": scoring.gqa_clean(p or "")} for it, p in zip(items, preds)]


# ---------------------------------------------------------------------------------------------------------------
# POPE

POPE_SPLITS = ("random", "popular", "adversarial")


class POPE(Base):
    format = "pope"
    max_new_tokens = 128
    scorers = ("official", "lmms")

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(root.glob("*pope_*.json*"))

    @classmethod
    def read(cls, root: Path, **kw):
        img_dir = _first_dir(root, ["val2014", "images"])
        items = []
        found = False
        for split in POPE_SPLITS:
            for path in sorted(root.glob(f"*pope_{split}.json")) + sorted(root.glob(f"*pope_{split}.jsonl")):
                found = True
                for line_no, r in read_jsonl(path):
                    _need(r, ("question_id", "image", "text", "label"), f"{path}:{line_no}")
                    items.append(Item(id=f"{split}-{r['question_id']}", prompt=r["text"].strip() + PROMPTS["pope"],
                                      image=str(img_dir / r["image"]), target=r["label"],
                                      meta={"split": split, "question_id": r["question_id"]}))
        if not found:
            raise DatasetError(f"{root}: no coco_pope_{{random,popular,adversarial}}.json file")
        return cls(root, items)

    def _score(self, items, preds, scorer):
        fn = scoring.pope_metrics if scorer == "official" else scoring.pope_metrics_lmms
        splits = {}
        for split in POPE_SPLITS:
            sel = [(it, p) for it, p in zip(items, preds) if it.meta["split"] == split]
            if sel:
                splits[split] = fn([it.target for it, _ in sel], [p for _, p in sel])
        overall = fn([it.target for it in items], preds)
        return {"overall": _mean(s["accuracy"] for s in splits.values()), "n": len(items), "scorer": scorer,
                "f1": _mean(s["f1"] for s in splits.values()), "splits": splits, "pooled": overall}


# ---------------------------------------------------------------------------------------------------------------
# TextVQA


class TextVQA(Base):
    format = "textvqa"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return any(root.glob("TextVQA_*.json"))

    @classmethod
    def read(cls, root: Path, **kw):
        files = sorted(p for p in root.glob("TextVQA_*.json") if "OCR" not in p.name)
        if len(files) != 1:
            raise DatasetError(f"{root}: expected one TextVQA_<version>_<split>.json, found {[p.name for p in files]}")
        doc = _read_json(files[0])
        img_dir = _first_dir(root, ["train_images", "images"])
        items = []
        for i, r in enumerate(doc["data"]):
            _need(r, ("question_id", "image_id", "question"), f"{files[0]}: data[{i}]")
            items.append(Item(id=str(r["question_id"]), prompt=r["question"].capitalize() + PROMPTS["textvqa"],
                              image=str(img_dir / f"{r['image_id']}.jpg"), target=r.get("answers"),
                              meta={"question_id": r["question_id"]}))
        return cls(root, items)

    def _score(self, items, preds, scorer):
        if any(it.target is None for it in items):
            return {"overall": None, "n": len(items), "note": "no answers in the file (test split)"}
        accs = [scoring.textvqa_accuracy(p, it.target) for it, p in zip(items, preds)]
        return {"overall": _mean(accs), "n": len(accs)}

    def submission(self, preds, items=None):
        items = self.items if items is None else items
        return [{"question_id": it.meta["question_id"], "answer": scoring.evalai_process(p or "")}
                for it, p in zip(items, preds)]


# ---------------------------------------------------------------------------------------------------------------
# MME


class MME(Base):
    format = "mme"
    MME_ASK = " Please answer yes or no."

    @classmethod
    def detect(cls, root: Path) -> bool:
        tasks = scoring.MME_PERCEPTION + scoring.MME_COGNITION
        return sum((root / t).is_dir() for t in tasks) >= 1 and not (root / "questions.jsonl").exists()

    @classmethod
    def read(cls, root: Path, **kw):
        items = []
        for task in scoring.MME_PERCEPTION + scoring.MME_COGNITION:
            tdir = root / task
            if not tdir.is_dir():
                continue
            if (tdir / "questions_answers_YN").is_dir():
                qdir, idir = tdir / "questions_answers_YN", tdir / "images"
            else:
                qdir = idir = tdir
            for txt in sorted(qdir.glob("*.txt")):
                img = next((idir / (txt.stem + e) for e in IMAGE_EXT if (idir / (txt.stem + e)).exists()), None)
                if img is None:
                    raise DatasetError(f"{txt}: no image {txt.stem}.jpg / .png beside it in {idir}")
                try:
                    lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                except OSError as e:
                    raise DatasetError(f"cannot read {txt}: {e.strerror or e}") from None
                for k, line in enumerate(lines):
                    q, sep, a = line.rpartition("\t")
                    if not sep or a.strip().lower() not in ("yes", "no"):
                        raise DatasetError(f"{txt}:{k + 1}: expected 'question<TAB>Yes|No', got {line!r}")
                    # lmms-eval: the " Please answer yes or no." suffix is replaced by the short-answer prompt
                    items.append(Item(id=f"{task}/{img.name}/{k}", prompt=q.strip().replace(cls.MME_ASK, "")
                                      + PROMPTS["mme"], image=str(img), target=a.strip(),
                                      meta={"subtask": task, "image": img.name}))
        if not items:
            raise DatasetError(f"{root}: no MME subtask folder with question files")
        return cls(root, items)

    def _score(self, items, preds, scorer):
        rows = [{"subtask": it.meta["subtask"], "image": it.meta["image"], "answer": it.target, "pred": p}
                for it, p in zip(items, preds)]
        s = scoring.mme_scores(rows)
        hits = [float(scoring.mme_label(r["pred"]) == r["answer"].lower()) for r in rows]
        return {"overall": _mean(hits), "n": len(rows), "perception": s["perception"], "cognition": s["cognition"],
                "subtasks": s["subtasks"]}


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA


class ScienceQA(Base):
    format = "scienceqa"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "problems.json").exists() and (root / "pid_splits.json").exists()

    @classmethod
    def read(cls, root: Path, split: str = "test", **kw):
        problems = _read_json(root / "problems.json")
        splits = _read_json(root / "pid_splits.json")
        if split not in splits:
            raise DatasetError(f"{root / 'pid_splits.json'}: no split {split!r} (has {', '.join(splits)})")
        items = []
        for pid in splits[split]:
            p = problems.get(str(pid))
            if p is None:
                raise DatasetError(f"{root / 'problems.json'}: no problem {pid} (listed in pid_splits.json)")
            if not p.get("image"):
                continue
            img = next((d / split / str(pid) / p["image"] for d in (root, root / "images")
                        if (d / split / str(pid) / p["image"]).exists()), root / split / str(pid) / p["image"])
            choices = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(p["choices"]))
            context = f"Context: {p['hint']}\n" if p.get("hint") else ""
            items.append(Item(id=str(pid), prompt=f"{context}{p['question']}\n{choices}" + PROMPTS["scienceqa"],
                              image=str(img), target=int(p["answer"]),
                              meta={"n_choices": len(p["choices"]), "subject": p.get("subject"),
                                    "grade": p.get("grade")}))
        return cls(root, items)

    def _score(self, items, preds, scorer):
        hits = [float(scoring.scienceqa_choice(p, it.meta["n_choices"]) == it.target) for it, p in zip(items, preds)]
        return {"overall": _mean(hits), "n": len(hits), "by_subject": _grouped(items, hits, "subject")}


# ---------------------------------------------------------------------------------------------------------------
# video: Video-MME, MVBench

VIDEO_EXT = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov", ".gif")


class VideoMC(Base):
    """Multiple-choice over videos: ``target`` is the correct letter, ``meta["letters"]`` the option letters."""

    def _score(self, items, preds, scorer):
        hits = [float(scoring.video_mc_choice(p, it.meta["letters"]) == it.target) for it, p in zip(items, preds)]
        return {"overall": _mean(hits), "n": len(hits), **{f"by_{k}": _grouped(items, hits, k) for k in self.groups}}


class VideoMME(VideoMC):
    format = "videomme"
    groups = ("duration", "task_type")

    @classmethod
    def _table(cls, root: Path) -> Path | None:
        for pat in ("videomme/*.parquet", "*.parquet", "videomme/*.json*", "videomme.json*"):
            hits = sorted(root.glob(pat))
            if hits:
                return hits[0]
        return None

    @classmethod
    def detect(cls, root: Path) -> bool:
        return cls._table(root) is not None

    @classmethod
    def read(cls, root: Path, **kw):
        table = cls._table(root)
        if table.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DatasetError(f"reading {table} needs pyarrow: pip install pyarrow") from None
            rows = pq.read_table(table).to_pylist()
        elif table.suffix == ".jsonl":
            rows = [r for _, r in read_jsonl(table)]
        else:
            rows = _read_json(table)
        vdir = _first_dir(root, ["data", "videos"])
        items = []
        for i, r in enumerate(rows):
            _need(r, ("videoID", "question_id", "question", "options", "answer"), f"{table}: row {i}")
            video = next((vdir / (r["videoID"] + e) for e in VIDEO_EXT if (vdir / (r["videoID"] + e)).exists()),
                         vdir / (r["videoID"] + ".mp4"))
            options = "\n".join(str(o) for o in r["options"])
            items.append(Item(id=str(r["question_id"]), video=str(video), target=str(r["answer"]).strip(),
                              prompt=f"{VIDEOMME_HEAD}\n{r['question']}\n{options}" + PROMPTS["videomme"],
                              meta={"letters": "ABCD", "duration": r.get("duration"), "task_type": r.get("task_type"),
                                    "domain": r.get("domain")}))
        return cls(root, items)


class MVBench(VideoMC):
    format = "mvbench"
    groups = ("task",)

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "json").is_dir() and any((root / "json").glob("*.json")) and (root / "video").is_dir()

    @classmethod
    def read(cls, root: Path, **kw):
        index: dict[str, list[Path]] = {}
        for dirpath, dirnames, filenames in os.walk(root / "video"):
            for name in filenames + dirnames:
                index.setdefault(name, []).append(Path(dirpath) / name)
        items = []
        for jf in sorted((root / "json").glob("*.json")):
            task = jf.stem
            rows = _read_json(jf)
            for i, r in enumerate(rows):
                where = f"{jf}: [{i}]"
                _need(r, ("video", "question", "candidates", "answer"), where)
                rel = str(r["video"]).strip("/")
                cands = [p for p in index.get(Path(rel).name, []) if str(p).endswith(rel)]
                if len(cands) > 1:   # several tasks share a file name: prefer the folder named like the task
                    pref = [p for p in cands if task.split("_")[0] in str(p)]
                    cands = pref or cands
                video = cands[0] if cands else root / "video" / rel
                letters = "ABCDEFGH"[:len(r["candidates"])]
                if r["answer"] not in r["candidates"]:
                    raise DatasetError(f"{where}: the answer {r['answer']!r} is not one of the candidates")
                options = "".join(f"({letters[k]}) {c}\n" for k, c in enumerate(r["candidates"]))
                meta = {"letters": letters, "task": task}
                if "start" in r and "end" in r:
                    meta["bound"] = (float(r["start"]), float(r["end"]))
                items.append(Item(id=f"{task}/{i}", video=str(video),
                                  prompt=f"Question:{r['question']}\nOption:\n{options}" + PROMPTS["mvbench"].lstrip("\n"),
                                  target=letters[r["candidates"].index(r["answer"])], meta=meta))
        return cls(root, items)


# ---------------------------------------------------------------------------------------------------------------
# shapes (vltok's own) and the shapes-video hook


class Shapes(Base):
    format = "shapes"
    max_new_tokens = 24

    @classmethod
    def detect(cls, root: Path) -> bool:
        return (root / "questions.jsonl").exists() and (root / "images").is_dir()

    @classmethod
    def read(cls, root: Path, **kw):
        from . import shapes

        recs = shapes.load_dataset(root)
        ds = cls(root, [Item(id=r["id"], prompt=r["question"], image=r["image_path"], target=r,
                             meta={"type": r["type"], "region": r.get("region")}) for r in recs])
        return ds

    def _score(self, items, preds, scorer):
        from . import shapes

        return shapes.score([it.target for it in items], preds)


class ShapesVideo:
    """vltok's shapes-video folders (``vltok shapes-video DIR``: ``videos/`` + ``questions.jsonl``). Detected here so
    ``vltok eval`` / ``--format`` know them; they are scored with the video reference VLM by
    :mod:`vltok.eval.quality_video`, not read into a :class:`Dataset` (there is no checkpoint-agnostic prompt for them)."""

    format = "shapes-video"

    @staticmethod
    def detect(root: Path) -> bool:
        return (root / "questions.jsonl").exists() and (root / "videos").is_dir()

    @staticmethod
    def read(root: Path, **kw):
        raise DatasetError(f"{root} is a shapes-video folder: it is scored with the video reference VLM, not loaded "
                           f"as a Dataset. Run `vltok eval {root}` (or vltok.eval.quality_video.evaluate in Python)")


READERS: dict[str, Any] = {
    "vqav2": VQAv2, "gqa": GQA, "pope": POPE, "textvqa": TextVQA, "mme": MME, "scienceqa": ScienceQA,
    "videomme": VideoMME, "mvbench": MVBench, "shapes": Shapes,
    "shapes-video": ShapesVideo,
}
FORMATS = tuple(READERS)


def register_format(name: str, reader) -> None:
    """Add or replace a format: ``reader`` has ``detect(root) -> bool`` and ``read(root, **kw) -> Dataset``."""
    READERS[name] = reader


def detect(root: str | Path) -> str:
    """The one format whose files ``root`` holds; a clear error when none or several match."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder: pass the benchmark's folder (and --format)")
    hits = [name for name, r in READERS.items() if r.detect(root)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise DatasetError(f"{root}: no known benchmark layout found; pass --format "
                           f"({'|'.join(READERS)}); docs/benchmarks.md lists the files each one needs")
    raise DatasetError(f"{root} matches several formats ({', '.join(hits)}): pass --format")


def load(root: str | Path, fmt: str | None = None, **kw) -> Dataset:
    """Read the benchmark folder ``root`` (format ``fmt``, auto-detected when None)."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    if fmt is None:
        fmt = detect(root)
    if fmt not in READERS:
        raise DatasetError(f"unknown format {fmt!r}; valid: {', '.join(READERS)}")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    ds = READERS[fmt].read(root, **kw)
    if not ds.items:
        raise DatasetError(f"{root}: the {fmt} files hold no questions")
    return ds
