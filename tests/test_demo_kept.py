"""handle.kept_patches() against known selections, vltok.visualize.draw_kept, and vltok.demo_core without Gradio."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import vltok
from vltok.kept import KeptGrid
from vltok.methods._grid import grid_for_keep
from vltok.methods.baselines import random_indices
from vltok.methods.postmerge import post_merge
from vltok.visualize import SHADE, draw_kept

GRID = (8, 8)   # tiny LLaVA: 64 / 8 = 8 patches per side


@pytest.fixture(scope="module")
def model():
    old = tiny.LLAMA["num_hidden_layers"]
    tiny.LLAMA["num_hidden_layers"] = 8   # room for in-LLM cuts
    try:
        return tiny.tiny_llava(attn="eager")
    finally:
        tiny.LLAMA["num_hidden_layers"] = old


@pytest.fixture(scope="module")
def inputs(model):
    return tiny.llava_inputs(model, [[1, -1, 5, 6], [1, 7, -1, 8, 9, 3]], padding="left")


def run(model, inputs, method, keep, record=True, **kw):
    with torch.no_grad(), vltok.patched(model, method, keep=keep, **kw) as h:
        h.record_kept = record
        out = model(**inputs).logits
        return h.kept_patches(), h, out


def test_random_reports_the_sampled_patches(model, inputs):
    kept, h, _ = run(model, inputs, "random", 0.25, seed=3)
    want = random_indices(64, 16, 3).tolist()
    assert [k.image for k in kept] == [0, 1]
    for k in kept:
        assert k.kind == "select" and k.grid == GRID and k.tokens == 16
        assert k.kept == want and k.kept != list(range(16))   # the sampled patches, not the first 16 columns
        assert [p for p, g in enumerate(k.groups) if g >= 0] == want
        assert [k.groups[p] for p in want] == list(range(16))


def test_pool_reports_its_grid(model, inputs):
    kept, _, _ = run(model, inputs, "pool", 0.25)
    assert all(k.kind == "resample" and k.out_grid == grid_for_keep(8, 8, 0.25) and k.kept == [] for k in kept)
    assert kept[0].tokens == 16


def test_identity_reports_everything(model, inputs):
    kept, _, _ = run(model, inputs, "pool", 1.0)
    assert all(k.kind == "none" and k.kept == list(range(64)) for k in kept)


def _image_columns(ids, b):
    return (ids[b] == tiny.IMG).nonzero().flatten().tolist()


def test_fastv_cut_is_the_kept_columns(model, inputs):
    kept, h, _ = run(model, inputs, "fastv", 0.5, K=2)
    ids = inputs["input_ids"]
    assert h.stats["prune_layers"] == [2]
    for b, k in enumerate(kept):
        cols = _image_columns(ids, b)
        final = [c for c in h.inllm_kept_columns[b].tolist() if c in cols]
        want = [cols.index(c) for c in final]   # raster index = place in the image's placeholder run
        assert k.kind == "in_llm" and k.grid == GRID and k.kept == list(range(64))
        assert list(k.cuts) == [2] and k.cuts[2] == want and k.final == want
        assert len(want) == h.stats["stage_tokens"]["cuts"][2]


def test_feather_cuts_are_nested(model, inputs):
    kept, h, _ = run(model, inputs, "feather", 0.5)
    for k in kept:
        layers = sorted(k.cuts)
        assert len(layers) == 2 and set(k.cuts[layers[1]]) <= set(k.cuts[layers[0]])
        assert len(k.cuts[layers[1]]) < len(k.cuts[layers[0]]) < 64


def _check_groups(k: KeptGrid, n_out: int):
    g = np.asarray(k.groups)
    assert len(g) == 64 and sorted(set(g.tolist())) == list(range(n_out))
    # each output token's first patch is the smallest member of its group (raster order of the output)
    assert k.kept == [int(np.flatnonzero(g == i).min()) for i in range(n_out)]
    assert k.kept == sorted(k.kept)


def test_tome_groups_match_the_merged_sizes(model, inputs):
    kept, h, logits = run(model, inputs, "tome", 0.25)
    _, _, plain = run(model, inputs, "tome", 0.25, record=False)
    assert torch.equal(logits, plain)   # the tracer changes nothing the model computes
    run_state = h.adapter._vision_run
    for b, k in enumerate(kept):
        assert k.kind == "merge" and k.tokens == 16
        _check_groups(k, 16)
        sizes = run_state.size[b, 1:, 0].round().long().tolist()   # the merger's own sizes (CLS first)
        assert np.bincount(np.asarray(k.groups), minlength=16).tolist() == sizes


def test_tome_without_tracking_reports_representatives(model, inputs):
    kept, _, _ = run(model, inputs, "tome", 0.25, record=False)
    assert all(k.kind == "merge" and k.groups is None and len(k.kept) == 16 for k in kept)


def test_post_merge_groups_are_the_means():
    x = torch.randn(2, 36, 5, generator=torch.Generator().manual_seed(0))
    for matcher in ("bipartite", "cgsm"):
        pos, rows, groups = post_merge(x, 9, matcher, groups=True)
        pos0, rows0 = post_merge(x, 9, matcher)
        assert torch.equal(pos, pos0) and torch.equal(rows, rows0)
        for b in range(2):
            for i in range(9):
                members = (groups[b] == i).nonzero().flatten()
                assert int(members.min()) == int(pos[b, i])
                torch.testing.assert_close(rows[b, i], x[b, members].mean(0), rtol=1e-5, atol=1e-5)


def test_tome_post_schedule_groups(model, inputs):
    kept, _, _ = run(model, inputs, "tome", 0.25, schedule="post")
    for k in kept:
        assert k.kind == "merge"
        _check_groups(k, 16)


def test_mustdrop_windows_then_cuts(model, inputs):
    kept, h, _ = run(model, inputs, "mustdrop", 0.5, vision_windows=2, key_rate=0.0)
    for k in kept:
        g = np.asarray(k.groups)
        big = [np.flatnonzero(g == i) for i in set(g.tolist()) if (g == i).sum() > 1]
        assert len(big) == 2
        for members in big:   # a merged group is one aligned 3x3 window
            r, c = members // 8, members % 8
            assert len(members) == 9 and r.min() % 3 == 0 and c.min() % 3 == 0
            assert r.max() - r.min() == 2 and c.max() - c.min() == 2
        assert k.cuts and all(set(v) <= set(k.kept) for v in k.cuts.values())


def test_kept_patches_before_a_call(model):
    with vltok.patched(model, "pool", keep=0.25) as h:
        with pytest.raises(vltok.VltokError, match="no call with images"):
            h.kept_patches()


# -- drawing ---------------------------------------------------------------------------------------------------
def _img():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(60, 255, (64, 64, 3), dtype=np.uint8))


def test_draw_select_shades_dropped_patches():
    img = _img()
    e = KeptGrid(0, (4, 4), "select", [0, 5], tokens=2)
    out = np.asarray(draw_kept(img, e, size=None), dtype=float)
    src = np.asarray(img, dtype=float)
    assert np.array_equal(out[:16, :16], src[:16, :16])          # patch 0 kept
    assert np.array_equal(out[16:32, 16:32], src[16:32, 16:32])  # patch 5 kept
    np.testing.assert_allclose(out[:16, 16:32], np.floor(src[:16, 16:32] * SHADE), atol=1)   # patch 1 dropped


def test_draw_merge_colours_groups_and_resample_draws_grid():
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    groups = [0, 0, 1, 2] + [3] * 12
    out = np.asarray(draw_kept(img, KeptGrid(0, (4, 4), "merge", [0, 2, 3, 4], groups), size=None))
    assert (out[2, 2] == out[2, 18]).all() and not (out[2, 2] == 128).all()   # group 0: one colour
    assert (out[2, 34] == 128).all()                                          # single patch: untouched
    assert (out[40, 40] == out[60, 60]).all() and not (out[40, 40] == out[2, 2]).all()
    grid = np.asarray(draw_kept(img, KeptGrid(0, (4, 4), "resample", [], None, (2, 2)), size=None))
    assert (grid[32, 5] != 128).any() and (grid[5, 32] != 128).any() and (grid[16, 16] == 128).all()


def test_draw_inllm_adds_a_panel_per_cut():
    e = KeptGrid(0, (4, 4), "in_llm", list(range(16)), list(range(16)), cuts={2: [0, 1, 2], 5: [1]}, tokens=16)
    out = draw_kept(_img(), e, size=96, strip=48)
    assert out.size[0] == 96 and out.size[1] > 96
    assert draw_kept(_img(), e.to_dict(), size=96, strip=48).size == out.size   # the dict form draws the same


# -- demo_core helpers -----------------------------------------------------------------------------------------
def test_demo_core_inputs_and_choices(tmp_path):
    from vltok import demo_core as core

    labels = [c.label for c in core.method_choices()]
    for name in vltok.methods():
        assert name in labels
    assert "feather preset=paper" in labels and "tome schedule=post" in labels
    assert core.parse_choice("tome schedule=post").options == {"schedule": "post"}
    plan = core.cell_plan([core.parse_choice(x) for x in ("pool", "feather preset=paper", "fourier r=4")], [0.5, 0.25])
    assert [(c.label, k) for c, k in plan] == [("pool", 0.5), ("pool", 0.25), ("feather preset=paper", None),
                                               ("fourier r=4", None)]   # options that fix the budget: one cell
    assert core.fixed_budget(core.parse_choice("fourier r=x")) is None   # refused option: the cell says why
    assert core.cell_head("feather preset=paper", 0.3512, "preset='paper'") == \
        "**feather preset=paper @ 0.351** (keep set by preset='paper')"
    assert core.parse_choice("fastv K=3").options == {"K": 3}
    with pytest.raises(vltok.UnknownMethodError):
        core.parse_choice("nope")
    with pytest.raises(core.DemoInputError, match="empty"):
        core.check_question("   ")
    with pytest.raises(core.DemoInputError, match="at most"):
        core.check_question("x" * (core.MAX_QUESTION + 1))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(core.DemoInputError, match="could not read"):
        core.load_image(str(bad))
    with pytest.raises(core.DemoInputError):
        core.check_budgets(["0"])
    ex = core.examples()
    assert len(ex) >= 4 and all(Image.open(r["image_path"]).size == (336, 336) for r in ex)
    assert core.is_correct(ex[0]["answer"].upper(), ex[0]) is True and core.is_correct("zzz", ex[0]) is False


def test_committed_results_tables():
    from vltok import demo_core as core

    q = core.quality_results()
    assert round(q["full"], 1) == 88.2 and q["n"] == 756
    assert abs(q["methods"]["fourier"][0.16] - 40.3) < 0.05   # eval/results/quality-h100.md
    head, rows = core.quality_rows(q)
    assert head[0] == "method" and len(rows) == len(q["methods"])
    files = core.speed_files()
    assert "speed-h100.json" in files
    cols, srows, header = core.speed_table("speed-h100.json")
    first = dict(zip(cols, srows[0]))
    assert first["model"] == "llava-1.5-7b" and first["method"] == "none" and first["speedup"] == 1.0
    assert "H100" in header
    with pytest.raises(core.DemoInputError):
        core.speed_table("../README.md")
