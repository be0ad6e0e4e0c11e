"""The lmms-eval plugin (model "vltok" through the lmms_eval.models entry point) and the local task writer.

Needs lmms-eval installed (`pip install -e ".[lmms]"`). The fast tests run lmms-eval's own evaluator in-process with
a stand-in model (runner.generate replaced by canned answers); the slow one runs the `lmms-eval` command on the
reference VLM over the POPE fixture and checks it gives the same answers and scores as `vltok eval`."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: pip install -e '.[lmms]'")

from vltok.eval import cli as ecli  # noqa: E402
from vltok.eval import datasets as D  # noqa: E402
from vltok.eval import lmms_tasks, runner  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# the POPE fixture's canned answers (tests/test_bench.py::test_pope_fixture_per_split_official_and_lmms)
POPE_PREDS = ["Yes, there is.", "No.", "There is not.", "Nope", "no", "yes", "NO", "Yes.", "no", "no", "no", "no"]


def _digest(img) -> str:
    return hashlib.sha256(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


class _Fake(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model, list_available_models

    from vltok.eval.lmms_plugin import VltokLMM

    assert "vltok" in list_available_models()
    assert get_model("vltok") is VltokLMM


def test_lmms_evaluator_with_the_plugin_batches_and_scores(monkeypatch, tmp_path):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    ds = D.load(FIX / "pope")
    answer = {(it.prompt, _digest(runner.load_image(it.image))): p for it, p in zip(ds.items, POPE_PREDS)}
    batches = []

    def generate(model, processor, texts, visuals, kind="image", max_new_tokens=24, stop=None):
        assert kind == "image" and max_new_tokens == 128
        batches.append(len(texts))
        return [answer[(t, _digest(v))] for t, v in zip(texts, visuals)]

    monkeypatch.setattr(ecli, "load_model", lambda path, device, dtype: ((_Fake(), None), str(path)))
    monkeypatch.setattr(runner, "generate", generate)
    lmms_tasks.write_task(FIX / "pope", tmp_path / "tasks", "vltok_pope_fx")
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    out = evaluator.simple_evaluate(model="vltok", model_args="pretrained=stand-in", tasks=["vltok_pope_fx"],
                                    batch_size=5, device="cpu",
                                    task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    assert sorted(batches, reverse=True) == [5, 5, 2]
    m = out["results"]["vltok_pope_fx"]
    # hand-computed in test_bench: official mean accuracy over the splits (0.5, 0.75, 0.5), mean F1 (0.5, 0.8, 0)
    assert m["vltok_overall,none"] == pytest.approx((0.5 + 0.75 + 0.5) / 3)
    assert m["vltok_f1,none"] == pytest.approx(1.3 / 3)
    # lmms-eval's own POPE scorer (exact yes / no): random 0, popular 3 ("no", "yes", "NO"), adversarial 2 -> 5/12
    assert m["vltok_lmms,none"] == pytest.approx(5 / 12)


def test_plugin_argument_errors(monkeypatch):
    from vltok.errors import VltokError
    from vltok.eval.lmms_plugin import VltokLMM

    monkeypatch.setattr(ecli, "load_model", lambda path, device, dtype: ((_Fake(), None), str(path)))
    with pytest.raises(VltokError, match="without method"):
        VltokLMM(pretrained="x", keep=0.5, device="cpu")
    with pytest.raises(VltokError, match="batch_size"):
        VltokLMM(pretrained="x", batch_size="auto", device="cpu")
    with pytest.raises(VltokError):          # vltok.patch refuses a model it does not support
        VltokLMM(pretrained="x", method="fourier", keep=0.16, device="cpu")
    lm = VltokLMM(pretrained="x", device="cpu", batch_size="3")
    assert lm.batch_size == 3 and lm.handle is None
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])


# ---------------------------------------------------------------------------------------------------------------
# end to end: the lmms-eval command on the reference VLM


@pytest.fixture(scope="module")
def saved_reference(tmp_path_factory):
    from vltok import reference

    try:
        model, proc = reference.load()
    except reference.MissingPackageError as e:
        pytest.skip(str(e))
    path = tmp_path_factory.mktemp("ref") / "vltok-ref"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


@pytest.mark.slow
def test_lmms_eval_command_matches_vltok_eval_on_the_reference_vlm(saved_reference, tmp_path):
    """`lmms-eval --model vltok --model_args pretrained=...,method=fourier,keep=0.5 --batch_size 4` over the POPE
    fixture (a local task, --include_path) gives the answers and the scores of `vltok eval` with the same settings."""
    tasks = tmp_path / "tasks"
    lmms_tasks.write_task(FIX / "pope", tasks, "vltok_pope_e2e")
    env = {**os.environ, **OFFLINE}
    cmd = [sys.executable, "-P", "-m", "lmms_eval", "--model", "vltok", "--model_args",
           f"pretrained={saved_reference},method=fourier,keep=0.5", "--tasks", "vltok_pope_e2e", "--include_path",
           str(tasks), "--batch_size", "4", "--device", "cpu", "--output_path", str(tmp_path / "lmms"),
           "--log_samples"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    samples = [json.loads(x) for f in (tmp_path / "lmms").rglob("*samples_vltok_pope_e2e.jsonl")
               for x in f.read_text().splitlines()]
    agg = json.loads(next((tmp_path / "lmms").rglob("*results.json")).read_text())["results"]["vltok_pope_e2e"]
    lmms_preds = {s["target"]: s["filtered_resps"] for s in samples}
    assert len(lmms_preds) == 12

    out = tmp_path / "vltok.json"
    assert ecli.main(["eval", str(FIX / "pope"), "--model", str(saved_reference), "--method", "fourier",
                      "--keep", "0.5", "--batch-size", "4", "--device", "cpu", "--json", str(out),
                      "--no-progress"]) == 0
    res = json.loads(out.read_text())
    ours = {p["id"]: p["pred"] for p in res["predictions"]}
    assert ours == lmms_preds
    assert all(isinstance(p, str) and p for p in ours.values())
    assert res["stats"]["tokens_out"] < res["stats"]["tokens_in"]           # the patch acted
    assert agg["vltok_overall,none"] == pytest.approx(res["score"]["overall"])
    assert agg["vltok_f1,none"] == pytest.approx(res["score"]["f1"])
    ds = D.load(FIX / "pope")
    assert agg["vltok_lmms,none"] == pytest.approx(
        ds.score([ours[it.id] for it in ds.items], scorer="lmms")["pooled"]["accuracy"])
    assert res["score"]["overall"] >= 0.5      # the trained reference answers POPE-style questions on shapes


def test_lmms_scorer_metric_runs_lmms_evals_own_functions():
    """The local task's vltok_lmms metric calls lmms-eval's vqav2 / pope functions: on the fixtures it equals
    vltok's re-implementation (--scorer lmms), hand-computed in test_bench (0.84 and 5/12)."""
    root = str((FIX / "vqav2").resolve())
    preds = ["Two", "yes.", "A dog", "hot-dog", "two"]
    rows = [{"id": i, "pred": p, "format": "vqav2", "root": root}
            for i, p in zip(["1001", "1002", "1003", "1004", "1005"], preds)]
    assert lmms_tasks.agg_lmms(rows) == pytest.approx(0.84)
    assert lmms_tasks.agg_overall(rows) == pytest.approx(0.62)
    ds = D.load(FIX / "pope")
    rows = [{"id": it.id, "pred": p, "format": "pope", "root": str((FIX / "pope").resolve())}
            for it, p in zip(ds.items, POPE_PREDS)]
    assert lmms_tasks.agg_lmms(rows) == pytest.approx(5 / 12)
