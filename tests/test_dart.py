"""DART (vltok/methods/dart.py): hand-computed cases, a set-based loop reference written out from the authors' rule,
and both variants on tiny LLaVA-1.5 against the rule applied to what the model computes (the projector's output and
the prompt's embeddings; the hidden rows entering layer K)."""
import pytest
import torch
import torch.nn.functional as F

import vltok
from vltok.methods.dart import dart_select, spread, text_pivot_rows
from test_inllm import tiny_llava_deep
from tiny import IMG, llava_inputs

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, -1, 11, 12]]
X = torch.tensor([[[1., 0.], [3., 0.], [0., 1.], [-1., 0.], [1., 1.], [0., -1.]]])


def test_hand_computed_cases():
    # pivot: token 1 (largest L1 norm); least similar to (1, 0): token 3 (cos -1), then 2 and 5 tie at 0 -> 2
    assert dart_select(X, 3, pivots=1).tolist() == [[1, 2, 3]]
    # pivots 1 and 4, one pick each: 3 for pivot 1, then 5 (cos -0.71 to (1, 1)) for pivot 4
    assert dart_select(X, 4, pivots=2).tolist() == [[1, 3, 4, 5]]
    # one image pivot and a text pivot (0, 1): two picks for pivot 1 (3, 2), one for the text row (5)
    assert dart_select(X, 4, pivots=1, extra=torch.tensor([[[0., 1.]]])).tolist() == [[1, 2, 3, 5]]
    assert spread(7, 3) == [3, 2, 2] and spread(0, 2) == [0, 0]


def reference(x, k, pivots, extra=None):
    """The authors' loop with Python sets, one sample at a time (pivots in ascending index, then the text rows;
    per-pivot counts spread to reach exactly k)."""
    out = []
    for b in range(x.shape[0]):
        n = x.shape[1]
        norms = [float(x[b, i].abs().sum()) for i in range(n)]
        piv = sorted(sorted(range(n), key=lambda i: (-norms[i], i))[:min(pivots, k)])
        kept, valid = set(piv), set(range(n)) - set(piv)
        rows = [x[b, i] for i in piv] + ([e for e in extra[b]] if extra is not None else [])
        for row, per in zip(rows, spread(k - len(piv), len(rows))):
            cand = sorted(valid)
            sims = [float(F.cosine_similarity(row.double(), x[b, i].double(), dim=0)) for i in cand]
            pick = [cand[j] for j in sorted(range(len(cand)), key=lambda j: (sims[j], cand[j]))[:per]]
            kept |= set(pick)
            valid -= set(pick)
        out.append(sorted(kept))
    return torch.tensor(out)


@pytest.mark.parametrize("k,pivots,n_text", [(9, 4, 0), (16, 4, 4), (30, 8, 0), (3, 4, 2), (36, 2, 1)])
def test_matches_the_loop_reference(k, pivots, n_text):
    g = torch.Generator().manual_seed(k + pivots)
    x = torch.randn(3, 36, 8, generator=g)
    extra = torch.randn(3, n_text, 8, generator=g) if n_text else None
    assert torch.equal(dart_select(x, k, pivots, extra), reference(x, k, pivots, extra))


@pytest.fixture(scope="module")
def model():
    return tiny_llava_deep()


def _projector_output(model, inp):
    cap = {}
    h = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: cap.__setitem__("y", o))
    try:
        with torch.no_grad():
            out = model(**inp, output_hidden_states=True)
    finally:
        h.remove()
    return cap["y"], out


def test_pre_llm_selects_by_the_rule_on_projected_features_and_prompt_pivots(model):
    inp = llava_inputs(model, PROMPTS)
    y, _ = _projector_output(model, inp)
    ids, am = inp["input_ids"], inp["attention_mask"].bool()
    table = model.get_input_embeddings()
    texts = [table(ids[b][am[b] & (ids[b] != IMG)]).detach() for b in range(2)]
    want = dart_select(y, 16, 4, text_pivot_rows(texts, 4, y.shape[-1]))
    with vltok.patched(model, "dart", keep=0.25) as h:
        with torch.no_grad():
            model(**inp)
        assert [g.kept for g in h.kept_patches()] == want.tolist()
    want0 = dart_select(y, 16, 4)
    with vltok.patched(model, "dart", keep=0.25, text_pivots=0) as h:
        with torch.no_grad():
            model(**inp)
        assert [g.kept for g in h.kept_patches()] == want0.tolist()


def test_in_llm_cut_selects_by_the_rule_on_the_hidden_rows(model):
    inp = llava_inputs(model, PROMPTS)
    _, out = _projector_output(model, inp)
    hid = out.hidden_states[2]                        # entering decoder layer 2 (= layer 1's output)
    ids = inp["input_ids"]
    want = [dart_select(hid[b][ids[b] == IMG][None], 16, 8)[0].tolist() for b in range(2)]
    with vltok.patched(model, "dart_llm", keep=0.25, keep_mode="final") as h:
        with torch.no_grad():
            model(**inp)
        assert [g.cuts[2] for g in h.kept_patches()] == want
        assert h.stats["prune_layers"] == [2]


@pytest.mark.parametrize("method,kw", [("dart", {}), ("dart_llm", dict(keep_mode="final"))])
def test_keep_one_bit_identical_batch_and_generate(model, method, kw):
    inp = llava_inputs(model, PROMPTS, padding="right")
    with torch.no_grad():
        ref = model(**inp).logits
    with vltok.patched(model, method, keep=1.0, **kw):
        with torch.no_grad():
            assert torch.equal(model(**inp).logits, ref)
    alone = llava_inputs(model, PROMPTS[1:])
    with vltok.patched(model, method, keep=0.25, **kw) as h:
        with torch.no_grad():
            both = model(**inp).logits
            cols = getattr(h, "inllm_kept_columns", None)
            one = model(**{**alone, "pixel_values": inp["pixel_values"][1:]}).logits
        gen = model.generate(**llava_inputs(model, PROMPTS), max_new_tokens=3, do_sample=False)
        gen1 = model.generate(**{**alone, "pixel_values": inp["pixel_values"][1:]}, max_new_tokens=3, do_sample=False)
    last = int(inp["attention_mask"][1].sum()) - 1
    if cols is None:   # pre-LLM: right padding, sample 1's columns start at 0
        last_new = one.shape[1] - 1
        torch.testing.assert_close(both[1, last_new], one[0, -1], atol=1e-4, rtol=1e-4)
    else:
        torch.testing.assert_close(both[1, cols[1].tolist().index(last)], one[0, -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(gen[1, -3:], gen1[0, -3:])


def test_in_llm_cut_has_no_host_sync(model):
    from vltok.eval.tools.profile_vltok import count_syncs

    inp = llava_inputs(model, PROMPTS)
    with vltok.patched(model, "dart_llm", keep=0.25, keep_mode="final") as h, torch.no_grad():
        with count_syncs(h) as c:
            model(**inp)
    assert c.where == {"split_runs readback": 1}, c.where
