"""shapes-video: determinism, balance, answers recomputed from the rendered frames, the mp4 folder format, CLI."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from vltok.eval import shapes_video as S


def _pixel_state(scene):
    """Per object, per frame: (visible, colour name or None), read from the RENDERED frames at the object's centre
    (independent of the description's interval / colour bookkeeping)."""
    n = scene["n_frames"]
    frames = [np.asarray(S.render_frame(scene, f)) for f in range(n)]
    inv = {v: k for k, v in S.COLORS.items()}
    out = []
    for o in scene["objects"]:
        seq = []
        for f in range(n):
            (x0, y0), (x1, y1) = o["path"]
            t = f / (n - 1)
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            px = tuple(int(v) for v in frames[f][int(round(y)), int(round(x))])
            seq.append(inv.get(px))
        out.append(seq)
    return out


def _recompute(scene, q):
    st = _pixel_state(scene)
    n = scene["n_frames"]
    objs = q["ask"].get("objects", [])
    nm = lambda i: f"{scene['objects'][i]['color']} {scene['objects'][i]['shape']}"  # noqa: E731
    vis = [[c is not None for c in s] for s in st]
    t = q["type"]
    if t == "order":
        a, b = objs
        return nm(a) if vis[a].index(True) < vis[b].index(True) else nm(b)
    if t == "duration":
        a, b = objs
        return nm(a) if sum(vis[a]) > sum(vis[b]) else nm(b)
    if t == "direction":
        o = scene["objects"][objs[0]]
        (x0, y0), (x1, y1) = o["path"]
        return ("right" if x1 > x0 else "left") if abs(x1 - x0) > abs(y1 - y0) else ("down" if y1 > y0 else "up")
    if t == "count_events":
        v = vis[objs[0]]
        return str(sum(v[f] and (f == 0 or not v[f - 1]) for f in range(n)))
    if t == "appear":
        v = vis[objs[0]]
        assert v[0] != v[-1]
        return "appear" if v[-1] else "disappear"
    if t == "state":
        s = st[objs[0]]
        return s[0] if q["ask"]["when"] == "start" else s[-1]
    if t == "color":
        return st[objs[0]][n // 2]
    if t == "shape":
        return scene["objects"][objs[0]]["shape"]
    if t == "count":
        return str(sum(v[n // 2] for v in vis))
    raise AssertionError(t)


@pytest.fixture(scope="module")
def items():
    return [S.test_item(i, seed=0) for i in range(2 * len(S.TYPES))]


def test_answers_recomputed_from_rendered_frames(items):
    for scene, q in items:
        if q["type"] not in S.SHAPE_TEMPORAL + ("color", "shape", "count"):
            continue   # the text types: tests/test_shapes_video_text.py reads their words back from the pixels
        assert q["answer"] == _recompute(scene, q), (q, scene)
        assert q["answer"] == S.answer(scene, q)
        assert 0 <= q["span"][0] <= q["span"][1] < scene["n_frames"]
        assert S.MIN_FRAMES <= scene["n_frames"] <= S.MAX_FRAMES


def test_names_unique_and_temporal_types_hide_the_answer_in_the_middle_frame(items):
    for scene, q in items:
        objs = [o for o in scene["objects"] if not S.is_text(o)]
        assert len({o["shape"] for o in objs}) == len(objs) and len({o["color"] for o in objs}) == len(objs)
        objs = scene["objects"]
        mid = scene["n_frames"] // 2
        if q["type"] in ("order", "duration"):   # both named objects are on screen in the middle frame
            assert all(S.visible(objs[i], mid) for i in q["ask"]["objects"])
        if q["type"] in S.SINGLE:   # single-frame types: everything still and present the whole clip
            assert all(o["visible"] == [[0, scene["n_frames"] - 1]] and o["path"][0] == o["path"][1] for o in objs)


def test_deterministic_and_split_disjoint():
    a = [S.test_item(i, seed=5) for i in range(9)]
    b = [S.test_item(i, seed=5) for i in range(9)]
    assert json.dumps(a) == json.dumps(b)
    c = [S.test_item(i, seed=6) for i in range(9)]
    assert json.dumps(a) != json.dumps(c)
    tr = [S.train_sample(i) for i in range(9)]
    assert json.dumps(tr) == json.dumps([S.train_sample(i) for i in range(9)])
    test_scenes = {json.dumps(s["objects"]) for s, _ in a}
    assert not test_scenes & {json.dumps(s["objects"]) for s, _ in tr}
    with pytest.raises(ValueError, match="test split"):
        S.train_sample(0, split="test")


def test_balanced_answers():
    import math

    per_type = {t: Counter() for t in S.TYPES}
    cycle = len(S.TYPES) * math.lcm(*(len(v) for v in S.TARGETS.values()))   # every type's answer cycle completes
    for i in range(0, cycle, 1):
        qtype = S.TYPES[i % len(S.TYPES)]
        opts = S.TARGETS[qtype]
        per_type[qtype][opts[(i // len(S.TYPES)) % len(opts)]] += 1
    for t, c in per_type.items():
        assert len(set(c.values())) == 1 and len(c) == len(S.TARGETS[t]), (t, c)
    # and the generator really produces the requested answers: order / duration answer the first-named object
    # exactly half the time, direction cycles over the 4 directions
    recs = [S.test_item(i)[1] for i in range(0, 8 * len(S.TYPES))]
    d = Counter(q["answer"] for q in recs if q["type"] == "direction")
    assert d == Counter({k: 2 for k in S.DIRECTIONS})
    st = Counter(q["answer"] for q in [S.test_item(i)[1] for i in range(S.TYPES.index("state"), 20 * len(S.TYPES),
                                                                          len(S.TYPES))])
    assert st == Counter({c: 2 for c in S.COLORS})   # state: each colour once as the start and once as the end
    for t in ("order", "duration", "appear"):
        qs = [q for q in recs if q["type"] == t]
        firsts = Counter(q["question"].split(", the ")[1].startswith(q["answer"]) if t != "appear" else q["answer"]
                         for q in qs)
        assert len(set(firsts.values())) == 1 and len(firsts) == 2, (t, firsts)


def test_folder_format_mp4_and_cli(tmp_path):
    pytest.importorskip("av")
    from vltok.cli import main

    d = tmp_path / "sv"
    n = len(S.TYPES)
    assert main(["shapes-video", str(d), "--n", str(n), "--seed", "3"]) == 0
    assert main(["shapes-video", str(d), "--n", str(n), "--seed", "3"]) == 2   # refuses to overwrite
    assert main(["shapes-video", str(d), "--n", str(n), "--seed", "3", "--force"]) == 0
    assert S.is_video_folder(d)
    recs = S.load_dataset(d)
    assert [r["type"] for r in recs] == list(S.TYPES)
    for r in recs:
        assert set(r) >= {"id", "video", "question", "answer", "type", "span", "n_frames", "scene", "version"}
        assert r["version"] == S.VERSION
        dec = S.load_clip(r, "decoded")
        ren = S.load_clip(r, "rendered")
        assert len(dec) == len(ren) == r["n_frames"]
        diff = np.abs(np.asarray(dec[len(dec) // 2], dtype=np.int16) - np.asarray(ren[len(ren) // 2], dtype=np.int16))
        assert diff.mean() < 3.0   # lossy H.264, but the same picture
        assert S.answer(r["scene"], r) == r["answer"]


def test_sample_indices_and_scoring():
    assert S.sample_indices(64, 16)[0] == 0 and S.sample_indices(64, 16)[-1] == 63
    assert S.sample_indices(8, 16) == sorted(S.sample_indices(8, 16)) and len(S.sample_indices(8, 16)) == 16
    assert S.sample_indices(9, 1) == [4]
    recs = [{"type": "order", "answer": "red circle"}, {"type": "count", "answer": "3"}]
    res = S.score(recs, ["The red circle.", "three"])
    assert res["overall"] == 1.0 and res["temporal"] == 1.0 and res["single_frame_types"] == 1.0
    assert S.score(recs, ["blue square", "3"])["by_type"]["order"]["acc"] == 0.0
