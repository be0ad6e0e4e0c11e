"""The ``shapes`` benchmark: procedural 336x336 scenes and questions whose answers depend on where things are.

* :func:`make_scene` / :func:`render`: a scene (1-10 non-overlapping objects placed uniformly, optional word) and
  its image, deterministic by ``(split, seed)``.
* :func:`make_question`: one question of a type (``TYPES``) about a scene, optionally with its target in a region.
* :func:`generate`: the balanced on-disk split (folder with ``images/`` and ``questions.jsonl``);
  :func:`load_dataset` reads any folder in that format; :func:`stream` yields training samples on the fly.
* :func:`normalize`, :func:`is_correct`, :func:`score`: the scoring rules (exact match after normalisation;
  ``grounding`` by IoU >= 0.5), reported overall, per type and per region.

Train and test never share a scene: the RNG of every scene is seeded with the string ``"shapes/<split>/<seed>"``.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SIZE = 336
TYPES = ("color", "shape", "count", "exist", "position", "relation", "located_attribute", "grounding", "text")
REGIONS = ("top", "middle", "bottom")
COLORS = {
    "red": (220, 30, 35), "orange": (245, 135, 20), "yellow": (235, 200, 0), "green": (35, 160, 55),
    "blue": (35, 75, 220), "purple": (135, 55, 185), "pink": (245, 120, 190), "brown": (125, 80, 35),
    "black": (20, 20, 20), "gray": (130, 130, 130),
}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart")
CELLS = (("top-left", "top-center", "top-right"), ("middle-left", "center", "middle-right"),
         ("bottom-left", "bottom-center", "bottom-right"))
WORDS = ("apple", "river", "house", "cloud", "piano", "lemon", "tiger", "robot", "smile", "train", "ocean", "candle",
         "garden", "pencil", "rocket", "forest", "window", "castle", "bread", "chair", "dream", "eagle", "flame",
         "grape", "honey", "island", "jelly", "kite", "light", "music", "night", "onion", "paper", "queen", "radio",
         "snake", "table", "umbrella", "violin", "water", "zebra", "bottle", "camera", "dragon", "engine", "flower",
         "guitar", "hammer", "jacket", "ladder", "mirror", "needle", "orange", "planet", "rabbit", "silver",
         "tomato", "valley", "wallet", "yogurt")
MIN_OBJ, MAX_OBJ = 1, 10
MIN_SIZE, MAX_SIZE = 20, 72
AMBIGUOUS = 8  # px: a centre this close to a third / cell boundary makes region-based questions ill-posed
COUNT_MAX = 5  # test count answers are balanced over 1..COUNT_MAX
MIN_GAP = 20  # px: relation questions need the two centres this far apart along the asked axis
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # tight pixel box x1, y1, x2, y2
    points: list | None = None  # polygon, or None for an ellipse (circle)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    split: str
    seed: int
    background: dict
    objects: list[Obj] = field(default_factory=list)
    word: str | None = None
    word_box: tuple[float, float, float, float] | None = None
    word_color: tuple[int, int, int] = (0, 0, 0)
    word_size: int = 30


# ---------------------------------------------------------------------------------------------------------------
# geometry helpers


def third(y: float) -> str:
    return REGIONS[min(2, int(y * 3 // SIZE))]


def cell(x: float, y: float) -> str:
    return CELLS[min(2, int(y * 3 // SIZE))][min(2, int(x * 3 // SIZE))]


def near_line(v: float, margin: float = AMBIGUOUS) -> bool:
    """True when coordinate v is within ``margin`` px of one of the two 1/3 lines."""
    return any(abs(v - SIZE * k / 3) < margin for k in (1, 2))


def box100(box) -> list[int]:
    """Pixel box -> [x1, y1, x2, y2] in 0-100 integers."""
    return [max(0, min(100, round(v * 100 / SIZE))) for v in box]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def _shape_points(shape: str, cx: float, cy: float, s: float):
    r = s / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k)) for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = s / 6
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        raw = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            raw.append((16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                  - math.cos(4 * t))))
        xs, ys = [p[0] for p in raw], [p[1] for p in raw]
        sc = s / max(max(xs) - min(xs), max(ys) - min(ys))
        mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
        return [(cx + (x - mx) * sc, cy + (y - my) * sc) for x, y in raw]
    raise ValueError(f"unknown shape {shape!r}")


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


# ---------------------------------------------------------------------------------------------------------------
# scenes


def make_scene(seed: int, split: str = "test", *, with_word: bool | None = None, n_objects: int | None = None,
               crowd: tuple[str, int] | None = None) -> Scene:
    """A random scene, fully determined by ``(split, seed, with_word, n_objects, crowd)``.

    Objects are placed uniformly. ``crowd=(region, k)`` (training only) first puts k objects into that third."""
    rng = random.Random(f"shapes/{split}/{seed}/{with_word}/{n_objects}" + (f"/{crowd}" if crowd else ""))
    kind = rng.choice(["plain", "gradient", "blotch"])
    base = [rng.randint(215, 250) for _ in range(3)]
    tint = rng.randint(0, 2)
    base[tint] = min(255, base[tint] + rng.randint(0, 5))
    bg = {"kind": kind, "base": base, "other": [min(255, max(200, c + rng.randint(-25, 25))) for c in base],
          "angle": rng.uniform(0, 2 * math.pi), "seed": rng.getrandbits(31)}
    sc = Scene(split=split, seed=seed, background=bg)
    taken: list[tuple[float, float, float, float]] = []
    if with_word is None:
        with_word = rng.random() < 0.35
    if with_word:
        sc.word = rng.choice(WORDS)
        sc.word_size = rng.randint(26, 40)
        sc.word_color = rng.choice([(0, 0, 0), (20, 30, 90), (60, 60, 60), (90, 20, 20)])
        x1, y1, x2, y2 = _font(sc.word_size).getbbox(sc.word)
        w, h = x2 - x1, y2 - y1
        px = rng.uniform(4, SIZE - 4 - w)
        py = rng.uniform(4, SIZE - 4 - h)
        sc.word_box = (px, py, px + w, py + h)
        taken.append(sc.word_box)
    n = n_objects if n_objects is not None else rng.randint(MIN_OBJ, MAX_OBJ)
    if crowd:
        n = max(n, crowd[1])
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        for _try in range(100):
            s = rng.uniform(MIN_SIZE, MAX_SIZE)
            lo, hi = s / 2 + 2, SIZE - s / 2 - 2
            cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if crowd and i < crowd[1]:
                row = REGIONS.index(crowd[0])
                cy = rng.uniform(max(lo, row * SIZE / 3 + AMBIGUOUS), min(hi, (row + 1) * SIZE / 3 - AMBIGUOUS))
            pts = _shape_points(shape, cx, cy, s)
            if pts is None:
                box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
            else:
                box = (min(p[0] for p in pts), min(p[1] for p in pts), max(p[0] for p in pts), max(p[1] for p in pts))
            if all(box[2] + 4 < t[0] or t[2] + 4 < box[0] or box[3] + 4 < t[1] or t[3] + 4 < box[1] for t in taken):
                sc.objects.append(Obj(shape, color, box, pts))
                taken.append(box)
                break
    return sc


def render(scene: Scene):
    """The scene as a 336x336 RGB PIL image."""
    import numpy as np
    from PIL import Image, ImageDraw

    bg = scene.background
    base = np.array(bg["base"], dtype=np.float32)
    other = np.array(bg["other"], dtype=np.float32)
    if bg["kind"] == "plain":
        arr = np.broadcast_to(base, (SIZE, SIZE, 3))
    elif bg["kind"] == "gradient":
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
        t = (np.cos(bg["angle"]) * (xx - 0.5) + np.sin(bg["angle"]) * (yy - 0.5)) / math.sqrt(0.5) + 0.5
        arr = base + (other - base) * t[..., None]
    else:  # soft blotches: 6x6 noise upsampled smoothly
        gen = np.random.default_rng(bg["seed"])
        low = Image.fromarray((gen.random((6, 6)) * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
        t = np.asarray(low, dtype=np.float32)[..., None] / 255
        arr = base + (other - base) * t
    img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = COLORS[o.color]
        if o.points is None:
            draw.ellipse(o.box, fill=fill)
        else:
            draw.polygon(o.points, fill=fill)
    if scene.word:
        font = _font(scene.word_size)
        x1, y1, _, _ = font.getbbox(scene.word)
        draw.text((scene.word_box[0] - x1, scene.word_box[1] - y1), scene.word, fill=scene.word_color, font=font)
    return img


# ---------------------------------------------------------------------------------------------------------------
# questions


def _rec(question, answer, qtype, region, box=None) -> dict:
    return {"question": question, "answer": answer, "type": qtype, "region": region,
            "bbox": box100(box) if box is not None else None}


def _unique(objs: list[Obj], key) -> list[Obj]:
    counts: dict = {}
    for o in objs:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [o for o in objs if counts[key(o)] == 1]


def _in_region(objs, region):
    return [o for o in objs if region is None or third(o.center[1]) == region]


def make_question(scene: Scene, qtype: str, rng: random.Random, region: str | None = None,
                  count_target: int | str | None = None) -> dict | None:
    """One question of type ``qtype`` whose evidence lies in ``region`` (any if None); None if the scene has none.
    ``count_target``: for ``count``, only questions with this answer, or ``"max"`` for the largest available."""
    objs = scene.objects
    if qtype == "color":
        cands = _in_region(_unique(objs, lambda o: o.shape), region)
        if not cands:
            return None
        o = rng.choice(cands)
        return _rec(f"What color is the {o.shape}?", o.color, qtype, third(o.center[1]), o.box)
    if qtype == "shape":
        cands = _in_region(_unique(objs, lambda o: o.color), region)
        if not cands:
            return None
        o = rng.choice(cands)
        return _rec(f"What shape is the {o.color} object?", o.shape, qtype, third(o.center[1]), o.box)
    if qtype == "count":
        options = []  # (region, colour or None, answer)
        for r in ([region] if region else REGIONS):
            lines = {"top": (1,), "middle": (1, 2), "bottom": (2,)}[r]
            if any(abs(o.center[1] - SIZE * k / 3) < AMBIGUOUS for o in objs for k in lines):
                continue
            inside = [o for o in objs if third(o.center[1]) == r]
            if inside:
                options.append((r, None, len(inside)))
                for color in sorted({o.color for o in inside}):
                    options.append((r, color, sum(o.color == color for o in inside)))
        if count_target == "max" and options:
            best = max(a for _, _, a in options)
            options = [opt for opt in options if opt[2] == best]
        elif count_target is not None:
            options = [opt for opt in options if opt[2] == count_target]
        if not options:
            return None
        totals = [opt for opt in options if opt[1] is None]
        r, color, k = rng.choice(totals if totals and rng.random() < 0.6 else options)
        what = f"{color} objects" if color else "objects"
        return _rec(f"How many {what} are in the {r} third of the image?", str(k), qtype, r)
    if qtype == "exist":
        if not objs:
            return None
        if rng.random() < 0.5:
            cands = _in_region(objs, region)
            if not cands:
                return None
            o = rng.choice(cands)
            return _rec(f"Is there a {o.color} {o.shape} in the image?", "yes", qtype, third(o.center[1]), o.box)
        present = {(o.color, o.shape) for o in objs}
        cands = _in_region(objs, region)
        rng.shuffle(cands)
        for d in cands:  # adversarial negative: same shape in another colour, or same colour on another shape
            if rng.random() < 0.5:
                opts = [(c, d.shape) for c in COLORS if (c, d.shape) not in present]
            else:
                opts = [(d.color, s) for s in SHAPES if (d.color, s) not in present]
            if opts:
                c, s = rng.choice(opts)
                return _rec(f"Is there a {c} {s} in the image?", "no", qtype, third(d.center[1]))
        return None
    if qtype == "position":
        cands = [o for o in _in_region(_unique(objs, lambda o: o.name), region)
                 if not near_line(o.center[0]) and not near_line(o.center[1])]
        if not cands:
            return None
        o = rng.choice(cands)
        return _rec(f"Where is the {o.name} in the image?", cell(*o.center), qtype, third(o.center[1]), o.box)
    if qtype == "relation":
        uniq = _unique(objs, lambda o: o.name)
        firsts = _in_region(uniq, region)
        rng.shuffle(firsts)
        want = rng.random() < 0.5
        for a in firsts:
            pairs = []
            for b in uniq:
                if b is a:
                    continue
                dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
                for rel, d in (("to the left of", dx), ("to the right of", -dx), ("above", dy), ("below", -dy)):
                    if abs(d) >= MIN_GAP and (d > 0) == want:
                        pairs.append((rel, b))
            if pairs:
                rel, b = rng.choice(pairs)
                return _rec(f"Is the {a.name} {rel} the {b.name}?", "yes" if want else "no", qtype,
                            third(a.center[1]), a.box)
        return None
    if qtype == "located_attribute":
        rows = [REGIONS.index(region)] if region else [0, 1, 2]
        options = []
        for row in rows:
            for col in range(3):
                name = CELLS[row][col]
                x0, y0 = col * SIZE / 3, row * SIZE / 3
                inside, ambiguous = [], False
                for o in objs:
                    cx, cy = o.center
                    ix = x0 - AMBIGUOUS <= cx < x0 + SIZE / 3 + AMBIGUOUS
                    iy = y0 - AMBIGUOUS <= cy < y0 + SIZE / 3 + AMBIGUOUS
                    if ix and iy:
                        if cell(cx, cy) != name or near_line(cx) or near_line(cy):
                            ambiguous = True
                        inside.append(o)
                if len(inside) == 1 and not ambiguous:
                    options.append((name, inside[0]))
        if not options:
            return None
        name, o = rng.choice(options)
        where = "the center" if name == "center" else f"the {name} part"
        if rng.random() < 0.5:
            return _rec(f"What color is the object in {where} of the image?", o.color, qtype, third(o.center[1]), o.box)
        return _rec(f"What shape is the object in {where} of the image?", o.shape, qtype, third(o.center[1]), o.box)
    if qtype == "grounding":
        cands = _in_region(_unique(objs, lambda o: o.name), region)
        if not cands:
            return None
        o = rng.choice(cands)
        b = box100(o.box)
        return _rec(f"What is the bounding box of the {o.name}?", f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]", qtype,
                    third(o.center[1]), o.box)
    if qtype == "text":
        if not scene.word:
            return None
        r = third((scene.word_box[1] + scene.word_box[3]) / 2)
        if region and r != region:
            return None
        return _rec("What word is written in the image?", scene.word, qtype, r, scene.word_box)
    raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(TYPES)}")


def test_item(index: int, seed: int = 0, split: str = "test") -> tuple[Scene, dict]:
    """Item ``index`` of the balanced split: type and region cycle over all (type, region) cells."""
    qtype = TYPES[index % len(TYPES)]
    region = REGIONS[(index // len(TYPES)) % len(REGIONS)]
    # count answers cycle over 1..COUNT_MAX (balanced), not the natural skew towards 1
    target = 1 + (index // (len(TYPES) * len(REGIONS))) % COUNT_MAX if qtype == "count" else None
    for attempt in range(3000):
        s = seed + index * 10000 + attempt
        n_obj = random.Random(f"n/{split}/{s}").randint(max(MIN_OBJ, 2 * target), MAX_OBJ) if target else None
        scene = make_scene(s, split, with_word=True if qtype == "text" else None, n_objects=n_obj)
        q = make_question(scene, qtype, random.Random(f"q/{split}/{s}/{qtype}/{region}"), region, target)
        if q is not None:
            q["seed"] = s
            return scene, q
    raise RuntimeError(f"no {qtype} question in region {region} after 3000 scenes")  # pragma: no cover


def generate(out_dir: str | Path, n: int = 2268, seed: int = 0, split: str = "test", progress: bool = False,
             force: bool = False) -> Path:
    """Write ``n`` balanced questions (one scene each) as ``out_dir/images/*.png`` + ``out_dir/questions.jsonl``.

    A folder that is not empty is refused (old and new files would mix) unless ``force``: then its
    ``questions.jsonl`` and ``images/*.png`` are deleted first (nothing else is touched)."""
    from .datasets import DatasetError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DatasetError(f"{out} is not empty: old and new files would mix; pick an empty folder or pass "
                               "--force (deletes its questions.jsonl and images/*.png first)")
        (out / "questions.jsonl").unlink(missing_ok=True)
        if (out / "images").is_dir():
            for f in (out / "images").glob("*.png"):
                f.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="shapes", unit="q")
    with open(out / "questions.jsonl", "w") as f:
        for i in it:
            scene, q = test_item(i, seed, split)
            qid = f"{split}-{seed}-{i:06d}"
            render(scene).save(out / "images" / f"{qid}.png", optimize=False, compress_level=6)
            f.write(json.dumps({"id": qid, "image": f"images/{qid}.png", **q}) + "\n")
    return out


def load_dataset(folder: str | Path, limit: int | None = None, media: str = "image") -> list[dict]:
    """Records of a folder in the shapes format; ``image`` becomes an absolute path (``image_path``). ``media=
    "video"`` reads the shapes-video format the same way (``video`` -> ``video_path``)."""
    folder = Path(folder)
    path = folder / "questions.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a dataset folder: {path} is missing")
    from .datasets import read_jsonl   # (datasets imports this module)

    recs = []
    for line_no, r in read_jsonl(path):
        if limit is not None and len(recs) >= limit:   # (before appending: limit=0 reads nothing)
            break
        for key in ("id", media, "question", "answer", "type"):
            if key not in r:
                raise ValueError(f"{path}:{line_no}: record lacks {key!r}")
        if media == "image":
            r.setdefault("region", None)
            r.setdefault("bbox", None)
        r[f"{media}_path"] = str(folder / r[media])
        recs.append(r)
    return recs


def stream(start: int = 0, split: str = "train", questions_per_image: tuple[int, int] = (1, 4),
           weights: dict[str, float] | None = None) -> Iterator[tuple]:
    """Endless training samples ``(image, [question records])`` from seeds start, start+1, ... of ``split``."""
    seed = start
    while True:
        yield train_sample(seed, split, questions_per_image, weights)
        seed += 1


def train_sample(seed: int, split: str = "train", questions_per_image: tuple[int, int] = (1, 4),
                 weights: dict[str, float] | None = None):
    """One training image and 1-4 distinct questions, types drawn by ``weights`` (uniform by default); half the
    ``count`` questions ask for the largest count in the scene, against the natural skew towards 1.
    Deterministic by seed; the ``test`` split is refused."""
    if split == "test":
        raise ValueError("training samples must not come from the test split")
    rng = random.Random(f"train-q/{split}/{seed}")
    # more crowded scenes than the uniform 1-10 (larger counts, more distractors), and some with one crowded third
    mode = rng.random()
    crowd = (rng.choice(REGIONS), rng.randint(3, 7)) if mode < 0.25 else None
    scene = make_scene(seed, split, with_word=rng.random() < 0.5, crowd=crowd,
                       n_objects=rng.randint(5, MAX_OBJ) if mode < 0.5 else None)
    types = list(weights) if weights else list(TYPES)
    w = [weights[t] for t in types] if weights else None
    k = rng.randint(*questions_per_image)
    qs, seen = [], set()
    if crowd:
        q = make_question(scene, "count", rng, region=crowd[0], count_target="max")
        if q is not None:
            seen.add(q["question"])
            qs.append(q)
    for _ in range(4 * k):
        if len(qs) >= k:
            break
        qtype = rng.choices(types, w)[0]
        q = make_question(scene, qtype, rng, count_target="max" if qtype == "count" and rng.random() < 0.5 else None)
        if q is not None and q["question"] not in seen:
            seen.add(q["question"])
            qs.append(q)
    if not qs:  # every scene has an object, so an "exist" question always exists
        qs.append(make_question(scene, "exist", rng))
    return render(scene), qs


# ---------------------------------------------------------------------------------------------------------------
# scoring

_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, drop articles, number words to digits, squeeze spaces."""
    t = re.sub(r"[^0-9a-z]+", " ", str(text).lower())
    words = [NUMBER_WORDS.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


def parse_box(text: str) -> list[float] | None:
    nums = re.findall(r"-?\d+(?:\.\d+)?", str(text))
    if len(nums) < 4:
        return None
    return [float(v) for v in nums[:4]]


def is_correct(pred: str, rec: dict) -> bool:
    if rec["type"] == "grounding":
        p, g = parse_box(pred), parse_box(rec["answer"])
        return p is not None and g is not None and iou(p, g) >= 0.5
    return normalize(pred) == normalize(rec["answer"])


def score(records: list[dict], preds: list[str]) -> dict:
    """{"overall", "n", "by_type": {type: {"acc", "n"}}, "by_region": {...}} (accuracies in [0, 1])."""
    if len(records) != len(preds):
        raise ValueError(f"{len(records)} records but {len(preds)} predictions")
    groups: dict[str, dict[str, list[int]]] = {"by_type": {}, "by_region": {}}
    hits = []
    for rec, pred in zip(records, preds):
        ok = int(is_correct(pred, rec))
        hits.append(ok)
        groups["by_type"].setdefault(rec["type"], []).append(ok)
        groups["by_region"].setdefault(str(rec.get("region")), []).append(ok)
    res = {"overall": sum(hits) / len(hits) if hits else 0.0, "n": len(hits)}
    order = {"by_type": list(TYPES), "by_region": list(REGIONS)}
    for g, d in groups.items():
        keys = [k for k in order[g] if k in d] + sorted(k for k in d if k not in order[g])
        res[g] = {k: {"acc": sum(d[k]) / len(d[k]), "n": len(d[k])} for k in keys}
    return res


# ---------------------------------------------------------------------------------------------------------------
# export to an official benchmark layout

VQA_SUBTYPE = "shapes"


def export_vqav2(out_dir: str | Path, records: list[dict] | None = None, *, n: int = 2268, seed: int = 0,
                 split: str = "test", force: bool = False, progress: bool = False) -> Path:
    """Write shapes questions in the VQAv2 layout: ``v2_OpenEnded_mscoco_shapes_questions.json``,
    ``v2_mscoco_shapes_annotations.json`` (ten identical human answers per question) and
    ``shapes/COCO_shapes_<image_id:012d>.jpg`` (JPEG, quality 95).

    ``records``: an existing shapes folder's records (:func:`load_dataset`); None = generate the balanced split
    (``n``, ``seed``). ``grounding`` questions are left out (a box is not a VQA answer). The answers are written
    in VQA's normalised form (the official scorer leaves unanimous answers as they are, and the real annotations
    are normalised already), e.g. ``top-left`` -> ``top left``."""
    from . import scoring
    from .datasets import DatasetError

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DatasetError(f"{out} is not empty: pick an empty folder or pass --force")
    img_dir = out / VQA_SUBTYPE
    img_dir.mkdir(parents=True, exist_ok=True)
    if records is None:
        src = ((i, *test_item(i, seed, split)) for i in range(n))
    else:
        src = ((i, None, r) for i, r in enumerate(records))
    if progress:
        from tqdm import tqdm

        src = tqdm(src, total=n if records is None else len(records), desc="export", unit="q")
    questions, annotations = [], []
    for i, scene, q in src:
        if q["type"] == "grounding":
            continue
        qid = image_id = i + 1
        if scene is not None:
            img = render(scene)
        else:
            from PIL import Image

            with Image.open(q["image_path"]) as im:
                img = im.convert("RGB")
        img.save(img_dir / f"COCO_{VQA_SUBTYPE}_{image_id:012d}.jpg", quality=95)
        ans = scoring.process_digit_article(scoring.process_punctuation(q["answer"]))
        questions.append({"image_id": image_id, "question": q["question"], "question_id": qid})
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": q["type"],
            "answer_type": "yes/no" if ans in ("yes", "no") else "number" if ans.isdigit() else "other",
            "multiple_choice_answer": ans,
            "answers": [{"answer": ans, "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]})
    info = {"description": "vltok shapes test split in the VQAv2 format", "version": "2.0"}
    common = {"info": info, "license": {"name": "Apache-2.0"}, "data_subtype": VQA_SUBTYPE}
    (out / f"v2_OpenEnded_mscoco_{VQA_SUBTYPE}_questions.json").write_text(json.dumps(
        {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    (out / f"v2_mscoco_{VQA_SUBTYPE}_annotations.json").write_text(json.dumps(
        {**common, "data_type": "mscoco", "annotations": annotations}))
    return out
