"""The shapes benchmark: determinism, scene/answer consistency, the on-disk format, scoring."""
import hashlib
import json
import random
import re

import numpy as np
import pytest

from vltok.eval import shapes as S


def _digest(img) -> str:
    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()


def test_scene_is_deterministic_by_split_and_seed():
    a, b = S.make_scene(7, "test"), S.make_scene(7, "test")
    assert [(o.shape, o.color, o.box) for o in a.objects] == [(o.shape, o.color, o.box) for o in b.objects]
    assert _digest(S.render(a)) == _digest(S.render(b))
    other = S.make_scene(7, "train")
    assert _digest(S.render(other)) != _digest(S.render(a))
    assert _digest(S.render(S.make_scene(8, "test"))) != _digest(S.render(a))


def test_scenes_fit_the_spec():
    counts = set()
    for seed in range(60):
        sc = S.make_scene(seed, "test", with_word=seed % 2 == 0)
        counts.add(len(sc.objects))
        assert S.MIN_OBJ <= len(sc.objects) <= S.MAX_OBJ
        boxes = [o.box for o in sc.objects] + ([sc.word_box] if sc.word else [])
        for i, p in enumerate(boxes):
            assert 0 <= p[0] < p[2] <= S.SIZE and 0 <= p[1] < p[3] <= S.SIZE
            for q in boxes[i + 1:]:
                assert S.iou(p, q) == 0.0, "objects must not overlap"
        img = np.asarray(S.render(sc))
        assert img.shape == (S.SIZE, S.SIZE, 3)
        for o in sc.objects:  # every shape covers its box centre, in its own colour
            cx, cy = (int(v) for v in o.center)
            assert tuple(img[cy, cx]) == S.COLORS[o.color], (o.shape, o.color)
        if sc.word:  # some dark text pixels inside the word box
            x1, y1, x2, y2 = (int(v) for v in sc.word_box)
            assert (img[y1:y2 + 1, x1:x2 + 1].sum(-1) < 300).sum() > 20
    assert len(counts) >= 7  # 1-10 objects, not a constant


def _obj_for(scene, bbox):
    hits = [o for o in scene.objects if S.box100(o.box) == bbox]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("qtype", S.TYPES)
def test_answers_agree_with_the_scene(qtype):
    made = 0
    for seed in range(80):
        sc = S.make_scene(seed, "test", with_word=True)
        rng = random.Random(seed)
        q = S.make_question(sc, qtype, rng)
        if q is None:
            continue
        made += 1
        assert q["type"] == qtype and q["region"] in S.REGIONS
        if qtype == "text":
            assert q["answer"] == sc.word and q["answer"] in S.WORDS
            continue
        if qtype == "count":
            assert q["bbox"] is None
            inside = [o for o in sc.objects if S.third(o.center[1]) == q["region"]]
            word = q["question"].split()[2]  # "How many objects ..." or "How many <color> objects ..."
            if word == "objects":
                assert int(q["answer"]) == len(inside)
            else:
                assert int(q["answer"]) == sum(o.color == word for o in inside)
            continue
        if qtype == "exist" and q["answer"] == "no":
            color, shape = q["question"][len("Is there a "):-len(" in the image?")].split()
            assert all((o.color, o.shape) != (color, shape) for o in sc.objects)
            continue
        o = _obj_for(sc, q["bbox"])
        assert q["region"] == S.third(o.center[1])
        if qtype == "color":
            assert q["answer"] == o.color and sum(p.shape == o.shape for p in sc.objects) == 1
        elif qtype == "shape":
            assert q["answer"] == o.shape and sum(p.color == o.color for p in sc.objects) == 1
        elif qtype == "exist":
            assert q["answer"] == "yes" and o.name in q["question"]
        elif qtype == "position":
            assert q["answer"] == S.cell(*o.center)
            assert not S.near_line(o.center[0]) and not S.near_line(o.center[1])
        elif qtype == "located_attribute":
            name = re.search(r"in the (\S+?)(?: part)? of the image", q["question"]).group(1)
            in_cell = [p for p in sc.objects if S.cell(*p.center) == name]
            assert in_cell == [o]
            assert q["answer"] in (o.color, o.shape)
        elif qtype == "grounding":
            assert S.parse_box(q["answer"]) == [float(v) for v in S.box100(o.box)]
        elif qtype == "relation":
            other = [p for p in sc.objects if p is not o and f"the {p.name}?" in q["question"]]
            assert len(other) == 1
            b = other[0]
            rel = q["question"].split(o.name + " ")[1].rsplit(" the ", 1)[0]
            truth = {"to the left of": b.center[0] - o.center[0], "to the right of": o.center[0] - b.center[0],
                     "above": b.center[1] - o.center[1], "below": o.center[1] - b.center[1]}[rel]
            assert abs(truth) >= S.MIN_GAP
            assert q["answer"] == ("yes" if truth > 0 else "no")
    assert made >= 10


def test_yes_no_types_are_balanced():
    for qtype in ("exist", "relation"):
        answers = [S.test_item(i * len(S.TYPES) + S.TYPES.index(qtype))[1]["answer"] for i in range(60)]
        assert 18 <= answers.count("yes") <= 42, (qtype, answers.count("yes"))


def test_generate_round_trip_and_balance(tmp_path):
    n = 2 * len(S.TYPES) * len(S.REGIONS)
    out = S.generate(tmp_path / "a", n=n, seed=0)
    recs = S.load_dataset(out)
    assert len(recs) == n
    cells = {}
    for r in recs:
        cells[(r["type"], r["region"])] = cells.get((r["type"], r["region"]), 0) + 1
        assert set(r) >= {"id", "image", "question", "answer", "type", "region", "bbox", "image_path"}
        assert not r["image"].startswith("/")
        from PIL import Image

        with Image.open(r["image_path"]) as im:
            assert im.size == (S.SIZE, S.SIZE) and im.mode == "RGB"
        if r["bbox"] is not None:
            assert len(r["bbox"]) == 4 and all(isinstance(v, int) and 0 <= v <= 100 for v in r["bbox"])
    assert len(cells) == 27 and set(cells.values()) == {2}
    # same seed -> byte-identical files; limit reads a prefix
    out2 = S.generate(tmp_path / "b", n=n, seed=0)
    assert (out / "questions.jsonl").read_text().replace("/a/", "/b/") == (out2 / "questions.jsonl").read_text()
    first = recs[0]["image"]
    assert (out / first).read_bytes() == (out2 / first).read_bytes()
    assert [r["id"] for r in S.load_dataset(out, limit=5)] == [r["id"] for r in recs[:5]]
    assert S.load_dataset(S.generate(tmp_path / "c", n=3, seed=1))[0]["question"] != recs[0]["question"] or \
        S.load_dataset(tmp_path / "c")[0]["image"] != first


def test_loader_reads_foreign_folders(tmp_path):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (50, 40), (255, 0, 0)).save(tmp_path / "imgs" / "x.jpg")
    rows = [{"id": "q1", "image": "imgs/x.jpg", "question": "What colour?", "answer": "red", "type": "color"}]
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = S.load_dataset(tmp_path)
    assert recs[0]["region"] is None and recs[0]["bbox"] is None
    assert recs[0]["image_path"] == str(tmp_path / "imgs" / "x.jpg")
    (tmp_path / "questions.jsonl").write_text(json.dumps({"id": "q", "image": "a.png", "question": "?"}) + "\n")
    with pytest.raises(ValueError, match="answer"):
        S.load_dataset(tmp_path)
    with pytest.raises(FileNotFoundError):
        S.load_dataset(tmp_path / "nope")


def test_training_stream_never_uses_test_seeds():
    with pytest.raises(ValueError):
        S.train_sample(0, "test")
    it = S.stream(start=3)
    img, qs = next(it)
    img2, qs2 = S.train_sample(3)
    assert _digest(img) == _digest(img2) and qs == qs2
    assert 1 <= len(qs) <= 4 and all(q["type"] in S.TYPES for q in qs)
    test_digests = {_digest(S.render(S.make_scene(s, "test"))) for s in range(5)}
    assert _digest(img) not in test_digests


def test_normalize():
    assert S.normalize("The Three.") == "3"
    assert S.normalize("  Top-Left ") == "top left"
    assert S.normalize("An apple!") == "apple"
    assert S.normalize("ten") == S.normalize("10") == "10"
    assert S.normalize("Yes.") == "yes"
    assert S.normalize("twenty one") == "20 1"


def test_is_correct_and_iou():
    rec = {"type": "count", "answer": "4"}
    assert S.is_correct("four", rec) and S.is_correct("4.", rec) and not S.is_correct("14", rec)
    assert S.is_correct("Top-left", {"type": "position", "answer": "top-left"})
    assert not S.is_correct("top", {"type": "position", "answer": "top-left"})
    g = {"type": "grounding", "answer": "[10, 10, 30, 30]"}
    assert S.is_correct("[10, 10, 30, 30]", g)
    assert S.is_correct("The box is 12,11,31,29", g)
    assert not S.is_correct("[20, 20, 40, 40]", g)  # IoU 100/700
    assert not S.is_correct("[10, 10, 30]", g) and not S.is_correct("no idea", g)
    assert S.iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert S.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert S.iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    # IoU of exactly 0.5 counts as correct
    assert S.is_correct("[0, 0, 10, 10]", {"type": "grounding", "answer": "[0, 0, 10, 20]"})


def test_score_groups():
    recs = [{"type": "color", "region": "top", "answer": "red"},
            {"type": "color", "region": "bottom", "answer": "blue"},
            {"type": "count", "region": "top", "answer": "2"},
            {"type": "text", "region": None, "answer": "apple"}]
    res = S.score(recs, ["Red.", "green", "two", "apple"])
    assert res["overall"] == 0.75 and res["n"] == 4
    assert res["by_type"]["color"] == {"acc": 0.5, "n": 2}
    assert res["by_type"]["count"]["acc"] == 1.0
    assert list(res["by_region"]) == ["top", "bottom", "None"]
    assert res["by_region"]["top"] == {"acc": 1.0, "n": 2} and res["by_region"]["bottom"]["acc"] == 0.0
    with pytest.raises(ValueError):
        S.score(recs, ["red"])
