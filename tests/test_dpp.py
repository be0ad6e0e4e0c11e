"""DPP / CDPruner-style selection (vltok/methods/dpp.py) and the ``positions="original"`` option of pre-LLM selection
methods on LLaVA-1.5: hand-computed cases, a brute-force greedy log-det reference of the fast MAP inference, the
adapter's text_embeds side input, and original positions against the full model with the dropped tokens masked."""
import pytest
import torch

import vltok
from vltok.methods.dpp import dpp_greedy, dpp_kernel, relevance
from test_inllm import tiny_llava_deep
from tiny import IMG, llava_inputs

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, -1, 11, 12]]


def test_hand_computed_cases():
    x = torch.tensor([[[1., 0.], [0.6, 0.8], [0., 1.]]])
    assert dpp_greedy(dpp_kernel(x), 1).tolist() == [[0]]          # equal gains: the lower index
    assert dpp_greedy(dpp_kernel(x), 2).tolist() == [[0, 2]]       # after 0: gains 1 - 0.36 and 1 -> token 2
    r = relevance(x, [torch.tensor([[0., 1.]])])                    # cosines 0, 0.8, 1 -> min-max
    torch.testing.assert_close(r, torch.tensor([[1e-6, 0.8 + 1e-6, 1 + 1e-6]]))
    assert dpp_greedy(dpp_kernel(x, r), 1).tolist() == [[2]]        # conditioned on the text: the relevant token
    dup = torch.tensor([[[1., 0.], [1., 0.], [1., 0.], [0., 1.]]])
    assert dpp_greedy(dpp_kernel(dup), 3).tolist() == [[0, 1, 3]]   # duplicates: zero gains, still k distinct


def brute_force(L, k):
    """Greedy MAP by explicit determinants (float64): add the item that maximises det(L_S), ties to the lower
    index."""
    out = []
    for b in range(L.shape[0]):
        Lb, S = L[b].double(), []
        for _ in range(k):
            best, arg = None, None
            for j in range(L.shape[1]):
                if j in S:
                    continue
                idx = torch.tensor(S + [j])
                d = float(torch.linalg.det(Lb[idx][:, idx]))
                if best is None or d > best + 1e-12:
                    best, arg = d, j
            S.append(arg)
        out.append(sorted(S))
    return torch.tensor(out)


@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("conditional", [False, True])
def test_fast_greedy_matches_the_determinant_reference(k, conditional):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 20, 16, generator=g)
    rel = relevance(x, [torch.randn(5, 16, generator=g) for _ in range(3)]) if conditional else None
    L = dpp_kernel(x, rel)
    assert torch.equal(dpp_greedy(L, k), brute_force(L, k))


@pytest.fixture(scope="module")
def model():
    return tiny_llava_deep()


def _spy(handle):
    red, seen = handle.method.pre_llm, []
    orig = red.select

    def select(x, plan, **side):
        seen.append(dict(side, x=x))
        return orig(x, plan, **side)

    red.select = select
    return seen


def test_adapter_gives_the_prompts_text_embeddings_and_the_rule_picks(model):
    inp = llava_inputs(model, PROMPTS)
    ids, am = inp["input_ids"], inp["attention_mask"].bool()
    table = model.get_input_embeddings()
    texts = [table(ids[b][am[b] & (ids[b] != IMG)]).detach() for b in range(2)]
    cap = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: cap.__setitem__("y", o))
    with torch.no_grad():
        model(**inp)
    hook.remove()
    with vltok.patched(model, "dpp", keep=0.25) as h:
        seen = _spy(h)
        with torch.no_grad():
            model(**inp)
        got = [g.kept for g in h.kept_patches()]
    assert len(seen[0]["text_embeds"]) == 2
    for a, b in zip(seen[0]["text_embeds"], texts):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(seen[0]["x"], cap["y"])   # the projector's output
    want = dpp_greedy(dpp_kernel(cap["y"], relevance(cap["y"], texts)), 16)
    assert got == want.tolist()
    with vltok.patched(model, "dpp", keep=0.25, condition="none") as h:
        with torch.no_grad():
            model(**inp)
        assert [g.kept for g in h.kept_patches()] == dpp_greedy(dpp_kernel(cap["y"]), 16).tolist()


def test_keep_one_bit_identical_and_generate(model):
    inp = llava_inputs(model, PROMPTS)
    with torch.no_grad():
        ref = model(**inp).logits
    with vltok.patched(model, "dpp", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**inp).logits, ref)
    with vltok.patched(model, "dpp", keep=0.25) as h:
        gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
        assert h.stats["tokens_out"] == 32
    assert gen.shape == (2, inp["input_ids"].shape[1] + 3)


def test_condition_text_and_original_positions_refused_where_not_supplied():
    from tiny_families import tiny_qwen

    qwen = tiny_qwen("2")
    with pytest.raises(vltok.IncompatibleError, match="text_embeds"):
        vltok.patch(qwen, "dpp", keep=0.25, condition="text")
    for method in ("dpp", "dart", "random"):
        with pytest.raises(vltok.IncompatibleError, match="positions='original'"):
            vltok.patch(qwen, method, keep=0.25, positions="original")
    assert vltok.get_handle(qwen) is None


# -- positions="original" ----------------------------------------------------------------------------------------
def _kept_columns(inp, kept):
    """Per sample (one image each), the caller's columns the reduced call holds: real text columns + the kept
    image columns."""
    ids, am = inp["input_ids"], inp["attention_mask"].bool()
    out = []
    for b in range(ids.shape[0]):
        img = (ids[b] == IMG).nonzero().flatten()
        text = [int(c) for c in (am[b] & (ids[b] != IMG)).nonzero().flatten()]
        out.append(sorted(text + [int(img[i]) for i in kept[b]]))
    return out


def _masked_reference(model, inp, cols, position_ids=None):
    am = torch.zeros_like(inp["attention_mask"])
    for b, c in enumerate(cols):
        am[b, c] = 1
    with torch.no_grad():
        return model(**{**inp, "attention_mask": am}, position_ids=position_ids).logits


@pytest.mark.parametrize("method", ["random", "dpp", "dart"])
def test_original_positions_equal_the_full_model_with_dropped_tokens_masked(model, method):
    inp = llava_inputs(model, PROMPTS, padding="right")
    with vltok.patched(model, method, keep=0.25, positions="original") as h:
        with torch.no_grad():
            got = model(**inp).logits
        kept = [g.kept for g in h.kept_patches()]
    with vltok.patched(model, method, keep=0.25) as h:
        with torch.no_grad():
            contiguous = model(**inp).logits
    cols = _kept_columns(inp, kept)
    ref = _masked_reference(model, inp, cols)
    for b, c in enumerate(cols):
        torch.testing.assert_close(got[b, :len(c)], ref[b, c], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(contiguous[0, :len(cols[0])], ref[0, cols[0]], atol=1e-3)   # the option matters


def test_original_positions_in_generate_continue_after_the_full_prompt(model):
    inp = llava_inputs(model, PROMPTS, padding="left")
    with vltok.patched(model, "random", keep=0.25, positions="original") as h:
        gen = model.generate(**inp, max_new_tokens=4, do_sample=False, suppress_tokens=[IMG])
        kept = [g.kept for g in h.kept_patches()]
    cols = _kept_columns(inp, kept)
    ids, am0 = inp["input_ids"], inp["attention_mask"]
    for _ in range(4):   # greedy with the unpatched model: dropped columns masked, positions as generate() counts
        pos = (am0.cumsum(-1) - 1).masked_fill(am0 == 0, 0)
        logits = _masked_reference(model, {**inp, "input_ids": ids, "attention_mask": am0}, cols, pos)
        nxt = logits[:, -1].index_fill(-1, torch.tensor([IMG]), float("-inf")).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        am0 = torch.cat([am0, torch.ones_like(nxt)], 1)
        cols = [c + [ids.shape[1] - 1] for c in cols]
    assert torch.equal(gen[:, -4:], ids[:, -4:])


def test_optional_text_side_input_is_noted_where_a_family_does_not_give_it():
    from vltok import registry, support

    m = support.default_method("dpp")
    assert m.pre_llm.wants == ("text_embeds",) and m.pre_llm.needs == ()
    classes = registry.adapter_classes()
    assert support.limitations(classes["LlavaForConditionalGeneration"], m) is None
    assert "runs without text_embeds" in support.limitations(classes["Qwen2VLForConditionalGeneration"], m)
    text = support.default_method("dpp", condition="text")   # required: refused where it is not given
    assert "needs text_embeds" in support.incompatibility(classes["Qwen2VLForConditionalGeneration"], text)
