"""Options that fix the visual-token budget themselves (vltok.registry.FixedBudget, ``register(budget=...)``):
without keep the option decides and the handle reports the keep it gives; an explicit keep it does not agree with,
keep=1.0 included, is refused naming both and the fix, with nothing applied; an agreeing keep is accepted."""
from __future__ import annotations

import copy

import pytest
import torch

import vltok
from test_inllm import batch, tiny_llava_deep
from tiny import llava_inputs, tiny_llava
from vltok.errors import InvalidOptionError
from vltok.methods.tokenshuffle import ShuffleProjector, save_projector

PROMPTS = [[5, 6, -1, 7, 8, 9], [3, -1, 4]]
DEEP = 6   # tiny_llava_deep's LLM layers; both tiny models have an 8x8 grid (64 visual tokens)


def _projector(m, window=(2, 2)):
    stock = m.model.multi_modal_projector
    return ShuffleProjector.from_projector(stock.linear_1, stock.linear_2, "gelu", window)


# (id, deep model?, method, options, the fix the refusal names)
CASES = [
    ("fourier-r", False, "fourier", dict(r=(4, 4)), "drop r=... to let keep choose the grid"),
    ("fourier-r-int", False, "fourier", dict(r=3), "drop r=..."),
    ("tokenshuffle-window", False, "tokenshuffle", dict(window=(2, 2)), "drop window=... to let keep choose"),
    ("tokenshuffle-projector", False, "tokenshuffle", "projector", "drop projector=... to pool training-free"),
    ("feather-paper", True, "feather", dict(preset="paper"), "drop preset='paper' to let keep choose the plan"),
    ("feather-a", True, "feather", dict(a=0.3), "drop a=... to let keep choose it"),
    ("mustdrop-reference", True, "mustdrop", dict(mode="reference", thr=(0.5, 0.05), pruning_layers=(1, 3),
                                                  stages=("prefill", "decode")), "use mode='budget'"),
    ("llavamini-drop-K", True, "llavamini", dict(mode="early_fusion", reduce="drop", K=2), "drop K=..."),
]


@pytest.fixture(scope="module")
def models():
    return {False: tiny_llava(), True: tiny_llava_deep()}


def _options(case_opts, m):
    return dict(projector=_projector(m)) if case_opts == "projector" else dict(case_opts)


@pytest.mark.parametrize("cid,deep,method,opts,fix", CASES, ids=[c[0] for c in CASES])
def test_without_keep_the_option_decides_and_the_handle_says_so(models, cid, deep, method, opts, fix):
    m = models[deep]
    opts = _options(opts, m)
    inp = batch(m, "b2-left") if deep else llava_inputs(m, PROMPTS)
    with torch.no_grad(), vltok.patched(m, method, **opts) as h:
        assert h.keep_set_by is not None and f"set by {h.keep_set_by}" in repr(h)
        before = h.keep   # a number where the option gives one keep for every image, else None until a call
        m(**inp)
        s = h.stats
        assert s["keep_set_by"] == h.keep_set_by and s["keep"] == h.keep
        assert 0 < h.keep < 1 and s["flops_keep"] < 1, s
        assert before is None or before == h.keep
        if before is None:   # reported per call: the FLOPs-equivalent keep the option gave
            assert h.keep == s["flops_keep"]
        assert f"keep={h.keep:.4g} (set by {h.keep_set_by})" in repr(h)
        clone = copy.deepcopy(m)   # the copy is patched the same way (keep still not given)
        assert vltok.get_handle(clone).keep_set_by == h.keep_set_by
        with pytest.raises(vltok.AlreadyPatchedError, match="set by"):
            vltok.patch(m, method, **opts)


def test_effective_keeps_against_written_references(models):
    small, deep = models[False], models[True]
    inp = llava_inputs(small, PROMPTS)
    with torch.no_grad():
        # fourier r=(4, 4) on the 8x8 grid is what keep=0.25 picks: the same logits, keep 16/64
        with vltok.patched(small, "fourier", keep=0.25) as h:
            ref = small(**inp).logits
        with vltok.patched(small, "fourier", r=(4, 4)) as h:
            assert h.keep is None
            assert torch.equal(small(**inp).logits, ref) and h.keep == 0.25 and h.stats["tokens_out"] == 32
        with vltok.patched(small, "fourier", r=(3, 5)) as h:
            small(**inp)
            assert h.keep == 15 / 64 and [i["grids_out"] for i in h.stats["images"]] == [[[3, 5]]] * 2
        # tokenshuffle window=(2, 2): keep 1/4 before any call
        with vltok.patched(small, "tokenshuffle", keep=0.25) as h:
            ref = small(**inp).logits
        with vltok.patched(small, "tokenshuffle", window=(2, 2)) as h:
            assert h.keep == 0.25 and repr(h).startswith("PatchHandle('tokenshuffle', keep=0.25 (set by window=(2, 2))")
            assert torch.equal(small(**inp).logits, ref)
        inp = batch(deep, "b1")
        # llavamini reduce='drop', K=2 on 6 layers: every visual row leaves before layer 2, keep 2/6
        with vltok.patched(deep, "llavamini", mode="early_fusion", reduce="drop", K=2) as h:
            deep(**inp)
            assert h.stats["tokens_per_layer"] == [64, 64, 0, 0, 0, 0] and h.keep == pytest.approx(1 / 3)
        # feather preset='paper' on 6 layers: cuts before layers 6//4 = 1 and 6//2 = 3
        with vltok.patched(deep, "feather", preset="paper") as h:
            deep(**inp)
            n = h.stats["tokens_per_layer"]
            assert h.stats["prune_layers"] == [1, 3] and h.keep == pytest.approx(sum(n) / (DEEP * 64))


@pytest.mark.parametrize("keep", [0.5, 0.16, 1.0])
@pytest.mark.parametrize("cid,deep,method,opts,fix", CASES, ids=[c[0] for c in CASES])
def test_a_conflicting_keep_is_refused_and_nothing_applied(models, cid, deep, method, opts, fix, keep):
    m = models[deep]
    opts = _options(opts, m)
    if cid == "tokenshuffle-window" and keep == 0.16:
        keep = 0.11   # (0.16 picks a 3x2 window, not this 2x2 one)
    inp = batch(m, "b1") if deep else llava_inputs(m, PROMPTS[:1])
    with torch.no_grad():
        ref = m(**inp).logits
        before = set(m.__dict__)
        with pytest.raises(InvalidOptionError) as e:
            vltok.patch(m, method, keep=keep, **opts)
        msg = str(e.value)
        assert f"keep={keep!r} conflicts with" in msg and f"Drop keep={keep!r}" in msg and fix in msg, msg
        if keep == 1.0:
            assert "would not keep every visual token" in msg
        assert vltok.get_handle(m) is None and set(m.__dict__) == before
        assert torch.equal(m(**inp).logits, ref)   # the model is unpatched
        with pytest.raises(InvalidOptionError, match="conflicts with"):   # the same through patched()
            with vltok.patched(m, method, keep=keep, **opts):
                pass
        assert vltok.get_handle(m) is None


def test_an_agreeing_keep_is_accepted(models, tmp_path):
    small = models[False]
    inp = llava_inputs(small, PROMPTS[:1])
    with torch.no_grad():
        for keep, window in [(0.25, (2, 2)), (1 / 6, (3, 2)), (0.16, (3, 2)), (0.167, (3, 2)), (1.0, (1, 1))]:
            with vltok.patched(small, "tokenshuffle", keep=keep, window=window) as h:   # the plan keep alone picks
                small(**inp)
                assert h.method.params["window"] == window and h.keep == keep
        ref = small(**inp).logits
        with vltok.patched(small, "tokenshuffle", keep=1.0, window=1) as h:   # window 1x1 at keep 1: unchanged
            assert torch.equal(small(**inp).logits, ref)
        proj = _projector(small)
        path = tmp_path / "p.safetensors"
        save_projector(proj, str(path), "clip")
        for p in (proj, str(path)):
            with vltok.patched(small, "tokenshuffle", keep=0.25, projector=p) as h:
                small(**inp)
                assert h.stats["tokens_out"] == 16
            with vltok.patched(small, "tokenshuffle", projector=p) as h:
                assert h.keep == 0.25 and h.keep_set_by.startswith("projector=")
    # options whose keep depends on the grid or the LLM's depth take no explicit keep, not even the achieved one
    with pytest.raises(InvalidOptionError, match="conflicts with r=4"):
        vltok.patch(small, "fourier", keep=0.25, r=4)


def test_declarations():
    """Every method's default options leave the budget to keep; each declaration names its option."""
    for name, info in vltok.methods().items():
        assert info.fixed_budget({}) is None, name
    assert vltok.methods()["fourier"].fixed_budget({"r": [10, 10]}).option == "r=[10, 10]"
    fb = vltok.methods()["tokenshuffle"].fixed_budget({"projector": "assets/tokenshuffle-ref-3x2.safetensors"})
    assert fb.keep == pytest.approx(1 / 6) and "3x2 shuffle window" in fb.implied   # (the committed ref projector)
    assert vltok.methods()["tokenshuffle"].fixed_budget({"projector": "no/such/file"}) is None   # factory says why
    assert vltok.methods()["feather"].fixed_budget({"s2": 0.1}) is None   # the solver still meets keep
    assert vltok.methods()["llavamini"].fixed_budget({"mode": "early_fusion", "reduce": "drop"}) is None
    with pytest.raises(InvalidOptionError, match="preset='paper' fixes a=0.3, s2=0.09; drop a="):
        vltok.api.build_method("feather", a=0.2, preset="paper")


def test_committed_reference_projector_without_keep(models):
    """The reviewer's case: the committed trained projector fixes its window; without keep it runs at 1/6."""
    h = vltok.api.build_method("tokenshuffle", projector="assets/tokenshuffle-ref-3x2.safetensors")
    assert h.keep == pytest.approx(1 / 6) and h.params["window"] == (3, 2) and h.keep_set_by.startswith("projector=")
    for keep in (0.25, 0.5, 1.0):
        with pytest.raises(InvalidOptionError, match="conflicts with projector="):
            vltok.api.build_method("tokenshuffle", keep, projector="assets/tokenshuffle-ref-3x2.safetensors")


def test_clis_pass_keep_not_given(tmp_path):
    """Without --keep, the eval and video CLIs pass keep=None (not given): the default, or what an option fixes."""
    from vltok.cli import build_parser
    from vltok.eval import cli as eval_cli, runner

    args = build_parser().parse_args(["eval", str(tmp_path), "--method", "fourier", "--arg", "r=4"])
    assert eval_cli._patch(args) == {"method": "fourier", "keep": None, "r": 4}
    args = build_parser().parse_args(["eval", str(tmp_path), "--method", "fourier", "--keep", "0.25"])
    assert eval_cli._patch(args)["keep"] == 0.25
    # the results table shows the keep it ran at where none was given (* = set by an option)
    assert runner._label({"patch": {"method": "fourier", "keep": None, "r": 4}, "keep": 0.25, "keep_set_by": "r=4"}) \
        == ("fourier (r=4)", "0.25*")
    assert runner._label({"patch": {"method": "pool", "keep": None}, "keep": 0.16}) == ("pool", "0.16")
    assert runner._label({"patch": {"method": "pool", "keep": 0.5}}) == ("pool", "0.5")
    # the table explains the * (both table layouts), and has no legend where no row has one
    score = {"overall": 0.5, "n": 2}
    set_by = {"patch": {"method": "fourier", "keep": None, "r": 4}, "keep": 0.25, "keep_set_by": "r=4", "score": score}
    plain = {"patch": {"method": "pool", "keep": 0.5}, "score": score}
    assert "| fourier (r=4) | 0.25* |" in runner.markdown([set_by])
    assert "`*` keep not passed but set by an option (r=4)" in runner.markdown([plain, set_by])
    typed = {"overall": 0.5, "n": 2, "by_type": {"color": {"acc": 0.5}}, "by_region": {}}
    assert "set by an option (r=4)" in runner.markdown([dict(set_by, score=typed)])
    assert "`*`" not in runner.markdown([plain]) and "`*`" not in runner.markdown([dict(plain, score=typed)])
    args = build_parser().parse_args(["video", "run", str(tmp_path), "--out", str(tmp_path / "o")])
    assert args.keep is None
    from vltok.video.pipeline import job_config, make_sampling

    assert job_config("m", "fourier", None, {"r": 4}, make_sampling(), [], 8, "jsonl", "auto", None)["keep"] is None


def test_runner_patches_without_keep_and_reports_it(tmp_path, monkeypatch):
    """eval/runner.py with {"keep": None}: the model is patched with keep not given and the result says the keep
    (and the option that set it); generation is stubbed (the flow, not a VLM: tests/test_eval_cli.py's way)."""
    from vltok.eval import runner, shapes

    d = shapes.generate(tmp_path / "d", n=2, seed=0)
    seen = []

    def generate(model, processor, texts, visuals, kind="image", **kw):
        seen.append(vltok.get_handle(model))
        return ["red"] * len(texts)

    monkeypatch.setattr(runner, "generate", generate)
    m = tiny_llava()
    res = runner.evaluate(m, None, d, patch={"method": "pool", "keep": None})
    assert seen[-1].keep == 0.16 and res["keep"] == 0.16 and "keep_set_by" not in res
    res = runner.evaluate(m, None, d, patch={"method": "tokenshuffle", "keep": None, "window": 2})
    assert seen[-1].keep_set_by == "window=2" and res["keep"] == 0.25 and res["keep_set_by"] == "window=2"
    with pytest.raises(InvalidOptionError, match="conflicts with window=2"):
        runner.evaluate(m, None, d, patch={"method": "tokenshuffle", "keep": 0.5, "window": 2})
    assert vltok.get_handle(m) is None


def test_train_tokenshuffle_window_and_keep():
    """`vltok train tokenshuffle --window`: the window fixes the budget, a --keep must agree (no silent override)."""
    from vltok.cli import build_parser
    from vltok.train import build_tokenshuffle

    m = tiny_llava()
    with pytest.raises(InvalidOptionError, match=r"keep=0.5 conflicts with window=\(3, 3\)"):
        build_tokenshuffle(m, 0.5, window=(3, 3))
    assert build_tokenshuffle(m, None, window=(3, 3))[0].window == (3, 3)
    assert build_tokenshuffle(m, 0.111, window=(3, 3))[0].window == (3, 3)   # the window keep=0.111 picks
    assert build_tokenshuffle(m, None)[0].window == (2, 2)   # no keep, no window: keep 0.25
    assert build_parser().parse_args(["train", "tokenshuffle", "--out", "x"]).keep is None
