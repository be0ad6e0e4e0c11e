"""FEATHER / FastV as pure tensor functions: budgets (spec tables), stage-1 grid coverage, stage-2 subset, ties."""
import pytest
import torch

import vltok
from vltok.inllm import Cut, ImageView
from vltok.methods.fastv import FastVPruner
from vltok.methods.feather import (FeatherPruner, feather_keep_eq, layer_pairs, solve_feather, stage1_count,
                                   stage2_count, top_by_score, uniform_grid)

LLAVA = ((576, (24, 24)),)


@pytest.mark.parametrize("keep,layers,a,n1,n2", [
    (0.25, (3, 8), 0.45, 293, 58), (0.20, (3, 8), 0.36, 246, 30), (0.16, (3, 8), 0.25, 191, 11),
    (0.11, (2, 6), 0.21, 173, 7),
])
def test_keep_solver_reproduces_spec_table(keep, layers, a, n1, n2):
    """feather.md §6.1 (LLaVA-1.5-7B: N=576, L=32): layer pair, a, stage counts, keep_eq within 0.002."""
    k1, k2, got_a, s2 = solve_feather(keep, 32, LLAVA, None, None, None, 3, "flops")
    assert (k1, k2) == layers and got_a == pytest.approx(a, abs=0.006) and s2 == pytest.approx(got_a ** 2)
    assert stage1_count(576, 64, got_a) == n1 and stage2_count(n1, s2) == n2
    eq, _ = feather_keep_eq(32, k1, k2, LLAVA, got_a, s2, 3)
    assert keep - 0.002 <= eq <= keep


def test_paper_preset_and_layer_pairs():
    eq, _ = feather_keep_eq(32, 8, 16, LLAVA, 0.3, 0.09, 3)
    assert eq == pytest.approx(0.361, abs=1e-3) and stage1_count(576, 64, 0.3) == 218
    assert layer_pairs(32) == [(8, 16), (3, 8), (2, 6)] and layer_pairs(28)[1] == (3, 7)
    cuts = FeatherPruner(0.16, None, None, None, 3, "flops", "paper").plan(32, list(LLAVA))
    assert [c.layer for c in cuts] == [8, 16] and cuts[0].params == (0.3, 0.09) and not cuts[0].rope
    assert FeatherPruner(1.0, None, None, None, 3, "flops", None).plan(32, list(LLAVA)) == []


def test_keep_mode_final():
    k1, k2, a, s2 = solve_feather(0.05, 32, LLAVA, None, None, None, 3, "final")
    _, final = feather_keep_eq(32, k1, k2, LLAVA, a, s2, 3)
    assert 0.045 <= final <= 0.05


@pytest.mark.parametrize("keep,K,n", [(1 / 3, 2, 166), (2 / 9, 2, 98), (0.16, 2, 60), (1 / 9, 2, 30),
                                      (1 / 3, 3, 152), (0.16, 3, 42), (1 / 9, 3, 11)])
def test_fastv_counts_match_spec_table(keep, K, n):
    assert FastVPruner(keep, K, "flops", True).count(576, 32) == n


def test_fastv_plan_uses_rope_and_full_softmax():
    (cut,) = FastVPruner(0.16, 2, "flops", True).plan(32, list(LLAVA))
    assert cut.layer == 2 and cut.rope and cut.softmax == "all" and cut.query == "last"
    with pytest.raises(vltok.VltokError, match="floor"):
        FastVPruner(0.05, 2, "flops", True).plan(32, list(LLAVA))


def test_stage1_contains_the_grid_and_has_the_exact_count():
    torch.manual_seed(0)
    p = FeatherPruner(0.16, None, None, None, 3, "flops", None)
    cuts = p.plan(32, list(LLAVA))
    s = torch.rand(1, 576)
    s[0, :100] += 5      # the top rows score high (the FastV failure mode): the grid still covers the image
    view = ImageView((24, 24), 576, torch.arange(576))
    keep1 = p.select(cuts[0], view, s)
    grid = uniform_grid((24, 24), 576, 3)
    assert grid.numel() == 64 and torch.isin(grid, keep1).all()
    assert keep1.numel() == stage1_count(576, 64, cuts[0].params[0]) == 191
    assert torch.equal(keep1, keep1.unique(sorted=True))
    top = torch.arange(100)[~torch.isin(torch.arange(100), grid)]
    assert torch.isin(top, keep1).all()   # the best non-grid tokens by score come first
    # stage 2 scores only the survivors and keeps the top share, no grid term
    view2 = ImageView((24, 24), 576, keep1)
    s2 = torch.rand(1, keep1.numel())
    keep2 = p.select(cuts[1], view2, s2)
    assert keep2.numel() == 11 and torch.equal(keep2, s2[0].topk(11).indices.sort().values)


def test_ties_break_to_the_lower_index_and_rows_are_averaged():
    s = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert top_by_score(s, 2).tolist() == [1, 2]
    p = FastVPruner(0.5, 1, "final", True)
    cut = Cut(1, rope=True, softmax="all", params=(4,))
    rows = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    assert p.select(cut, ImageView(None, 4, torch.arange(4)), rows).tolist() == [1, 3]


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="keep_mode"):
        vltok.api.build_method("feather", 0.2, keep_mode="bogus")
    with pytest.raises(ValueError, match="layers"):
        vltok.api.build_method("feather", 0.2, layers=(5, 3))
    with pytest.raises(ValueError, match="option"):
        vltok.api.build_method("fastv", 0.2, stride=3)
