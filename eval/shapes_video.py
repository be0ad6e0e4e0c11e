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

Temporal types (``TEMPORAL``), about shapes: ``order`` (which appeared first), ``direction`` (which way it
moves), ``count_events`` (how many times it appears), ``appear`` (appears or disappears), ``state`` (its colour at
the start or at the end: it changes colour twice, the middle frame shows the middle colour), ``duration`` (which
stayed longer); about text items (words of ``WORDS`` drawn with a built-in 5 x 7 block font, :data:`GLYPHS`, so no
font file and the same pixels with any Pillow): ``word_order`` (which word appeared first; both drift),
``word_state`` (the word at the start or the end of a sign that changes twice), ``word_flash`` (the word shown
only for a moment, entirely before or after the middle, next to a word shown the whole clip), ``word_count`` (how
many different words one sign shows, one after the other, the first possibly coming back). Single-frame types
(``SINGLE``), about things present and still the whole clip: ``color``, ``shape``, ``count``, ``word``. Each scene
has distinct shapes, colours and words, so every name is unique. Test items cycle over (type, answer) so answers
are balanced; the scenes are built so that the middle frame alone does not give the temporal answers away, checked
without a model by :func:`single_frame_baseline` (the best held-out guess from each cue the middle frame shows).
Records carry ``version`` (:data:`VERSION`; 2 since the text types and the two-change ``state``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from . import shapes

SIZE = 224
FPS = 8
MIN_FRAMES, MAX_FRAMES = 8, 64
VERSION = 3   # 2: text items and their types; `state` changes colour twice (the middle frame shows neither answer);
              # 3: words drawn at 6-7 px per font cell instead of 4-5 (legible at the video model's pooled grid)
SHAPE_TEMPORAL = ("order", "direction", "count_events", "appear", "state", "duration")
WORD_TEMPORAL = ("word_order", "word_state", "word_flash", "word_count")
TEMPORAL = SHAPE_TEMPORAL + WORD_TEMPORAL
SINGLE = ("color", "shape", "count", "word")
TYPES = SHAPE_TEMPORAL + ("color", "shape", "count") + WORD_TEMPORAL + ("word",)
COLORS = shapes.COLORS
SHAPE_NAMES = shapes.SHAPES
DIRECTIONS = ("left", "right", "up", "down")
OBJ_MIN, OBJ_MAX = 28, 44   # object size (px at SIZE)
COUNT_MAX = 5
EVENTS_MAX = 3
WORDS = ("cat", "dog", "sun", "box", "key", "hat", "map", "pen")   # the text items' vocabulary (distinct initials)
WORD_COUNT_MAX = 4
INK = (15, 15, 15)   # text colour (not a palette colour)
# the answers each type cycles over in the test split (balance); "first" / "second" = the first / second object
# named in the question
TARGETS = {
    "order": ("first", "second"), "direction": DIRECTIONS, "count_events": tuple(str(k) for k in range(1, EVENTS_MAX + 1)),
    "appear": ("appear", "disappear"), "state": tuple((c, w) for c in COLORS for w in ("start", "end")),
    "duration": ("first", "second"), "color": tuple(COLORS), "shape": SHAPE_NAMES,
    "count": tuple(str(k) for k in range(1, COUNT_MAX + 1)),
    "word_order": ("first", "second"), "word_state": tuple((w, t) for w in WORDS for t in ("start", "end")),
    "word_flash": WORDS, "word_count": tuple(str(k) for k in range(1, WORD_COUNT_MAX + 1)), "word": WORDS,
}

# A 5 x 7 bitmap font for the letters of WORDS (drawn as blocks of `scale` px: no font file, the same pixels with any
# Pillow). '#' = ink.
GLYPHS = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
}
GLYPH_W, GLYPH_H = 5, 7
TEXT_SCALES = (6, 7)   # px per glyph cell at SIZE: a 3-letter word is 102-119 x 42-49 px. The video reference pools
# each frame to 12 x 12 tokens of ~19 px here, so a letter spans about 2 x 2.5 tokens; at version 2's 4-5 px a letter
# fell within about one token and a probe on the projector's outputs read the word 74.8 % of the time against 84.4 %
# at 7 px (eval/results/video-ref/word-probe-cpu*.json)


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


def is_text(obj: dict) -> bool:
    return obj.get("kind") == "text"


def word_at(obj: dict, f: int) -> str:
    """The word a text item shows at frame f (its ``words``: [[first frame, word], ...])."""
    w = obj["words"][0][1]
    for start, word in obj["words"]:
        if start <= f:
            w = word
    return w


def text_extent(n_letters: int, scale: int) -> tuple[int, int]:
    """(width, height) in px of a word of n letters (one blank cell column between letters)."""
    return n_letters * GLYPH_W * scale + (n_letters - 1) * scale, GLYPH_H * scale


def half_extent(obj: dict) -> tuple[float, float]:
    if is_text(obj):
        w, h = text_extent(max(len(w) for _, w in obj["words"]), obj["scale"])
        return w / 2, h / 2
    return obj["size"] / 2, obj["size"] / 2


def box_at(obj: dict, f: int, n: int) -> tuple[float, float, float, float]:
    cx, cy = position(obj, f, n)
    rx, ry = half_extent(obj)
    return cx - rx, cy - ry, cx + rx, cy + ry


def name(obj: dict) -> str:
    if is_text(obj):
        return obj["words"][0][1]
    return f"{obj['color']} {obj['shape']}"


def text_cells(word: str, x0: int, y0: int, scale: int):
    """The ink blocks (x0, y0, x1, y1), inclusive px, of ``word`` drawn upper-case from top-left (x0, y0)."""
    for k, ch in enumerate(word.upper()):
        ox = x0 + k * (GLYPH_W + 1) * scale
        for r, row in enumerate(GLYPHS[ch]):
            for c, v in enumerate(row):
                if v == "#":
                    yield ox + c * scale, y0 + r * scale, ox + (c + 1) * scale - 1, y0 + (r + 1) * scale - 1


def text_origin(obj: dict, f: int, n: int) -> tuple[int, int]:
    """Top-left px of a text item's word at frame f (its centre minus half its extent, rounded)."""
    cx, cy = position(obj, f, n)
    w, h = text_extent(len(word_at(obj, f)), obj["scale"])
    return int(round(cx - w / 2)), int(round(cy - h / 2))


def render_frame(scene: dict, f: int):
    """Frame ``f`` of the scene as a SIZE x SIZE RGB PIL image."""
    from PIL import Image, ImageDraw

    size = scene.get("size", SIZE)
    img = Image.new("RGB", (size, size), tuple(scene["background"]))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        if not visible(o, f):
            continue
        if is_text(o):
            x0, y0 = text_origin(o, f, scene["n_frames"])
            for cell in text_cells(word_at(o, f), x0, y0, o["scale"]):
                draw.rectangle(cell, fill=INK)
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
    texts = [x for x in objs if is_text(x)]
    if t == "word_order":
        a, b = by[ask["objects"][0]], by[ask["objects"][1]]
        return name(a) if first_frame(a) < first_frame(b) else name(b)
    if t == "word_state":
        return word_at(o, 0 if ask["when"] == "start" else n - 1)
    if t == "word_flash":   # the one text item not on screen the whole clip
        brief = [x for x in texts if n_visible(x, n) < n]
        if len(brief) != 1:
            raise ValueError(f"word_flash scene needs exactly one brief text item, has {len(brief)}")
        return name(brief[0])
    if t == "word_count":
        return str(len({word_at(x, f) for x in texts for f in range(n) if visible(x, f)}))
    if t == "word":
        return word_at(texts[0], n // 2)
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
    lo = (24 if qtype in ("count_events", "duration", "word_count") else
          12 if qtype in ("order", "appear", "state", "word_order", "word_state", "word_flash") else MIN_FRAMES)
    return rng.randint(lo, MAX_FRAMES)


def _segments(rng, n: int, k: int) -> list[list[int]]:
    """k visible intervals inside [0, n-1], invisible before the first, between them and after the last; every
    segment (on or off) at least max(2, 8 % of n) frames long."""
    m = max(2, round(0.08 * n))
    if (2 * k + 1) * m > n:
        raise SceneError("clip too short")
    w = [rng.uniform(0.4, 2.5) for _ in range(2 * k + 1)]
    spare = n - (2 * k + 1) * m
    lens = [m + int(spare * x / sum(w)) for x in w]
    lens[-1] += n - sum(lens)
    out, f = [], 0
    for i, ln in enumerate(lens):
        if i % 2 == 1:
            out.append([f, f + ln - 1])
        f += ln
    return out


def _travel(rng, lo: float, hi: float) -> tuple[float, float]:
    """(start, distance) of a motion inside [lo, hi]: 45-75 % of the range."""
    dist = rng.uniform(0.45, 0.75) * (hi - lo)
    return rng.uniform(lo, hi - dist), dist


def _lane(rng, lo: float, hi: float) -> float:
    """The still coordinate of a moving object: drawn like the moving coordinate's midpoint, so that where the
    object is in one frame does not tell whether it moves horizontally or vertically."""
    start, dist = _travel(rng, lo, hi)
    return start + dist / 2


def _split(rng, n: int, k: int, m: int) -> list[int]:
    """Start frames of k consecutive segments covering [0, n-1], each at least m frames long."""
    if k * m > n:
        raise SceneError("clip too short")
    w = [rng.uniform(1.0, 2.0) for _ in range(k)]
    spare = n - k * m
    lens = [m + int(spare * x / sum(w)) for x in w]
    lens[-1] += n - sum(lens)
    return [sum(lens[:i]) for i in range(k)]


def _two_changes(rng, n: int) -> tuple[int, int]:
    """Frames of two changes: the first in [15 %, 40 %] of the clip, the second in [60 %, 85 %]; the middle frame
    (n // 2) always lies between them."""
    c1 = rng.randint(max(1, round(0.15 * n)), round(0.4 * n))
    c2 = rng.randint(round(0.6 * n), min(n - 1, round(0.85 * n)))
    if not c1 <= n // 2 < c2:   # pragma: no cover - holds for every n >= 12
        raise SceneError("changes do not bracket the middle frame")
    return c1, c2


def _text(rng, words: list, n: int, visible_=None, drift: bool = False) -> dict:
    """A text item showing ``words`` ([[first frame, word], ...]), still, or drifting 10-40 px along one axis."""
    scale = rng.choice(TEXT_SCALES)
    w, h = text_extent(max(len(x) for _, x in words), scale)
    d = rng.choice((-1, 1)) * rng.uniform(10, 40) if drift else 0.0
    ax = rng.randint(0, 1) if drift else 0
    r = [w / 2 + 3, h / 2 + 3]
    r[ax] += abs(d) / 2
    c = [rng.uniform(r[0], SIZE - r[0]), rng.uniform(r[1], SIZE - r[1])]
    path = [list(c), list(c)]
    path[0][ax] -= d / 2
    path[1][ax] += d / 2
    return {"kind": "text", "words": [list(x) for x in words], "scale": scale,
            "path": [[round(v, 2) for v in p] for p in path], "visible": visible_ or [[0, n - 1]]}


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
    if qtype == "state":   # start colour -> middle colour -> end colour, all three different; the middle frame
        c_ans, when = target   # (between the two changes) shows neither the start nor the end colour
        c_mid, c_other = [x for x in colors_ if x != c_ans][:2]
        c_start, c_end = (c_ans, c_other) if when == "start" else (c_other, c_ans)
        s, _ = take(color=c_start)
        used_c.update((c_mid, c_end))
        o = _static(rng, s, c_start, n)
        c1, c2 = _two_changes(rng, n)
        o["colors"] = [[0, c_start], [c1, c_mid], [c2, c_end]]
        objs.append(o)
        ask = {"objects": [0], "when": when}
        span = [0, c1 - 1] if when == "start" else [c2, n - 1]
        question = f"What color is the {s} at the {when} of the video?"
    elif qtype == "word_state":   # a sign shows three different words; the middle frame shows the middle one
        w_ans, when = target
        w_mid, w_other = [x for x in rng.sample(WORDS, len(WORDS)) if x != w_ans][:2]
        w_start, w_end = (w_ans, w_other) if when == "start" else (w_other, w_ans)
        c1, c2 = _two_changes(rng, n)
        objs.append(_text(rng, [[0, w_start], [c1, w_mid], [c2, w_end]], n))
        ask = {"objects": [0], "when": when}
        span = [0, c1 - 1] if when == "start" else [c2, n - 1]
        question = f"What word is written at the {when} of the video?"
    elif qtype == "word_order":   # as `order`: both words on screen in the middle frame; they drift
        mid = n // 2
        wa, wb = [x for x in rng.sample(WORDS, len(WORDS))][:2]
        fa = rng.randint(0, max(0, round(0.2 * n)))
        fb = rng.randint(fa + max(2, round(0.15 * n)), mid - 1)
        objs.append(_text(rng, [[0, wa]], n, [[fa, rng.randint(mid + 1, n - 1)]], drift=True))
        objs.append(_text(rng, [[0, wb]], n, [[fb, rng.randint(mid + 1, n - 1)]], drift=True))
        span = [fa, fb]
        first, second = (0, 1) if target == "first" else (1, 0)
        ask = {"objects": [first, second]}
        question = (f"Which word appeared first, {name(objs[first]).upper()} or "
                    f"{name(objs[second]).upper()}?")
    elif qtype == "word_flash":   # one word the whole clip; the answer shows up once, entirely before or after the
        mid = n // 2              # middle frame, for 15-30 % of the clip
        other = next(x for x in rng.sample(WORDS, len(WORDS)) if x != target)
        ln = rng.randint(max(2, round(0.15 * n)), max(2, round(0.3 * n)))
        start = rng.randint(0, mid - ln) if rng.random() < 0.5 else rng.randint(mid + 1, n - ln)
        objs.append(_text(rng, [[0, target]], n, [[start, start + ln - 1]]))
        objs.append(_text(rng, [[0, other]], n))
        ask = {"objects": [0]}
        span = [start, start + ln - 1]
        question = "Which word is shown only for a moment?"
    elif qtype == "word_count":   # one sign, k different words one after the other (the first may come back)
        k = int(target)
        seq = rng.sample(WORDS, k)
        if k >= 2 and rng.random() < 0.5:
            seq.append(seq[0])
        starts = _split(rng, n, len(seq), max(2, round(0.1 * n)))
        objs.append(_text(rng, [[f, w] for f, w in zip(starts, seq)], n))
        ask = {"objects": [0]}
        question = "How many different words are shown?"
    elif qtype == "word":
        objs.append(_text(rng, [[0, target]], n))
        ask = {"objects": [0]}
        question = "What word is written?"
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
        start, dist = _travel(rng, lo, hi)
        other = _lane(rng, lo, hi)
        a, b = (start, start + dist) if target in ("right", "down") else (start + dist, start)
        path = [[a, other], [b, other]] if target in ("left", "right") else [[other, a], [other, b]]
        objs.append({"shape": s, "color": c, "size": round(size, 2), "path": [[round(v, 2) for v in p] for p in path],
                     "visible": [[0, n - 1]], "colors": [[0, c]]})
        ask = {"objects": [0]}
        question = f"Which way does the {c} {s} move?"
    elif qtype == "count_events":
        s, c = take()
        o = _static(rng, s, c, n)
        mid_on = rng.random() < 0.5   # on screen in the middle frame or not, whatever the count
        for _ in range(200):
            o["visible"] = _segments(rng, n, int(target))
            if visible(o, n // 2) == mid_on:
                break
        else:
            raise SceneError("no segments with the drawn middle-frame state")
        objs.append(o)
        ask = {"objects": [0]}
        span = [o["visible"][0][0], o["visible"][-1][1]]
        question = f"How many times does the {c} {s} appear?"
    elif qtype == "appear":
        s, c = take()
        o = _static(rng, s, c, n)
        mid = n // 2   # on screen in the middle frame half the time, for both answers
        early = rng.random() < 0.5
        f = rng.randint(round(0.25 * n), mid) if early else rng.randint(mid + 1, round(0.75 * n))
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
            rx, ry = half_extent(o)
            lox, hix, loy, hiy = rx + 3, SIZE - rx - 3, ry + 3, SIZE - ry - 3
            moving = not is_text(o)   # a shape's lane is drawn as its motion's midpoint (see _lane)
            if x0 == x1 and y0 == y1:
                x, y = rng.uniform(lox, hix), rng.uniform(loy, hiy)
                o["path"] = [[round(x, 2), round(y, 2)]] * 2
            elif x0 == x1:   # vertical motion: move the lane
                x = round(_lane(rng, lox, hix) if moving else rng.uniform(lox, hix), 2)
                o["path"] = [[x, y0], [x, y1]]
            else:
                y = round(_lane(rng, loy, hiy) if moving else rng.uniform(loy, hiy), 2)
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


def generate(out_dir: str | Path, n: int = 840, seed: int = 0, split: str = "test", progress: bool = False,
             force: bool = False, write_videos: bool = True) -> Path:
    """Write ``n`` balanced questions (one clip each) as ``videos/*.mp4`` + ``questions.jsonl``.

    An existing folder is refused unless ``force``. ``write_videos=False`` writes only questions.jsonl (the scene
    descriptions; :func:`load_clip` re-renders the frames)."""
    out = Path(out_dir)
    if (out / "questions.jsonl").exists() and not force:
        raise FileExistsError(f"{out} already holds a dataset (questions.jsonl); pass --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    if force and (out / "videos").is_dir():   # the old dataset's clips: never read back as the new one's
        for old in (out / "videos").glob("*.mp4"):
            old.unlink()
    if write_videos:
        (out / "videos").mkdir(exist_ok=True)
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
                   "split": split, "ask": q["ask"], "scene": scene, "region": None, "bbox": None,
                   "version": VERSION}
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
# the single-frame check without a model: what one frame shows, as cues, and the best held-out guess from each


def frame_cues(scene: dict, q: dict, f: int) -> dict[str, tuple]:
    """What frame ``f`` shows that could bear on question ``q``, as hashable cues (each with the question's
    start / end word, which a reader of the question also has): the named objects' visibility, colour, shape, word
    and 3 x 3 cell, the sorted colours / words on screen, and the number of things on screen."""
    objs = scene["objects"]
    named = [objs[i] for i in q["ask"].get("objects", [])]
    when = q["ask"].get("when")
    on = [o for o in objs if visible(o, f)]

    def cell(o):
        x, y = position(o, f, scene["n_frames"])
        return min(2, int(3 * x / SIZE)), min(2, int(3 * y / SIZE))

    def named_cue(get):
        return (when,) + tuple(get(o) if visible(o, f) else None for o in named)

    return {
        "named_visible": (when,) + tuple(visible(o, f) for o in named),
        "named_color": named_cue(lambda o: None if is_text(o) else color_at(o, f)),
        "named_shape": named_cue(lambda o: o.get("shape")),
        "named_word": named_cue(lambda o: word_at(o, f) if is_text(o) else None),
        "named_cell": named_cue(cell),
        "colors_on_screen": (when,) + tuple(sorted(color_at(o, f) for o in on if not is_text(o))),
        "words_on_screen": (when,) + tuple(sorted(word_at(o, f) for o in on if is_text(o))),
        "n_on_screen": (when, len(on)),
    }


def _label(scene: dict, q: dict) -> str:
    """The answer, with a named object's name replaced by its place in the question ('#0' / '#1'), so that a guess
    can be learned across scenes for the 'which of the two' types."""
    if q["type"] in ("order", "duration", "word_order"):
        names = [name(scene["objects"][i]) for i in q["ask"]["objects"]]
        return f"#{names.index(q['answer'])}"
    return q["answer"]


def single_frame_baseline(types: tuple[str, ...] = TYPES, n_train: int = 300, n_test: int = 40, seed: int = 0,
                          frame: str = "middle") -> dict:
    """The best a one-frame reader can do from each cue of :func:`frame_cues`, held out: per type and cue, a table
    cue value -> most frequent answer is fitted on ``n_train`` train-split items and scored on the first ``n_test``
    test-split items of the type (unseen values: the most frequent answer overall). Returns per type the best cue,
    its accuracy, chance and every cue's accuracy. ``frame``: 'middle' (n // 2, the model check's frame), 'first'
    or 'last'. The single-frame types score high (the check can see an answer that one frame shows); the temporal
    types should stay near chance."""
    from collections import Counter

    pick = {"middle": lambda n: n // 2, "first": lambda n: 0, "last": lambda n: n - 1}[frame]
    out = {}
    for t in types:
        train = [train_sample(seed * 100_000 + i, types=(t,)) for i in range(n_train)]
        test = [test_item(TYPES.index(t) + len(TYPES) * i, seed) for i in range(n_test)]
        feats_tr = [(frame_cues(sc, q, pick(sc["n_frames"])), _label(sc, q)) for sc, q in train]
        feats_te = [(frame_cues(sc, q, pick(sc["n_frames"])), _label(sc, q)) for sc, q in test]
        overall = sorted(Counter(y for _, y in feats_tr).items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        by_cue = {}
        for cue in feats_tr[0][0]:
            table: dict = {}
            for c, y in feats_tr:
                table.setdefault(c[cue], Counter())[y] += 1
            guess = {v: sorted(cnt.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for v, cnt in table.items()}
            by_cue[cue] = sum(guess.get(c[cue], overall) == y for c, y in feats_te) / len(feats_te)
        best = max(by_cue, key=lambda k: by_cue[k])
        out[t] = {"acc": by_cue[best], "cue": best, "chance": chance(t), "by_cue": by_cue, "n": len(feats_te)}
    return out


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
    p.add_argument("--n", type=int, default=840, help="number of questions (balanced over the 14 types and answers)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the split")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing dataset in DIR (its videos/*.mp4 are deleted first)")
    p.add_argument("--no-videos", action="store_true",
                   help="write questions.jsonl only (scene descriptions; frames are re-rendered when read)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    import sys

    if not args.no_videos and not have_av():
        print("vltok: error: shapes-video writes mp4 files with PyAV: pip install av (or pass --no-videos)",
              file=sys.stderr)
        return 2
    if args.n < 1:
        print(f"vltok: error: --n must be at least 1 (got {args.n})", file=sys.stderr)
        return 2
    try:
        out = generate(args.dir, n=args.n, seed=args.seed, split=args.split, progress=True, force=args.force,
                       write_videos=not args.no_videos)
    except FileExistsError as e:
        print(f"vltok: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} questions to {out / 'questions.jsonl'}")
    return 0
