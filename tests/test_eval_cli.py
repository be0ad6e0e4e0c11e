"""`vltok eval` / `vltok shapes` robustness (issue 14 item 3): bad input fails at once with one line, a bad image is
an error row, finished batches survive Ctrl-C and --resume continues. The model is a stand-in (the runner's
generate() is replaced by a recorder): what is tested here is the command's flow, not a VLM."""
import json
from pathlib import Path

import pytest
import torch

from vltok import cli as vcli
from vltok.eval import cli as ecli
from vltok.eval import runner
from vltok.eval import shapes as S

FIX = Path(__file__).resolve().parent / "fixtures"


class _Fake(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


@pytest.fixture
def fake(monkeypatch):
    """Replace the model loading and generation: answers "red" to everything; records each batch's prompts."""
    calls = {"batches": [], "loads": 0, "interrupt_at": None}

    def load_model(path, device, dtype):
        calls["loads"] += 1
        return (_Fake(), None), str(path) if path else "vltok-ref"

    def generate(model, processor, texts, visuals, kind="image", **kw):
        if calls["interrupt_at"] is not None and len(calls["batches"]) == calls["interrupt_at"]:
            raise KeyboardInterrupt
        calls["batches"].append(list(texts))
        assert all(v.size == (336, 336) for v in visuals)
        return ["red"] * len(texts)

    monkeypatch.setattr(ecli, "load_model", load_model)
    monkeypatch.setattr(runner, "generate", generate)
    return calls


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return S.generate(tmp_path_factory.mktemp("shapes") / "d", n=9, seed=0)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _one_line_error(capsys, code, *words):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_bad_arguments_fail_before_the_model_loads(fake, shapes_dir, tmp_path, capsys):
    _one_line_error(capsys, vcli.main(["eval", str(tmp_path / "missing"), "--no-progress"]), "no such folder")
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--batch-size", "0"]), "--batch-size", "got 0")
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--batch-size", "-3"]), "--batch-size")
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--resume"]), "--resume needs --json")
    _one_line_error(capsys, vcli.main(["eval", str(tmp_path), "--no-progress"]), "--format")
    # an unwritable --json path (its parent is a file): refused now, not after the run
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--json", str(tmp_path / "afile" / "r.json")]),
                    "cannot write")
    (tmp_path / "adir.json").mkdir()
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--json", str(tmp_path / "adir.json")]), "folder")
    assert fake["loads"] == 0 and fake["batches"] == []
    assert not (tmp_path / "r.json").exists()


def test_malformed_questions_line_names_file_and_line(fake, shapes_dir, tmp_path, capsys):
    d = _copy(shapes_dir, tmp_path / "d")
    lines = (d / "questions.jsonl").read_text().splitlines()
    lines.insert(3, "")                      # a blank line (skipped) before the bad one: the count stays right
    lines[5] = lines[5][:-10]                # file line 6 truncated
    (d / "questions.jsonl").write_text("\n".join(lines) + "\n")
    _one_line_error(capsys, vcli.main(["eval", str(d), "--no-progress"]), f"{d / 'questions.jsonl'}:6:",
                    "not valid JSON")
    (d / "questions.jsonl").write_text("\n".join(lines[:5] + ["[1, 2]"]) + "\n")
    _one_line_error(capsys, vcli.main(["eval", str(d)]), "questions.jsonl:6:", "JSON object")
    assert fake["loads"] == 0


def test_bad_images_are_error_rows_and_the_run_goes_on(fake, shapes_dir, tmp_path, capsys):
    d = _copy(shapes_dir, tmp_path / "d")
    recs = S.load_dataset(d)
    Path(recs[1]["image_path"]).unlink()                                   # missing
    Path(recs[4]["image_path"]).write_bytes(b"")                           # empty
    raw = Path(recs[7]["image_path"]).read_bytes()
    Path(recs[7]["image_path"]).write_bytes(raw[: len(raw) // 3])          # truncated
    out = tmp_path / "o" / "r.json"
    code = vcli.main(["eval", str(d), "--batch-size", "4", "--json", str(out), "--no-progress"])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["n"] == 9 and res["n_errors"] == 3
    bad = {e["id"]: e["error"] for e in res["errors"]}
    assert set(bad) == {recs[i]["id"] for i in (1, 4, 7)}
    assert "not found" in bad[recs[1]["id"]] and "empty or corrupt" in bad[recs[4]["id"]]
    assert "truncated" in bad[recs[7]["id"]] or "decode" in bad[recs[7]["id"]]
    # the six good items were answered (batches of 4 minus the bad ones) and scored; the bad ones count as wrong
    assert sum(len(b) for b in fake["batches"]) == 6
    preds = {p["id"]: p for p in res["predictions"]}
    assert preds[recs[1]["id"]]["pred"] is None and preds[recs[1]["id"]]["correct"] is False
    n_red = sum(S.normalize(r["answer"]) == "red" for i, r in enumerate(recs) if i not in (1, 4, 7))
    assert res["score"]["overall"] == pytest.approx(n_red / 9)
    assert "could not be read" in capsys.readouterr().err
    assert out.with_suffix(".md").exists() and not runner.partial_path(out).exists()


def test_ctrl_c_keeps_finished_batches_and_resume_continues(fake, shapes_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    fake["interrupt_at"] = 2            # batches 0 and 1 finish (2 x 2 items), the third is interrupted
    code = vcli.main(["eval", str(shapes_dir), "--batch-size", "2", "--json", str(out), "--no-progress"])
    assert code == 130 and "--resume" in capsys.readouterr().err
    part = runner.partial_path(out)
    rows = [json.loads(x) for x in part.read_text().splitlines()]
    assert "header" in rows[0] and len(rows) == 1 + 4 and not out.exists()
    # a resume with another method is refused before the model loads
    loads = fake["loads"]
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--batch-size", "2", "--json", str(out),
                                       "--resume", "--method", "pool"]), "another run", "patch")
    assert fake["loads"] == loads
    fake["interrupt_at"] = None
    done_before = [q for b in fake["batches"] for q in b]
    code = vcli.main(["eval", str(shapes_dir), "--batch-size", "2", "--json", str(out), "--no-progress",
                      "--resume"])
    assert code == 0
    asked = [q for b in fake["batches"] for q in b][len(done_before):]
    assert len(asked) == 5                                   # only the 5 unanswered items
    res = json.loads(out.read_text())
    assert res["n"] == 9 and res["resumed"] == 4 and len(res["predictions"]) == 9
    assert [p["id"] for p in res["predictions"]] == [r["id"] for r in S.load_dataset(shapes_dir)]
    assert not part.exists()


def test_evaluate_without_a_file_keeps_running_on_bad_items(fake, shapes_dir, tmp_path):
    d = _copy(shapes_dir, tmp_path / "d")
    Path(S.load_dataset(d)[0]["image_path"]).write_bytes(b"not an image")
    res = runner.evaluate(_Fake(), None, d, progress=False, batch_size=16)
    assert res["n_errors"] == 1 and res["n"] == 9 and "errors (scored as wrong)" in runner.markdown([res])


def test_official_format_through_the_command(fake, tmp_path, capsys, monkeypatch):
    """`vltok eval FIXTURE --format pope` and the lmms scorer option; fixed answers -> the hand-computed metrics."""
    out = tmp_path / "pope.json"
    assert vcli.main(["eval", str(FIX / "pope"), "--json", str(out), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["format"] == "pope" and res["n"] == 12 and res["n_errors"] == 0
    labels = [json.loads(x)["label"] for s in ("random", "popular", "adversarial")
              for x in (FIX / "pope" / f"coco_pope_{s}.json").read_text().splitlines()]
    # every answer "red" -> POPE's rule says "yes": accuracy = share of yes labels, precision = that share, recall 1
    assert res["score"]["splits"]["random"]["accuracy"] == labels[:4].count("yes") / 4
    assert res["score"]["splits"]["random"]["recall"] == 1.0 and res["score"]["splits"]["random"]["yes_ratio"] == 1.0
    assert "F1 random" in out.with_suffix(".md").read_text()
    assert vcli.main(["eval", str(FIX / "pope"), "--scorer", "lmms", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["score"]["splits"]["random"]["accuracy"] == 0.0   # "red" is neither
    _one_line_error(capsys, vcli.main(["eval", str(FIX / "gqa"), "--scorer", "lmms"]), "only official")


def test_shapes_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    d = tmp_path / "s"
    assert vcli.main(["shapes", str(d), "--n", "3"]) == 0
    (d / "images" / "old.png").write_bytes(b"x")
    (d / "notes.txt").write_text("mine")
    capsys.readouterr()
    _one_line_error(capsys, vcli.main(["shapes", str(d), "--n", "2"]), "not empty", "--force")
    assert len(S.load_dataset(d)) == 3
    assert vcli.main(["shapes", str(d), "--n", "2", "--force"]) == 0
    assert len(S.load_dataset(d)) == 2 and sorted(p.name for p in (d / "images").iterdir()) == sorted(
        Path(r["image"]).name for r in S.load_dataset(d))
    assert (d / "notes.txt").read_text() == "mine"            # only the benchmark's own files are replaced
    capsys.readouterr()
    _one_line_error(capsys, vcli.main(["shapes", str(tmp_path / "z"), "--n", "0"]), "--n")


def test_shapes_export_vqav2(tmp_path):
    from vltok.eval import datasets as D

    src = S.generate(tmp_path / "s", n=18, seed=0)
    assert vcli.main(["shapes", str(tmp_path / "v"), "--export", "vqav2", "--from", str(src)]) == 0
    ds = D.load(tmp_path / "v")
    recs = [r for r in S.load_dataset(src) if r["type"] != "grounding"]
    assert ds.format == "vqav2" and len(ds.items) == len(recs) == 16
    assert [it.prompt.split("\n")[0] for it in ds.items] == [r["question"] for r in recs]
    pos = next(i for i, r in enumerate(recs) if r["type"] == "position")
    assert ds.items[pos].target == [recs[pos]["answer"].replace("-", " ")] * 10   # VQA-normalised answers
    # the right answers score 1 under the official rule, whatever their spelling
    assert ds.score([r["answer"] for r in recs])["overall"] == 1.0
    assert vcli.main(["shapes", str(tmp_path / "g"), "--n", "9", "--export", "vqav2"]) == 0
    assert len(D.load(tmp_path / "g").items) == 8


def test_resume_retries_the_items_that_failed(fake, shapes_dir, tmp_path):
    d = _copy(shapes_dir, tmp_path / "d")
    img = Path(S.load_dataset(d)[2]["image_path"])
    good = img.read_bytes()
    img.write_bytes(b"")
    out = tmp_path / "r.json"
    res = runner.evaluate(_Fake(), None, d, progress=False, batch_size=4, save=out)
    assert res["n_errors"] == 1 and sum(len(b) for b in fake["batches"]) == 8
    img.write_bytes(good)                                   # the file is fixed: --resume answers only that item
    res = runner.evaluate(_Fake(), None, d, progress=False, batch_size=4, save=out, resume=True)
    assert res["n_errors"] == 0 and res["resumed"] == 8 and fake["batches"][-1] == [S.load_dataset(d)[2]["question"]]


def test_a_truncated_image_is_an_error_even_when_pil_is_told_to_accept_it(shapes_dir, tmp_path, monkeypatch):
    from PIL import ImageFile

    raw = Path(S.load_dataset(shapes_dir)[0]["image_path"]).read_bytes()
    (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)   # what importing lmms-eval's task module does
    with pytest.raises(runner.ItemError):
        runner.load_image(str(tmp_path / "t.png"))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True                  # the caller's setting is restored


# -- session 24 (new-user review): method / keep / options and the video folder path ---------------------------------
def test_method_keep_and_options_fail_before_the_model_loads(fake, shapes_dir, tmp_path, capsys):
    """A method typo, a keep outside (0, 1], an option the method does not take, a method the reference VLM's family
    cannot run: one line, exit 2, no model loaded and no partial file (the checks vltok.patch runs, run first)."""
    out = tmp_path / "r.json"
    run = ["eval", str(shapes_dir), "--json", str(out), "--no-progress"]
    _one_line_error(capsys, vcli.main(run + ["--method", "fourir"]), "unknown method 'fourir'",
                    "did you mean 'fourier'?")
    _one_line_error(capsys, vcli.main(run + ["--method", "fourier", "--keep", "0"]), "keep=0.0", "(0, 1]")
    _one_line_error(capsys, vcli.main(run + ["--method", "fourier", "--keep", "1.5"]), "keep=1.5")
    _one_line_error(capsys, vcli.main(run + ["--method", "fastv", "--arg", "Kk=3"]), "no option 'Kk'", "K,")
    _one_line_error(capsys, vcli.main(run + ["--method", "fastv", "--arg", "K=two"]), "K='two'", "integer")
    _one_line_error(capsys, vcli.main(run + ["--method", "tmerge"]), "tmerge", "llava adapter has no video input")
    _one_line_error(capsys, vcli.main(run + ["--keep", "0"]), "--keep needs --method")
    _one_line_error(capsys, vcli.main(run + ["--method", "none", "--keep", "0.5"]), "--keep needs --method")
    _one_line_error(capsys, vcli.main(run + ["--arg", "K=2"]), "--arg needs --method")
    _one_line_error(capsys, vcli.main(run + ["--model", str(tmp_path / "nope")]), "no such checkpoint folder")
    assert fake["loads"] == 0 and fake["batches"] == []
    assert not out.exists() and not runner.partial_path(out).exists()


def test_method_none_is_the_full_model_and_names_are_case_insensitive(fake, shapes_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert vcli.main(["eval", str(shapes_dir), "--method", "none", "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["patch"] is None and fake["loads"] == 1
    args = vcli.build_parser().parse_args(["eval", str(shapes_dir), "--method", "FastV"])
    assert ecli._check_args(args).format == "shapes" and args.method == "fastv"   # the registered spelling


def test_a_run_that_fails_before_its_first_answer_does_not_block_resume(fake, shapes_dir, tmp_path, capsys):
    """The model loads but the patch fails (here: the stand-in model is no VLM): no OUT.partial.jsonl is left, so the
    corrected command with --resume runs; a header-only partial file (older vltok) does not block it either."""
    out = tmp_path / "r.json"
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--method", "pool", "--json", str(out),
                                       "--no-progress"]), "vltok: error:")
    assert fake["loads"] == 1 and not runner.partial_path(out).exists()
    assert vcli.main(["eval", str(shapes_dir), "--json", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads(out.read_text())["n"] == 9
    runner.partial_path(out).write_text(json.dumps({"header": {"model": "another"}}) + "\n")
    assert vcli.main(["eval", str(shapes_dir), "--json", str(out), "--resume", "--no-progress"]) == 0
    assert json.loads(out.read_text())["resumed"] == 0


def test_limit_0_reads_nothing_and_is_refused(fake, shapes_dir, capsys):
    assert S.load_dataset(shapes_dir, 0) == [] and len(S.load_dataset(shapes_dir, 2)) == 2
    _one_line_error(capsys, vcli.main(["eval", str(shapes_dir), "--limit", "0"]), "--limit must be at least 1")


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    from vltok.eval import shapes_video as SV

    return SV.generate(tmp_path_factory.mktemp("sv") / "d", n=14, seed=0, write_videos=False)


@pytest.fixture
def video_calls(monkeypatch):
    """Record what `vltok eval` passes to the video evaluation (the video reference VLM is not loaded)."""
    from vltok.eval import quality_video

    calls = []
    monkeypatch.setattr(quality_video, "eval_folder", lambda folder, method=None, keep=None, **kw:
                        calls.append(dict(folder=folder, method=method, keep=keep, **kw)))
    return calls


def test_video_folder_passes_frames_keep_and_the_real_command(video_dir, video_calls, tmp_path, capsys):
    from vltok import api as vltok_api, cli_args

    argv = ["eval", str(video_dir), "--frames", "4", "--method", "POOL", "--arg", "rounding=floor", "--limit", "3",
            "--dtype", "bf16", "--no-progress", "--json", str(tmp_path / "r.json")]
    assert vcli.main(argv) == 0
    (c,) = video_calls
    assert (c["frames"], c["method"], c["keep"], c["options"], c["limit"], c["dtype"]) == \
        (4, "pool", cli_args.DEFAULT_KEEP, {"rounding": "floor"}, 3, "bfloat16")
    assert c["command"] == "vltok " + " ".join(argv)
    assert vcli.main(["eval", str(video_dir)]) == 0                        # defaults: 16 frames, the full model
    assert (video_calls[1]["frames"], video_calls[1]["method"]) == (16, None)
    # the image path passes keep not given (None): vltok.patch's default, the same value
    args = vcli.build_parser().parse_args(["eval", str(video_dir), "--method", "pool"])
    assert ecli._patch(args)["keep"] is None and vltok_api.DEFAULT_KEEP == cli_args.DEFAULT_KEEP == 0.16


@pytest.mark.parametrize("extra,words", [
    (["--keep", "0.5"], ["--keep needs --method"]),
    (["--resume", "--json", "x.json"], ["--resume does not apply to shapes-video"]),
    (["--scorer", "lmms"], ["--scorer does not apply"]),
    (["--max-new-tokens", "4"], ["--max-new-tokens does not apply"]),
    (["--limit", "0"], ["--limit must be at least 1"]),
    (["--frames", "0"], ["--frames must be at least 1"]),
    (["--method", "tmerj"], ["unknown method 'tmerj'", "did you mean 'tmerge'"]),
    (["--method", "fastv", "--arg", "Kk=1"], ["no option 'Kk'"]),
    (["--method", "visionzip"], ["visionzip", "llava_next_video"]),             # the video family cannot run it
    (["--model", "some/ckpt"], ["--model does not apply", "vltok video run"]),
])
def test_video_folder_refuses_what_it_cannot_honour(video_dir, video_calls, capsys, extra, words):
    _one_line_error(capsys, vcli.main(["eval", str(video_dir), *extra]), *words)
    assert video_calls == []


def test_video_table_shows_a_dash_for_an_empty_group():
    from vltok.eval import quality_video as Q
    from vltok.eval import shapes_video as SV

    score = SV.score([{"type": "order", "answer": "a"}, {"type": "direction", "answer": "left"}], ["a", "up"])
    assert score["single_frame_types"] is None and score["temporal"] == 0.5   # the JSON: null, not 0.0
    res = {"label": "full", "patch": None, "frames": 16, "tokens_per_video": 2304, "keep_achieved": 1.0,
           "score": score}
    doc = {"model": "m", "dataset": "d", "n": 2, "source": "rendered", "frames": 16, "runs": [res], "device": "cpu",
           "command": "c", "seconds": 1.0}
    assert "| full | 16 | 2304 | 1.000 | 1.000 | 50.0 | 50.0 | - | 100.0 | 0.0 |" in Q.markdown(doc)


def test_shapes_video_without_videos_and_into_an_existing_folder(tmp_path, capsys):
    from vltok.eval import quality_video as Q
    from vltok.eval import shapes_video as SV

    d = tmp_path / "sv"
    assert vcli.main(["shapes-video", str(d), "--n", "2", "--no-videos"]) == 0
    assert not (d / "videos").exists() and SV.is_video_folder(d)
    rec = SV.load_dataset(d)[0]
    assert Q._clip_pixels(rec, 2, "auto").shape == (2, 3, 336, 336)   # frames re-rendered from the scene
    capsys.readouterr()
    _one_line_error(capsys, vcli.main(["shapes-video", str(d), "--n", "2", "--no-videos"]),
                    "vltok: error:", "already holds a dataset", "--force")
