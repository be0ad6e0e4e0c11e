"""The quality-table sweep (vltok.eval.quality): subset balancing, run plan, tables and plot from results."""
import json

import pytest

from vltok.eval import quality as Q


def _rec(i, t, g):
    return {"id": i, "type": t, "region": g}


def test_balanced_takes_the_first_n_of_every_cell_in_order():
    recs = [_rec(i, t, g) for i, (t, g) in enumerate([("color", "top")] * 3 + [("count", "bottom")] * 2
                                                       + [("color", "top")])]
    sub = Q.balanced(recs, 2)
    assert [r["id"] for r in sub] == [0, 1, 3, 4]
    assert Q.balanced(recs, None) == recs


def test_answer_length_order_puts_grounding_last_and_is_stable():
    recs = [_rec(0, "grounding", "top"), _rec(1, "color", "top"), _rec(2, "exist", "top"), _rec(3, "color", "mid")]
    assert [r["id"] for r in Q.by_answer_length(recs)] == [2, 1, 3, 0]


def test_plan_runs_full_once_then_each_method_at_each_budget():
    runs = Q.plan(["fourier", "tokenshuffle"], [1.0, 0.5, 0.16])
    assert runs[0] == ("full", 1.0) and runs.count(("full", 1.0)) == 1
    assert ("fourier", 0.5) in runs and ("fourier", 0.16) in runs and ("fourier", 1.0) not in runs
    ts = [k for m, k in runs if m == "tokenshuffle"]
    assert ts == sorted(set(ts), reverse=True) and {0.5, 0.16, 0.25, round(1 / 9, 6), 0.0625} == set(ts)


def _result(method, keep, acc, regions=(0.9, 0.8, 0.7), flops=None):
    by_region = {g: {"acc": a, "n": 10} for g, a in zip(("top", "middle", "bottom"), regions)}
    r = {"method": method, "keep": keep, "n": 30, "patch": None if method == "full" else {"method": method,
                                                                                           "keep": keep},
         "score": {"overall": acc, "n": 30, "by_type": {"color": {"acc": acc, "n": 30}}, "by_region": by_region}}
    if flops is not None:
        r["stats"] = {"flops_keep": flops}
    return r


def test_tables_report_retention_flops_keep_refusals_and_region_gaps(tmp_path):
    res = [_result("full", 1.0, 0.8), _result("fastv", 0.16, 0.4, (0.2, 0.4, 0.6), 0.17),
           _result("pool", 0.16, 0.6, (0.6, 0.6, 0.6), 0.174),
           {"method": "tome", "keep": 0.16, "patch": {}, "error": "IncompatibleError: no vision stage"}]
    s = Q.summary(res, ["fastv", "pool", "tome"])
    assert "| fastv | 40.0 (50%, 0.170) |" in s and "| pool | 60.0 (75%, 0.174) |" in s and "| tome | err |" in s
    r = Q.region_table(res, ["fastv", "pool"], 0.16)
    assert "| fastv | 20.0 | 40.0 | 60.0 | +40.0 |" in r
    del res[2]["score"]["by_region"]["middle"], res[1]["score"]["by_region"]["top"]   # a small --n: empty thirds
    r = Q.region_table(res, ["fastv", "pool"], 0.16)
    assert "| fastv | - | 40.0 | 60.0 | - |" in r and "| pool | 60.0 | - | 60.0 | +0.0 |" in r
    Q.write_all(res, ["fastv", "pool", "tome"], tmp_path / "q", "# head\n", question_ids=[1, 2])
    md = (tmp_path / "q.md").read_text()
    assert md.startswith("# head") and "tome keep 0.16: IncompatibleError" in md
    assert json.loads((tmp_path / "q.json").read_text())["question_ids"] == [1, 2]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = [_result("full", 1.0, 0.8), _result("pool", 0.5, 0.7, flops=0.5), _result("pool", 0.16, 0.6, flops=0.17)]
    Q.plot(res, tmp_path / "q.png")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variants_are_labelled_configured_methods_and_bad_specs_name_the_problem():
    from vltok.eval.quality import parse_variants

    reg = {"feather": None, "fastv": None}
    v = parse_variants(['feather-1cut=feather:{"layers": [2, 3], "s2": 1.0}', "fv=fastv"], reg)
    assert v == {"feather-1cut": ("feather", {"layers": [2, 3], "s2": 1.0}), "fv": ("fastv", {})}
    for bad, word in (("x=nope:{}", "registered"), ("fastv=feather:{}", "already"), ("y=feather:{oops", "JSON"),
                      ("z=feather:[1]", "object")):
        with pytest.raises(ValueError, match=word):
            parse_variants([bad], reg)


def test_sweep_runs_a_budget_fixing_variant_once_without_keep(tmp_path, monkeypatch):
    """A --variant whose options fix the budget (feather preset='paper') is measured once with keep not given, in the
    column of the keep it gave; the other rows run at every --keeps (the model and evaluation are faked)."""
    from vltok import reference
    from vltok.eval import runner

    calls = []

    def fake_evaluate(model, processor, records, patch=None, **kw):
        calls.append(patch)
        keep = 1.0 if patch is None else (0.351 if patch["keep"] is None else patch["keep"])
        res = _result("x", keep, 0.5 if patch else 0.8)
        res.update(keep=keep, n=len(records), predictions=[{"correct": True}] * len(records))
        return res

    monkeypatch.setattr(reference, "load", lambda **kw: (None, None))
    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    monkeypatch.setattr(Q.shapes, "load_dataset", lambda d: [_rec(i, "color", "top") for i in range(3)])
    assert Q.main(["d", "--device", "cpu", "--methods", "pool", "--keeps", "0.5", "0.16", "--no-natural",
                   "--no-plot", "--out", str(tmp_path / "q"),
                   "--variant", 'fp=feather:{"preset": "paper"}']) == 0
    fp = [c for c in calls if c and c["method"] == "feather"]
    assert fp == [{"method": "feather", "keep": None, "preset": "paper"}]
    assert [c["keep"] for c in calls if c and c["method"] == "pool"] == [0.5, 0.16]
    runs = json.loads((tmp_path / "q.json").read_text())["runs"]
    assert [(r["method"], r["keep"]) for r in runs if r["method"] == "fp"] == [("fp", 0.351)]
    assert not any("error" in r for r in runs)
