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
