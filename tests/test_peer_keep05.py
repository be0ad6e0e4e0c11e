"""Fixes found by running transformers' own model tests at keep < 1 (``fourier`` / ``fastv`` keep=0.5, the peer
suite: docs/peer-suite.md). Each test failed before its fix."""
import numpy as np
import pytest
import torch

import vltok
from tiny import IMG, llava_next_inputs, tiny_llava_next
from vltok.rewrite import shrink_runs


# -- placeholders under a zero attention mask ------------------------------------------------------------------
# transformers' test models draw the attention mask at random, so it can be 0 over image placeholders. The model
# splices a feature into every placeholder whatever the mask says; vltok trimmed masked columns at the padded end
# as padding, placeholders included, and the model then had more features than placeholders ("Image features and
# image tokens do not match, tokens: 6, features: 9" in LLaVA-NeXT's test_attention_outputs and 39 more).
@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_placeholders_are_not_trimmed_as_padding(side):
    ph = [IMG] * 4
    if side == "right":
        ids = torch.tensor([ph + [5, 6, 0, 0], ph + [7, 8, 9, 10]])
        am = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0], [1] * 8])
        # row 0: the first 2 placeholders (masked or not) stay; the masked text after them is the padded end
        want = [[0, 1, -1, -1, -1, -1], [0, 1, 4, 5, 6, 7]]
    else:
        ids = torch.tensor([[0, 0, 5] + ph + [6], [3, 4, 5] + ph + [6]])
        am = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1], [1] * 8])
        # row 0: left padding ends at its first placeholder (the masked text before it is padding)
        want = [[-1, -1, -1, 3, 4, 7], [0, 1, 2, 3, 4, 7]]
    rw = shrink_runs(ids, [(IMG, [4, 4], [2, 2])], {"attention_mask": am}, pad_id=0, side=side)
    kept = rw.kept_positions.tolist()
    out_ids = rw.tensors["input_ids"]
    assert (out_ids == IMG).sum().item() == 4                                  # 2 per image, as the features
    assert ((out_ids == IMG).sum(1) == 2).all()
    assert kept == want
    # every kept column carries its own mask value: masked placeholders stay masked, added pads are 0
    am_new = rw.tensors["attention_mask"].numpy()
    src = np.asarray(kept)
    ref = np.where(src >= 0, np.take_along_axis(am.numpy(), np.maximum(src, 0), 1), 0)
    assert (am_new == ref).all()


def test_llava_next_with_masked_placeholders_runs_reduced():
    """The model-level case: LLaVA-NeXT (whose packed runs the peer suite masks) at keep=0.5 runs where the
    unpatched model runs, with the reduced placeholder count, and leaves it unchanged at keep=1.0."""
    m = tiny_llava_next()
    inp = llava_next_inputs(m, [[1, -1, 5, 6], [1, -1, 7, 8]], [(64, 64), (64, 64)], padding="right")
    am = inp["attention_mask"].clone()
    am[0, 2:] = 0   # only BOS and the first placeholder of sample 0 attended (as the peer suite's random masks)
    inp["attention_mask"] = am
    with torch.no_grad():
        ref = m(**inp).logits
        with vltok.patched(m, "pool", keep=1.0):
            assert torch.equal(m(**inp).logits, ref)
        with vltok.patched(m, "fourier", keep=0.5) as h:
            out = m(**inp).logits
            st = h.stats
    assert st["tokens_out"] < st["tokens_in"]
    assert out.shape[0] == 2 and out.shape[1] < ref.shape[1]
    assert torch.isfinite(out[1]).all()


# -- continuing generate() from the cache it returned (test_generate_continue_from_past_key_values) -------------
# The returned cache holds the shortened prompt, the returned sequences the caller's: continuing with both fed
# transformers a sequence longer than the cache, which re-read the tail of the prompt (a silently wrong cache).
PROMPTS = [[1, 5, -1, 7, 8, 9], [1, 11, 12, 13, 14, -1, 15, 16, 17, 18]]
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=-1, return_dict_in_generate=True, output_scores=True)


def _continue(m, inp, out, n):
    am = inp["attention_mask"]
    am = torch.cat([am, am.new_ones(am.shape[0], out.sequences.shape[1] - am.shape[1])], 1)
    return m.generate(input_ids=out.sequences, attention_mask=am, past_key_values=out.past_key_values,
                      max_new_tokens=n, **GEN)


@pytest.mark.parametrize("method", ["fourier", "pool"])
def test_generate_continues_from_its_own_cache(method):
    from tiny import llava_inputs, tiny_llava

    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, method, keep=0.25):
        full = m.generate(**inp, max_new_tokens=5, **GEN)
        first = m.generate(**inp, max_new_tokens=3, **GEN)
        short_len = first.past_key_values.get_seq_length()
        assert short_len < first.sequences.shape[1] - 1   # the cache holds the shortened prompt
        second = _continue(m, inp, first, 2)
        assert second.past_key_values.get_seq_length() == full.past_key_values.get_seq_length()
        for la, lb in zip(full.past_key_values.layers, second.past_key_values.layers):
            torch.testing.assert_close(la.keys, lb.keys, rtol=1e-5, atol=1e-5)
        n = second.sequences.shape[1]
        third = _continue(m, inp, second, 1)   # a second continuation (the cache is remembered again)
        with pytest.raises(vltok.VltokError, match="filled by a vltok-patched generate"):
            m.generate(input_ids=first.sequences[:, 1:], past_key_values=second.past_key_values, max_new_tokens=1,
                       **GEN)
    assert torch.equal(second.sequences, full.sequences)   # the caller's prompt in front, the same tokens
    for a, b in zip(full.scores, first.scores + second.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert third.sequences.shape[1] == n + 1 and torch.equal(third.sequences[:, :n], full.sequences)


# -- static cache at keep < 1 (test_generate_with_static_cache / ..._from_inputs_embeds_with_static_cache) -------
# Those tests stop at their first check, the cache length (by design: the shortened prompt), before comparing the
# static-cache tokens with the dynamic-cache ones; this checks the comparison they would make, and the length.
@pytest.mark.parametrize("embeds", [False, True])
def test_static_cache_matches_dynamic_at_keep05(embeds):
    from tiny import llava_inputs, tiny_llava

    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    if embeds:
        with torch.no_grad():
            inp["inputs_embeds"] = m.get_input_embeddings()(inp.pop("input_ids"))
    n_new = 6
    with vltok.patched(m, "fourier", keep=0.5) as h:
        dyn = m.generate(**inp, max_new_tokens=n_new, **GEN)
        sta = m.generate(**inp, max_new_tokens=n_new, cache_implementation="static", **GEN)
        short = h.stats["seq_len_out"]
    assert short < h.stats["seq_len_in"]
    assert torch.equal(sta.sequences, dyn.sequences)
    for a, b in zip(dyn.scores, sta.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the static cache is sized for the shortened prompt + the new tokens (the peer test expects the caller's length)
    assert sta.past_key_values.layers[0].keys.shape[2] == short + n_new - 1


# -- the model's mismatch phrase under an in-LLM method (test_mismatching_num_image_tokens under fastv) ---------
def test_inllm_placeholder_mismatch_keeps_the_models_phrase():
    from tiny import llava_inputs, tiny_llava

    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    inp["pixel_values"] = inp["pixel_values"][-1:]   # one image fewer than placeholder runs
    with vltok.patched(m, "fastv", keep=0.5, K=1, keep_mode="final"):
        with pytest.raises(ValueError, match="^Image features and image tokens do not match") as e:
            m(**inp)
    assert isinstance(e.value, vltok.VltokError)


# -- the expected-failures list (tools/peer) ---------------------------------------------------------------------
def test_expected_failures_need_test_config_family_and_message_to_match():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "peer"))
    import summary

    exp = summary.load_expected()
    shape = "AssertionError: Lists differ: [4, 16, 16] != [4, 23, 23]"
    assert summary.classify(exp, "fourier05", "llava", "test_attention_outputs", shape) == "shorter-sequence"
    assert summary.classify(exp, "pool1", "llava", "test_attention_outputs", shape) is None   # keep=1.0: none
    crash = "ValueError: Image features and image tokens do not match, tokens: 6, features: 9"
    assert summary.classify(exp, "fourier05", "llava_next", "test_attention_outputs", crash) is None
    layers = ("AssertionError: Lists differ: [torch.Size([2, 4, 23, 23]), torch.Size([2, 4, 15, 15])] != "
              "[(2, 4, 23, 23), (2, 4, 23, 23)]")
    assert summary.classify(exp, "fastv05", "llava", "test_greedy_generate_dict_outputs", layers) == \
        "in-llm-per-layer-lengths"
    refused = "vltok.errors.IncompatibleError: fastv prunes tokens inside the LLM, so the logits cover fewer " \
              "positions than the labels; loss / training is not supported"
    assert summary.classify(exp, "fastv05", "llava", "test_training", refused) == "in-llm-labels-refused"
    assert summary.classify(exp, "fourier05", "llava", "test_training", refused) is None
    assert summary.classify(exp, "pool1", "llava_onevision", "test_get_video_features_output_0", "TypeError: x") \
        == "baseline"
    assert summary.classify(exp, "pool1", "llava", "test_get_video_features_output_0", "TypeError: x") is None
