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
