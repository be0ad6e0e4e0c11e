"""Inputs: which video files, which questions, and the stable ids that make a run resumable."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import VltokError

EXTENSIONS = (".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov")
CAPTION_PROMPT = "Describe this video in detail."


class InputError(VltokError):
    """The videos or questions given cannot be read (nothing found, bad list / questions file)."""


@dataclass(frozen=True)
class Video:
    key: str        # stable name of the video inside this job (relative path for folders, else the path as given)
    path: str       # path to open


@dataclass(frozen=True)
class Question:
    qid: str
    text: str
    video: str | None = None   # only for this video key (questions file rows with a "video" field)


def discover(spec, extensions=EXTENSIONS) -> list[Video]:
    """``spec``: a folder (searched recursively for the video extensions), a glob pattern, a list file (one path a
    line, ``#`` comments; relative paths are relative to the list file), or a list of any of those."""
    if isinstance(spec, (list, tuple)):
        out, seen = [], set()
        for s in spec:
            for v in discover(s, extensions):
                if v.key not in seen:
                    seen.add(v.key)
                    out.append(v)
        return out
    spec = str(spec)
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
        if not files:
            raise InputError(f"no video files ({', '.join(extensions)}) under {spec}")
        return [Video(f.relative_to(p).as_posix(), str(f)) for f in files]
    if any(ch in spec for ch in "*?["):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise InputError(f"the pattern {spec!r} matches no file")
        return [Video(f, f) for f in files]
    if p.is_file() and p.suffix.lower() in EXTENSIONS:
        return [Video(spec, spec)]
    if p.is_file():   # a list file
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            q = Path(line)
            full = q if q.is_absolute() else p.parent / q
            out.append(Video(line, str(full)))   # listed files are kept even if missing: they get an error row
        if not out:
            raise InputError(f"the list file {spec} names no video")
        return out
    raise InputError(f"{spec} is neither a folder, a glob pattern, a video file nor a list file")


def questions(task: str | None = None, question: str | None = None, questions_file=None) -> list[Question]:
    """Exactly one of: ``task="caption"``, one ``question``, or a JSONL file of {"id"?, "question", "video"?}."""
    given = [x is not None for x in (task, question, questions_file)]
    if sum(given) != 1:
        raise InputError("give exactly one of --task caption, --question TEXT or --questions FILE.jsonl")
    if task is not None:
        if task != "caption":
            raise InputError(f"unknown task {task!r}: the only task is 'caption' (else use --question)")
        return [Question("caption", CAPTION_PROMPT)]
    if question is not None:
        if not question.strip():
            raise InputError("the question is empty")
        return [Question("q0", question)]
    out, seen = [], set()
    try:
        lines = Path(questions_file).read_text().splitlines()
    except OSError as e:
        raise InputError(f"cannot read the questions file {questions_file}: {e.strerror or e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            text = d["question"] if isinstance(d, dict) else None
        except (json.JSONDecodeError, KeyError):
            text = None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{questions_file}:{n}: each line must be a JSON object with a non-empty "
                             '"question" (optional "id", "video")')
        qid = str(d.get("id", f"q{len(out)}"))
        if (qid, d.get("video")) in seen:
            raise InputError(f"{questions_file}:{n}: duplicate question id {qid!r}")
        seen.add((qid, d.get("video")))
        out.append(Question(qid, text, d.get("video")))
    if not out:
        raise InputError(f"the questions file {questions_file} holds no question")
    return out


def row_id(video: Video, q: Question) -> str:
    return f"{video.key}::{q.qid}"


def questions_for(video: Video, qs: list[Question]) -> list[Question]:
    return [q for q in qs if q.video is None or q.video == video.key or q.video == video.path]
