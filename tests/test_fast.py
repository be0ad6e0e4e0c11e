"""The prefill fast path computes the same first-token logits as the patched model's forward."""
import pytest
import torch

import vltok
from tiny import llava_inputs, tiny_llava, tiny_llava_next
from vltok.fast import PrefillGraph


@pytest.mark.parametrize("method,keep", [(None, None), ("fourier", 0.16), ("pool", 0.25), ("random", 0.5)])
def test_fast_path_matches_forward(method, keep):
    m = tiny_llava()
    inp = llava_inputs(m, [[1, 5, -1, 7, 8]])
    fast = PrefillGraph(m)
    if method is None:
        ref = m(**inp).logits[:, -1]
        out = fast(**inp)
    else:
        with vltok.patched(m, method, keep=keep) as h:
            ref = m(**inp).logits[:, -1]
            out = fast(**inp)
            assert h.stats["tokens_out"] == round(64 * keep) if method == "random" else True
    assert torch.allclose(out, ref, atol=1e-5)


def test_fast_path_refuses_batches_and_other_families():
    m = tiny_llava()
    with pytest.raises(vltok.IncompatibleError, match="batch 1"):
        PrefillGraph(m)(**llava_inputs(m, [[1, -1], [1, 2, 3, -1]]))
    with pytest.raises(vltok.IncompatibleError, match="LlavaForConditionalGeneration"):
        PrefillGraph(tiny_llava_next())


@pytest.mark.gpu
def test_graph_replay_matches_eager_on_gpu():
    m = tiny_llava().cuda()
    inp = {k: v.cuda() for k, v in llava_inputs(m, [[1, 5, -1, 7, 8]]).items()}
    with vltok.patched(m, "fourier", keep=0.25):
        ref = m(**inp).logits[:, -1]
        fast = PrefillGraph(m)
        a = fast(**inp)
        inp2 = dict(inp, pixel_values=torch.randn_like(inp["pixel_values"]))
        b = fast(**inp2)          # replay with new pixels
        ref2 = m(**inp2).logits[:, -1]
    assert torch.allclose(a, ref, atol=1e-4) and torch.allclose(b, ref2, atol=1e-4)


def test_graphs_need_a_gpu_model():
    with pytest.raises(vltok.IncompatibleError, match="CUDA device"):
        PrefillGraph(tiny_llava(), graphs=True)


def test_fast_path_checks_the_placeholder_run_and_padding():
    m = tiny_llava()
    inp = llava_inputs(m, [[1, 5, -1, 7, 8]])
    fast = PrefillGraph(m, graphs=False)
    ids = inp["input_ids"].clone()
    img = m.config.image_token_id
    first = int((ids[0] == img).nonzero()[0])
    split = torch.cat([ids[:, :first + 3], torch.tensor([[5]]), ids[:, first + 3:]], 1)   # a text token inside the run
    with pytest.raises(vltok.IncompatibleError, match="contiguous run"):
        fast(input_ids=split, pixel_values=inp["pixel_values"])
    with pytest.raises(vltok.IncompatibleError, match="contiguous run"):
        fast(input_ids=ids[:, :-1].masked_fill(ids[:, :-1] == img, 5), pixel_values=inp["pixel_values"])
    am = torch.ones_like(ids)
    am[0, 0] = 0
    with pytest.raises(vltok.IncompatibleError, match="padding"):
        fast(input_ids=ids, pixel_values=inp["pixel_values"], attention_mask=am)


@pytest.mark.parametrize("method,keep", [(None, None), ("pool", 0.25), ("tome", 0.5)])
def test_fast_path_rewrites_the_run_wherever_it_sits(method, keep):
    """The device-side rewrite: the run at another column and a longer prompt give the patched forward's logits."""
    m = tiny_llava()
    inp = llava_inputs(m, [[1, 5, 6, 9, 9, 9, -1, 7, 8, 4, 4]])
    fast = PrefillGraph(m, graphs=False)
    with vltok.patched(m, method or "pool", keep=keep or 1.0) as h:
        ref = m(**inp).logits[:, -1]
        out = fast(**inp)
        assert h.stats["seq_len_in"] == inp["input_ids"].shape[1]
    assert torch.allclose(out, ref, atol=1e-5)


def _deep_llava(layers=6):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tiny import CLIPV, IMG, LLAMA

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPV, text_config=dict(LLAMA, num_hidden_layers=layers), image_token_index=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=64)
    return LlavaForConditionalGeneration(cfg).eval()


IN_LLM = [("fastv", dict(K=2, keep=0.5)), ("feather", dict(keep=0.5, layers=(2, 4))), ("feather", dict(keep=0.3))]


@pytest.mark.parametrize("method,kw", IN_LLM)
def test_fast_path_runs_in_llm_methods(method, kw):
    """FastV / FEATHER inside the fast path: the same logits and kept columns as the patched forward."""
    m = _deep_llava()
    inp = llava_inputs(m, [[1, 5, 6, -1, 7, 8, 4]])
    fast = PrefillGraph(m, graphs=False)
    with vltok.patched(m, method, **kw) as h:
        ref = m(**inp).logits[:, -1]
        cols, per_layer = h.inllm_kept_columns.clone(), list(h.stats["tokens_per_layer"])
        out = fast(**inp)
        assert torch.equal(h.inllm_kept_columns, cols) and h.stats["tokens_per_layer"] == per_layer
        assert per_layer[-1] < per_layer[0]
    assert torch.allclose(out, ref, atol=1e-5)


def test_fast_path_refuses_combined_stage_methods():
    m = _deep_llava()
    inp = llava_inputs(m, [[1, 5, -1, 7]])
    with vltok.patched(m, "mustdrop", keep=0.5):
        with pytest.raises(vltok.IncompatibleError, match="combines stages"):
            PrefillGraph(m, graphs=False)(**inp)


@pytest.mark.gpu
@pytest.mark.parametrize("method,kw", IN_LLM[:2])
def test_graph_replay_of_in_llm_methods_matches_eager_on_gpu(method, kw):
    m = _deep_llava().cuda()
    inp = {k: v.cuda() for k, v in llava_inputs(m, [[1, 5, -1, 7, 8]]).items()}
    with vltok.patched(m, method, **kw) as h:
        fast = PrefillGraph(m)
        for pv in (inp["pixel_values"], torch.randn_like(inp["pixel_values"])):   # capture, then a replay
            cur = dict(inp, pixel_values=pv)
            ref = m(**cur).logits[:, -1]
            cols = h.inllm_kept_columns.clone()
            out = fast(**cur)
            assert torch.allclose(out, ref, atol=1e-4) and torch.equal(h.inllm_kept_columns, cols)
