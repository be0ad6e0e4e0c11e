"""MustDrop stages 2 (prefill dual-attention filtering) and 3 (decode KV eviction) on tiny random LLaVA-1.5 (stage 1
off; stage 1 and the three stages together: test_mustdrop_vision.py)."""
import math
import warnings

import pytest
import torch

import vltok
from test_inllm import (PROMPTS, assert_same_until_eos, batch, masked_reference, reference_greedy,
                        tiny_llava_deep)
from tiny import IMG, llava_inputs
from vltok.methods.mustdrop import (budget_keep, dual_scores, key_set, mustdrop_keep_eq, pruning_layers_for,
                                    reference_keep, solve_mustdrop, stage_counts)

KW = dict(keep=0.5, pruning_layers=(1, 3), stages=("prefill", "decode"))   # criterion after layers 1 and 3 of 6:
#                                                                             cuts before layers 2 and 4


def test_reference_rule_on_a_fixed_attention_tensor():
    rows = torch.tensor([[0.30, 0.001, 0.002, 0.0005, 0.02],
                         [0.20, 0.0008, 0.030, 0.0002, 0.01]])
    share, peak = dual_scores(rows)
    assert torch.allclose(share, rows.sum(0)) and torch.equal(peak, rows.max(0).values)
    # drop iff share < 0.01 * total AND peak < 0.005: tokens 1 and 3
    assert reference_keep(share, peak, 0.01, 0.005, None).tolist() == [0, 2, 4]
    prot = torch.tensor([False, False, False, True, False])
    assert reference_keep(share, peak, 0.01, 0.005, prot).tolist() == [0, 2, 3, 4]   # the key set is never dropped
    # the budget ranking keeps the protected token plus the best by max(share/(g*sum), peak/i)
    assert budget_keep(share, peak, 3, (0.01, 0.005), prot).tolist() == [0, 2, 3]


@pytest.mark.parametrize("keep,mode,key_rate,counts", [
    (1 / 3, "layer_avg", 0.08, [375, 245, 160, 104]), (0.16, "flops", 0.0, [191, 63, 21, 7]),
    (2 / 9, "flops", 0.08, [243, 102, 47, 47]), (0.16, "layer_avg", 0.08, [143, 47, 47, 47]),
])
def test_budget_solver_matches_spec_tables(keep, mode, key_rate, counts):
    """mustdrop.md §6 (LLaVA-1.5-7B, N=576, L=32, layers [2, 6, 10, 14]): counts within one token, keep met."""
    rho, kr = solve_mustdrop(keep, 32, 576, (2, 6, 10, 14), key_rate, mode)
    got = stage_counts(576, rho, 4, math.ceil(kr * 576) if kr else 0)
    assert all(abs(a - b) <= 1 for a, b in zip(got, counts))
    eq = mustdrop_keep_eq(32, (2, 6, 10, 14), got, 576, mode)
    assert keep - 1.5 / 576 <= eq <= keep


def test_key_floor_scales_key_rate_with_a_warning_and_depth_scaling():
    with pytest.warns(UserWarning, match="key_rate scaled"):
        rho, kr = solve_mustdrop(0.16, 32, 576, (2, 6, 10, 14), 0.08, "flops")
    assert math.ceil(kr * 576 - 1e-9) == 42
    assert pruning_layers_for(32) == (2, 6, 10, 14) and pruning_layers_for(40) == (3, 8, 13, 18)
    assert pruning_layers_for(64)[-1] == 28   # never a hard-coded 32
    with pytest.raises(vltok.VltokError, match="floor"):
        solve_mustdrop(0.05, 32, 576, (2, 6, 10, 14), 0.0, "flops")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_keep1_is_bit_identical(attn):
    m = tiny_llava_deep(attn)
    inp = batch(m, "b2-left")
    ref = m(**inp).logits
    gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
    with vltok.patched(m, "mustdrop", keep=1.0):
        assert torch.equal(m(**inp).logits, ref)
        assert torch.equal(m.generate(**inp, max_new_tokens=3, do_sample=False), gen)
    assert torch.equal(m(**inp).logits, ref)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["b1", "b2-left", "b2-right"])
def test_prefill_logits_equal_masked_reference(attn, kind):
    m = tiny_llava_deep(attn)
    inp = batch(m, kind)
    with vltok.patched(m, "mustdrop", **KW) as h:
        out = m(**inp).logits
        cols, final = h.inllm_prefill_columns, h.inllm_kept_columns
        assert h.stats["prune_layers"] == [2, 4]
        n = h.stats["tokens_per_layer"]
        assert n[:2] == [64, 64] and 64 > n[2] > n[4] >= math.ceil(0.08 * 64)
    ref = masked_reference(m, inp, cols)
    real = inp["attention_mask"].gather(1, final).bool()
    got, want = out[real], ref[torch.arange(ref.shape[0])[:, None], final][real]
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["b1", "b2-left"])
def test_decode_stage_evicts_and_generate_equals_reference(attn, kind):
    m = tiny_llava_deep(attn)
    inp = batch(m, kind)
    S = inp["input_ids"].shape[1]
    with vltok.patched(m, "mustdrop", **KW) as h:
        out = m(**inp, use_cache=True)
        lens = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        final_len = h.inllm_kept_columns.shape[1]
        gen = m.generate(**inp, max_new_tokens=5, do_sample=False)
        prefill, decode = h.inllm_prefill_columns, h.inllm_layer_columns
    # stage 3: layer 0 untouched, every layer from the first pruning layer (1) on holds the final survivors
    assert lens == [S] + [final_len] * 5
    assert set(decode) == {1, 2, 3, 4, 5} and all(torch.equal(v, decode[5]) for v in decode.values())
    ref = reference_greedy(m, inp, prefill, 5, decode_columns=decode)
    assert_same_until_eos(gen[:, S:], ref)


def test_without_decode_stage_the_cache_keeps_per_layer_lengths():
    m = tiny_llava_deep()
    inp = batch(m, "b1")
    with vltok.patched(m, "mustdrop", **dict(KW, stages=("prefill",))) as h:
        out = m(**inp, use_cache=True)
        n = h.stats["tokens_per_layer"]
    S, n_text = inp["input_ids"].shape[1], inp["input_ids"].shape[1] - 64
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [n_text + c for c in n]
    assert n[1] == 64 and n[2] < 64


def test_key_set_from_cls_attention_is_never_dropped():
    m = tiny_llava_deep()
    inp = batch(m, "b2-left")
    seen = []
    with vltok.patched(m, "mustdrop", **KW, key_rate=0.25) as h:
        sel = h.method.in_llm.select

        def spy(cut, view, scores):
            seen.append(view.saliency)
            return sel(cut, view, scores)

        h.method.in_llm.select = spy
        m(**inp)
        final = h.inllm_kept_columns
    # saliency = CLS attention of the last CLIP layer, mean over heads (computed here with eager attention)
    tower = m.model.vision_tower
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        att = tower(inp["pixel_values"], output_attentions=True).attentions[-1]
    want = att[:, :, 0, 1:].mean(1)
    assert (seen[0] - want[0]).abs().max() < 1e-5 and (seen[1] - want[1]).abs().max() < 1e-5
    for b in range(2):
        img = (inp["input_ids"][b] == IMG).nonzero().flatten()
        keys = key_set(want[b], 64, 0.25)
        assert keys.numel() == 16 and torch.isin(img[keys], final[b]).all()
        assert 16 <= int(torch.isin(img, final[b]).sum()) < 64


def test_batch_equals_singles_and_reference_mode():
    m = tiny_llava_deep()
    inp = batch(m, "b2-left")
    with vltok.patched(m, "mustdrop", **KW):
        both = m.generate(**inp, max_new_tokens=4, do_sample=False)
        for i, p in enumerate(PROMPTS):
            one = llava_inputs(m, [p])
            one["pixel_values"] = inp["pixel_values"][i:i + 1]
            single = m.generate(**one, max_new_tokens=4, do_sample=False)[0, one["input_ids"].shape[1]:]
            new = both[i, inp["input_ids"].shape[1]:]
            assert torch.equal(new[:single.numel()], single)
    one = batch(m, "b1")
    with vltok.patched(m, "mustdrop", **dict(KW, keep=None), mode="reference", thr=(0.5, 0.05)) as h:
        out = m(**one).logits
        n = h.stats["tokens_per_layer"]
        cols, final = h.inllm_prefill_columns, h.inllm_kept_columns
    assert n[2] <= 64 and out.shape[1] == final.shape[1]
    ref = masked_reference(m, one, cols)
    assert (out[0] - ref[0, final[0]]).abs().max() < 1e-5


def test_bad_options():
    with pytest.raises(ValueError, match="stages"):
        vltok.api.build_method("mustdrop", 0.3, stages=("vision",))
    with pytest.raises(ValueError, match="mode"):
        vltok.api.build_method("mustdrop", 0.3, mode="thresholds")
    m = tiny_llava_deep()
    with pytest.raises(vltok.VltokError, match="pruning layers"):
        vltok.patch(m, "mustdrop", keep=0.3, pruning_layers=(5,))
    assert vltok.get_handle(m) is None
