"""``shapes-video``: a procedural video QA benchmark whose temporal answers need more than one frame.

* A clip is a scene description (a JSON-able dict: frame count, background, objects with a linear path, visible
  frame intervals and colour changes) rendered frame by frame (:func:`render_frame`, ``SIZE`` px square).
* :func:`make_item` builds the scene of one question of a type (``TYPES``) with a requested answer (balance), fully
  determined by ``(split, seed, type, target)``; :func:`answer` recomputes the answer from the description alone.
* :func:`generate` writes a folder in the shapes format: ``videos/<id>.mp4`` (PyAV) + ``questions.jsonl`` with
  ``id, video, question, answer, type, span`` (first and last frame of the evidence), ``n_frames``, ``seed``,
  ``split``, ``scene`` (the description, so readers without a video decoder can re-render the frames).
* :func:`train_sample` draws training items from the ``train`` split (never ``test``); :func:`load_clip` gives a
  record's frames (decoded mp4, or re-rendered from ``scene``); :func:`sample_indices` picks k frames uniformly.

Temporal types (``TEMPORAL``): ``order`` (which appeared first), ``direction`` (which way it moves),
``count_events`` (how many times it appears), ``appear`` (appears or disappears), ``state`` (its colour at the start
or at the end), ``duration`` (which stayed longer). Single-frame types (``SINGLE``), about objects present and still
the whole clip: ``color``, ``shape``, ``count``. Each scene has distinct shapes and distinct colours, so every
name is unique. Test items cycle over (type, answer) so answers are balanced; the scenes are built so that the
middle frame alone does not give the temporal answers away (e.g. both objects of ``order`` / ``duration`` are
visible in the middle; ``appear`` / ``disappear`` switch at a time drawn from the same range).
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from . import shapes

SIZE = 224
FPS = 8
MIN_FRAMES, MAX_FRAMES = 8, 64
TEMPORAL = ("order", "direction", "count_events", "appear", "state", "duration")
SINGLE = ("color", "shape", "count")
TYPES = TEMPORAL + SINGLE
COLORS = shapes.COLORS
SHAPE_NAMES = shapes.SHAPES
DIRECTIONS = ("left", "right", "up", "down")
OBJ_MIN, OBJ_MAX = 28, 44   # object size (px at SIZE)
COUNT_MAX = 5
EVENTS_MAX = 3
# the answers each type cycles over in the test split (balance); "first" / "second" = the first / second object
# named in the question
TARGETS = {
    "order": ("first", "second"), "direction": DIRECTIONS, "count_events": tuple(str(k) for k in range(1, EVENTS_MAX + 1)),
    "appear": ("appear", "disappear"), "state": tuple((c, w) for c in COLORS for w in ("start", "end")),
    "duration": ("first", "second"), "color": tuple(COLORS), "shape": SHAPE_NAMES,
    "count": tuple(str(k) for k in range(1, COUNT_MAX + 1)),
}


class SceneError(ValueError):
    """No valid scene for these draws (the caller retries with the next attempt)."""


# ---------------------------------------------------------------------------------------------------------------
# scene description -> frame state


def position(obj: dict, f: int, n: int) -> tuple[float, float]:
    (x0, y0), (x1, y1) = obj["path"]
    t = f / (n - 1) if n > 1 else 0.0
    return x0 + (x1 - x0) * t, y0 + (y1 - y0) * t


def visible(obj: dict, f: int) -> bool:
    return any(a <= f <= b for a, b in obj["visible"])


def color_at(obj: dict, f: int) -> str:
    c = obj["colors"][0][1]
    for start, col in obj["colors"]:
        if start <= f:
            c = col
    return c


def box_at(obj: dict, f: int, n: int) -> tuple[float, float, float, float]:
    cx, cy = position(obj, f, n)
    r = obj["size"] / 2
    return cx - r, cy - r, cx + r, cy + r


def name(obj: dict) -> str:
    return f"{obj['color']} {obj['shape']}"


def render_frame(scene: dict, f: int):
    """Frame ``f`` of the scene as a SIZE x SIZE RGB PIL image."""
    from PIL import Image, ImageDraw

    size = scene.get("size", SIZE)
    img = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        if not visible(o, f):
            continue
        cx, cy = position(o, f, scene["n_frames"])
        fill = COLORS[color_at(o, f)]
        pts = shapes._shape_points(o["shape"], cx, cy, o["size"])
        if pts is None:
            draw.ellipse(box_at(o, f, scene["n_frames"]), fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    return img


def render(scene: dict) -> list:
    return [render_frame(scene, f) for f in range(scene["n_frames"])]


def _overlap(a, b, gap=4.0) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _check_layout(scene: dict) -> bool:
    """No two objects overlap in any frame where both are visible; every object stays inside the canvas."""
    n, objs = scene["n_frames"], scene["objects"]
    for f in range(n):
        boxes = [box_at(o, f, n) for o in objs if visible(o, f)]
        for b in boxes:
            if b[0] < 1 or b[1] < 1 or b[2] > SIZE - 1 or b[3] > SIZE - 1:
                return False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                if _overlap(boxes[i], boxes[j]):
                    return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# answers from the description (the generator's questions are built to have these answers; tests recompute them)


def first_frame(obj: dict) -> int:
    return min(a for a, _ in obj["visible"])


def n_visible(obj: dict, n: int) -> int:
    return sum(visible(obj, f) for f in range(n))


def appearances(obj: dict, n: int) -> int:
    """Number of times the object becomes visible (frame 0 counts when visible there)."""
    return sum(visible(obj, f) and (f == 0 or not visible(obj, f - 1)) for f in range(n))


def answer(scene: dict, q: dict) -> str:
    """The answer of question ``q`` (its ``ask`` spec: type and the objects it names), from the scene description."""
    n, objs, ask = scene["n_frames"], scene["objects"], q["ask"]
    by = {i: o for i, o in enumerate(objs)}
    t = q["type"]
    if t in ("order", "duration"):
        a, b = by[ask["objects"][0]], by[ask["objects"][1]]
        if t == "order":
            fa, fb = first_frame(a), first_frame(b)
            return name(a) if fa < fb else name(b)
        return name(a) if n_visible(a, n) > n_visible(b, n) else name(b)
    o = by[ask["objects"][0]] if ask.get("objects") else None
    if t == "direction":
        (x0, y0), (x1, y1) = o["path"]
        dx, dy = x1 - x0, y1 - y0
        if abs(dx) > abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    if t == "count_events":
        return str(appearances(o, n))
    if t == "appear":
        return "appear" if not visible(o, 0) and visible(o, n - 1) else "disappear"
    if t == "state":
        return color_at(o, 0 if ask["when"] == "start" else n - 1)
    if t == "color":
        return color_at(o, 0)
    if t == "shape":
        return o["shape"]
    if t == "count":
        return str(sum(1 for x in objs if visible(x, n // 2)))
    raise ValueError(f"unknown question type {t!r}; valid: {', '.join(TYPES)}")


# ---------------------------------------------------------------------------------------------------------------
# scene construction per type


def _static(rng, shape, color, n, size=None, visible_=None):
    s = size or rng.uniform(OBJ_MIN, OBJ_MAX)
    lo, hi = s / 2 + 3, SIZE - s / 2 - 3
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    return {"shape": shape, "color": color, "size": round(s, 2), "path": [[round(x, 2), round(y, 2)]] * 2,
            "visible": visible_ or [[0, n - 1]], "colors": [[0, color]]}


def _frames_for(rng, qtype: str) -> int:
    lo = 24 if qtype in ("count_events", "duration") else 12 if qtype in ("order", "appear", "state") else MIN_FRAMES
    return rng.randint(lo, MAX_FRAMES)


def _segments(rng, n: int, k: int) -> list[list[int]]:
    """k visible intervals inside [0, n-1], invisible before the first, between them and after the last; every
    segment (on or off) at least max(2, 8 % of n) frames long."""
    m = max(2, round(0.08 * n))
    if (2 * k + 1) * m > n:
        raise SceneError("clip too short")
    w = [rng.uniform(1.0, 2.0) for _ in range(2 * k + 1)]
    spare = n - (2 * k + 1) * m
    lens = [m + int(spare * x / sum(w)) for x in w]
    lens[-1] += n - sum(lens)
    out, f = [], 0
    for i, ln in enumerate(lens):
        if i % 2 == 1:
            out.append([f, f + ln - 1])
        f += ln
    return out


def make_item(seed: int, qtype: str, target, split: str = "test") -> tuple[dict, dict]:
    """(scene, question) of type ``qtype`` whose answer is ``target`` (one of TARGETS[qtype]); raises SceneError when
    the draws give no valid layout (retry with another seed)."""
    rng = random.Random(f"shapes-video/{split}/{seed}/{qtype}/{target}")
    n = _frames_for(rng, qtype)
    bg = [rng.randint(205, 250) for _ in range(3)]
    shapes_ = rng.sample(SHAPE_NAMES, len(SHAPE_NAMES))
    colors_ = rng.sample(list(COLORS), len(COLORS))
    objs: list[dict] = []
    ask: dict = {}
    span = [0, n - 1]

    def take(color=None, shape=None):
        c = color or next(x for x in colors_ if x not in used_c)
        s = shape or next(x for x in shapes_ if x not in used_s)
        used_c.add(c)
        used_s.add(s)
        return s, c

    used_c: set[str] = set()
    used_s: set[str] = set()
    if qtype == "state":
        c_from, when = target
        c_to = next(x for x in colors_ if x != c_from)
        if when == "end":
            c_from, c_to = c_to, c_from
        s, _ = take(color=c_from)
        used_c.add(c_to)
        o = _static(rng, s, c_from, n)
        change = rng.randint(round(0.3 * n), round(0.7 * n))
        o["colors"] = [[0, c_from], [change, c_to]]
        objs.append(o)
        ask = {"objects": [0], "when": when}
        span = [0, change - 1] if when == "start" else [change, n - 1]
        question = f"What color is the {s} at the {when} of the video?"
    elif qtype == "color":
        s, c = take(color=target)
        objs.append(_static(rng, s, c, n))
        ask = {"objects": [0]}
        question = f"What color is the {s}?"
    elif qtype == "shape":
        s, c = take(shape=target)
        objs.append(_static(rng, s, c, n))
        ask = {"objects": [0]}
        question = f"What shape is the {c} object?"
    elif qtype == "count":
        for _ in range(int(target)):
            objs.append(_static(rng, *take(), n))
        ask = {}
        question = "How many objects are there?"
    elif qtype == "direction":
        s, c = take()
        size = rng.uniform(OBJ_MIN, OBJ_MAX)
        lo, hi = size / 2 + 3, SIZE - size / 2 - 3
        dist = rng.uniform(0.45, 0.75) * (hi - lo)
        start = rng.uniform(lo, hi - dist)
        other = rng.uniform(lo, hi)
        a, b = (start, start + dist) if target in ("right", "down") else (start + dist, start)
        path = [[a, other], [b, other]] if target in ("left", "right") else [[other, a], [other, b]]
        objs.append({"shape": s, "color": c, "size": round(size, 2), "path": [[round(v, 2) for v in p] for p in path],
                     "visible": [[0, n - 1]], "colors": [[0, c]]})
        ask = {"objects": [0]}
        question = f"Which way does the {c} {s} move?"
    elif qtype == "count_events":
        s, c = take()
        o = _static(rng, s, c, n)
        o["visible"] = _segments(rng, n, int(target))
        objs.append(o)
        ask = {"objects": [0]}
        span = [o["visible"][0][0], o["visible"][-1][1]]
        question = f"How many times does the {c} {s} appear?"
    elif qtype == "appear":
        s, c = take()
        o = _static(rng, s, c, n)
        f = rng.randint(round(0.25 * n), round(0.75 * n))
        o["visible"] = [[f, n - 1]] if target == "appear" else [[0, f - 1]]
        objs.append(o)
        ask = {"objects": [0]}
        span = [f - 1, f]
        question = f"Does the {c} {s} appear or disappear?"
    elif qtype in ("order", "duration"):
        mid = n // 2
        a, b = _static(rng, *take(), n), _static(rng, *take(), n)
        if qtype == "order":   # both appear before the middle (gap >= 15 % of n) and stay past it
            fa = rng.randint(0, max(0, round(0.2 * n)))
            fb = rng.randint(fa + max(2, round(0.15 * n)), mid - 1)
            a["visible"] = [[fa, rng.randint(mid + 1, n - 1)]]
            b["visible"] = [[fb, rng.randint(mid + 1, n - 1)]]
            span = [fa, fb]
        else:                   # both contain the middle; the longer one >= 1.8x the shorter
            long_ = rng.randint(round(0.6 * n), n)
            short = rng.randint(max(2, round(0.15 * n)), max(2, min(round(0.45 * n), int(long_ / 1.8))))
            for o, ln in ((a, long_), (b, short)):
                start = rng.randint(max(0, mid - ln + 1), min(mid, n - ln))
                o["visible"] = [[start, start + ln - 1]]
            span = [min(a["visible"][0][0], b["visible"][0][0]), max(a["visible"][0][1], b["visible"][0][1])]
        objs += [a, b]   # a is the answer (appeared first / stayed longer)
        first, second = (0, 1) if target == "first" else (1, 0)
        ask = {"objects": [first, second]}
        na, nb = name(objs[first]), name(objs[second])
        question = (f"Which appeared first, the {na} or the {nb}?" if qtype == "order"
                    else f"Which stayed longer, the {na} or the {nb}?")
    else:
        raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(TYPES)}")
    if qtype != "count":   # 0-2 still distractors present the whole clip
        for _ in range(rng.randint(0, 2)):
            objs.append(_static(rng, *take(), n))
    scene = {"split": split, "seed": seed, "n_frames": n, "size": SIZE, "background": bg, "objects": objs}
    for _try in range(60):
        if _check_layout(scene):
            break
        for o in objs:   # re-place everything (the question's objects keep their roles and timing)
            (x0, y0), (x1, y1) = o["path"]
            lo, hi = o["size"] / 2 + 3, SIZE - o["size"] / 2 - 3
            if x0 == x1 and y0 == y1:
                x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
                o["path"] = [[round(x, 2), round(y, 2)]] * 2
            elif x0 == x1:   # vertical motion: move the lane
                x = round(rng.uniform(lo, hi), 2)
                o["path"] = [[x, y0], [x, y1]]
            else:
                y = round(rng.uniform(lo, hi), 2)
                o["path"] = [[x0, y], [x1, y]]
    else:
        raise SceneError("no layout without overlaps")
    q = {"question": question, "type": qtype, "ask": ask, "span": span}
    q["answer"] = answer(scene, q)
    return scene, q


# ---------------------------------------------------------------------------------------------------------------
# splits


def test_item(index: int, seed: int = 0, split: str = "test") -> tuple[dict, dict]:
    """Item ``index`` of the balanced split: types cycle, and within a type the answers (TARGETS) cycle."""
    qtype = TYPES[index % len(TYPES)]
    opts = TARGETS[qtype]
    target = opts[(index // len(TYPES)) % len(opts)]
    for attempt in range(200):
        s = seed + index * 1000 + attempt
        try:
            scene, q = make_item(s, qtype, target, split)
        except SceneError:
            continue
        return scene, q
    raise RuntimeError(f"no {qtype} scene for {target!r} after 200 attempts")  # pragma: no cover


def train_sample(seed: int, split: str = "train", types: tuple[str, ...] = TYPES) -> tuple[dict, dict]:
    """One training item (scene, question): type and answer drawn from ``seed``; the test split is refused."""
    if split == "test":
        raise ValueError("training samples must not come from the test split")
    rng = random.Random(f"shapes-video-train/{split}/{seed}")
    qtype = rng.choice(list(types))
    target = rng.choice(TARGETS[qtype])
    for attempt in range(200):
        try:
            return make_item(seed * 1000 + attempt, qtype, target, split)
        except SceneError:
            continue
    raise RuntimeError("no training scene after 200 attempts")  # pragma: no cover


def write_mp4(frames, path: str | Path, fps: int = FPS) -> None:
    """Frames (PIL images) -> H.264 mp4 (yuv420p, crf 12) with PyAV (``pip install av``)."""
    try:
        import av
    except ImportError as e:
        raise ImportError("writing shapes-video clips needs PyAV: pip install av") from e
    import numpy as np

    with av.open(str(path), mode="w") as out:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}
        for im in frames:
            for pkt in stream.encode(av.VideoFrame.from_ndarray(np.asarray(im), format="rgb24")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


def read_mp4(path: str | Path) -> list:
    import av
    from PIL import Image

    with av.open(str(path)) as f:
        return [Image.fromarray(fr.to_ndarray(format="rgb24")) for fr in f.decode(video=0)]


def have_av() -> bool:
    import importlib.util

    return importlib.util.find_spec("av") is not None


def generate(out_dir: str | Path, n: int = 900, seed: int = 0, split: str = "test", progress: bool = False,
             force: bool = False, write_videos: bool = True) -> Path:
    """Write ``n`` balanced questions (one clip each) as ``videos/*.mp4`` + ``questions.jsonl``.

    An existing folder is refused unless ``force``. ``write_videos=False`` writes only questions.jsonl (the scene
    descriptions; :func:`load_clip` re-renders the frames)."""
    out = Path(out_dir)
    if (out / "questions.jsonl").exists() and not force:
        raise FileExistsError(f"{out} already holds a dataset (questions.jsonl); pass --force to overwrite it")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="shapes-video", unit="q")
    with open(out / "questions.jsonl", "w") as f:
        for i in it:
            scene, q = test_item(i, seed, split)
            qid = f"{split}-{seed}-{i:06d}"
            if write_videos:
                write_mp4(render(scene), out / "videos" / f"{qid}.mp4")
            rec = {"id": qid, "video": f"videos/{qid}.mp4", "question": q["question"], "answer": q["answer"],
                   "type": q["type"], "span": q["span"], "n_frames": scene["n_frames"], "seed": scene["seed"],
                   "split": split, "ask": q["ask"], "scene": scene, "region": None, "bbox": None}
            f.write(json.dumps(rec) + "\n")
    return out


def is_video_folder(folder: str | Path) -> bool:
    """True for a shapes-video folder (its first record has a ``video`` key)."""
    p = Path(folder) / "questions.jsonl"
    if not p.exists():
        return False
    with open(p) as f:
        for line in f:
            if line.strip():
                return "video" in json.loads(line)
    return False


def load_dataset(folder: str | Path, limit: int | None = None) -> list[dict]:
    """Records of a shapes-video folder; ``video`` becomes an absolute path (``video_path``)."""
    return shapes.load_dataset(folder, limit, media="video")


def load_clip(rec: dict, source: str = "auto") -> list:
    """A record's frames: ``decoded`` from its mp4 (PyAV), ``rendered`` from its scene description, or ``auto``
    (decoded when PyAV is installed and the file exists, else rendered)."""
    if source not in ("auto", "decoded", "rendered"):
        raise ValueError(f"source must be auto, decoded or rendered, got {source!r}")
    path = rec.get("video_path")
    if source == "decoded" or (source == "auto" and have_av() and path and Path(path).exists()):
        return read_mp4(path)
    if "scene" not in rec:
        raise ValueError(f"record {rec.get('id')} has no scene description; decode its mp4 instead (pip install av)")
    return render(rec["scene"])


def sample_indices(n: int, k: int) -> list[int]:
    """k frame indices of an n-frame clip, uniformly spread (first and last included; repeats when k > n)."""
    if k == 1:
        return [n // 2]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def chance(qtype: str) -> float:
    """Accuracy of a uniform guess over the answers the type can have (for 'order' / 'duration': the 2 names)."""
    return 1.0 / len({t if not isinstance(t, tuple) else t[0] for t in TARGETS[qtype]})


# ---------------------------------------------------------------------------------------------------------------
# scoring (the shapes rules: normalise, exact match)


def score(records: list[dict], preds: list[str]) -> dict:
    if len(records) != len(preds):
        raise ValueError(f"{len(records)} records but {len(preds)} predictions")
    by: dict[str, list[int]] = {}
    hits = []
    for rec, p in zip(records, preds):
        ok = int(shapes.normalize(p) == shapes.normalize(rec["answer"]))
        hits.append(ok)
        by.setdefault(rec["type"], []).append(ok)
    keys = [t for t in TYPES if t in by] + sorted(t for t in by if t not in TYPES)
    res = {"overall": sum(hits) / len(hits) if hits else 0.0, "n": len(hits),
           "by_type": {t: {"acc": sum(by[t]) / len(by[t]), "n": len(by[t])} for t in keys}}
    temporal = [h for r, h in zip(records, hits) if r["type"] in TEMPORAL]
    single = [h for r, h in zip(records, hits) if r["type"] in SINGLE]
    res["temporal"] = sum(temporal) / len(temporal) if temporal else None
    res["single_frame_types"] = sum(single) / len(single) if single else None
    return res


# ---------------------------------------------------------------------------------------------------------------
# CLI: vltok shapes-video DIR --n N --seed S [--force]


def register(subparsers) -> None:
    p = subparsers.add_parser("shapes-video", help="write the shapes-video benchmark (videos/ + questions.jsonl)",
                              description="Generate the balanced shapes-video test split (fixed seeds) into DIR.")
    p.add_argument("dir")
    p.add_argument("--n", type=int, default=900, help="number of questions (balanced over 9 types and answers)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the split")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--force", action="store_true", help="overwrite an existing dataset in DIR")
    p.add_argument("--no-videos", action="store_true",
                   help="write questions.jsonl only (scene descriptions; frames are re-rendered when read)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import sys

    if not args.no_videos and not have_av():
        print("shapes-video writes mp4 files with PyAV: pip install av (or pass --no-videos)", file=sys.stderr)
        return 2
    try:
        out = generate(args.dir, n=args.n, seed=args.seed, split=args.split, progress=True, force=args.force,
                       write_videos=not args.no_videos)
    except FileExistsError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(f"wrote {args.n} questions to {out / 'questions.jsonl'}")
    return 0
