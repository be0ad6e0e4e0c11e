"""FEATHER's paper stage 1 (preset="paper" / stage1="union"): top-floor(a·N) of all visual tokens united with the
stride grid, a per-image size; ragged batches padded with dead columns and equal to a masked reference."""
import math

import pytest
import torch

import vltok
from test_inllm import IMG, batch, masked_reference, tiny_llava_deep
from vltok.inllm import ImageView
from vltok.methods.feather import FeatherPruner, feather_stage1_union, uniform_grid


def union_reference(s, grid, a, stride):
    """Written out: sort by score (ties to the lower index), take floor(a·N), add the [::stride, ::stride] grid."""
    h, w = grid
    n = h * w
    order = sorted(range(n), key=lambda i: (-s[i].item(), i))[:max(1, math.floor(a * n + 1e-9))]
    grid_ix = [r * w + c for r in range(0, h, stride) for c in range(0, w, stride)]
    return sorted(set(order) | set(grid_ix))


@pytest.mark.parametrize("seed", range(3))
def test_union_equals_written_reference_and_size_varies(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = set()
    for _ in range(4):
        s = torch.rand(576, generator=g)
        s[torch.randint(0, 576, (40,), generator=g)] += 2 * torch.rand(1, generator=g)   # cluster on/off grid
        got = feather_stage1_union(s, torch.arange(576), (24, 24), 576, 0.3, 3)
        assert got.tolist() == union_reference(s, (24, 24), 0.3, 3)
        sizes.add(got.numel())
        assert 172 <= got.numel() <= 172 + 64
    assert len(sizes) > 1   # the paper's set has no fixed size


def test_paper_preset_uses_union_and_count_rule_stays_available():
    p = vltok.registry.get("feather").factory(0.16, preset="paper").in_llm
    cuts = p.plan(32, [(576, (24, 24))])
    s = torch.zeros(1, 576)
    s[0, :200] = torch.linspace(2, 1, 200)           # the top 172 all sit in the first rows
    view = ImageView((24, 24), 576, torch.arange(576))
    got = p.select(cuts[0], view, s)
    assert got.tolist() == union_reference(s[0], (24, 24), 0.3, 3)
    grid = uniform_grid((24, 24), 576, 3)
    on_top = int(torch.isin(grid, torch.arange(172)).sum())
    assert got.numel() == 172 + 64 - on_top
    exact = vltok.registry.get("feather").factory(0.16, preset="paper", stage1="count").in_llm
    assert exact.select(cuts[0], view, s).numel() == 218   # round(a·N + |U| - a·|U|)
    with pytest.raises(vltok.VltokError, match="stage1"):
        vltok.registry.check_options(vltok.registry.get("feather"), dict(stage1="both"))


@pytest.mark.parametrize("kind", ["b2-left", "b2-right"])
def test_union_batch_equals_masked_reference_and_single_runs(kind):
    m = tiny_llava_deep("sdpa")
    inp = batch(m, kind)
    with vltok.patched(m, "feather", preset="paper") as h:
        out = m(**inp).logits
        cols, final, dead = h.inllm_prefill_columns, h.inllm_kept_columns, h.inllm_dead_columns
        k1 = min(cols)
    ref = masked_reference(m, inp, cols, dead=dead)
    last = dead.get(max(cols))
    real = inp["attention_mask"].gather(1, final).bool() & (~last if last is not None else True)
    ref_kept = ref[torch.arange(ref.shape[0])[:, None], final]
    assert (out[real] - ref_kept[real]).abs().max() < 1e-5
    # stage 1 (before layer K1): each sample's live visual columns hold the grid and at least floor(a·N) tokens
    ids = inp["input_ids"]
    n = int((ids[0] == IMG).sum())
    counts = []
    for b in range(ids.shape[0]):
        c = cols[k1][b][~dead[k1][b]] if k1 in dead else cols[k1][b]
        vis = c[ids[b, c] == IMG]
        assert math.floor(0.3 * n) <= vis.numel() <= math.floor(0.3 * n) + uniform_grid((8, 8), 64, 3).numel()
        counts.append(vis.numel())
        # each sample alone keeps the same visual columns (relative to its image start)
        one = {k: v[b:b + 1] for k, v in inp.items()}
        with vltok.patched(m, "feather", preset="paper") as h1:
            m(**one)
            c1 = h1.inllm_prefill_columns[k1][0]
        first = int((ids[b] == IMG).nonzero()[0])
        first1 = int((one["input_ids"][0] == IMG).nonzero()[0])
        v1 = c1[one["input_ids"][0, c1] == IMG]
        assert (vis - first).tolist() == (v1 - first1).tolist()
    assert len(set(counts)) > 1 and k1 in dead   # this batch is ragged at stage 1: dead filler columns pad it
