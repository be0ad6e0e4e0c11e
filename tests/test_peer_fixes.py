"""Fixes found by running transformers' own model tests on patched models (../shared/peer, docs/peer-suite.md):
inputs_embeds with pixels, torch.compile, Qwen inputs without mm_token_type_ids, get_*_features' return type,
the model's placeholder-mismatch phrase."""
import pytest
import torch
from transformers.utils import ModelOutput

import vltok
from tiny import llava_inputs, tiny_llava
from tiny_families import deep_llava, qwen_inputs, tiny_qwen

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, 11, 12, 13, 14, -1, 15, 16, 17, 18]]
QPROMPTS = [[1, 5, -1, 7, 8], [1, -2, 9, -1, 3, 4, 5, 6]]
QIMAGES, QVIDEOS = [(1, 8, 8), (1, 4, 8)], [(2, 8, 8)]
GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


def embeds(m, inp):
    out = {k: v for k, v in inp.items() if k != "input_ids"}
    with torch.no_grad():
        out["inputs_embeds"] = m.get_input_embeddings()(inp["input_ids"])
    return out


# -- inputs_embeds with pixel values ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 2])
def test_inputs_embeds_keep1_equals_unpatched(num_beams):
    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    emb = embeds(m, inp)
    with torch.no_grad():
        ref = m(**emb).logits
    ref_gen = m.generate(**emb, num_beams=num_beams, **GEN)
    ref_both = m.generate(**inp, inputs_embeds=emb["inputs_embeds"], num_beams=num_beams, **GEN)
    with vltok.patched(m, "pool", keep=1.0):
        with torch.no_grad():
            assert torch.equal(m(**emb).logits, ref)
        assert torch.equal(m.generate(**emb, num_beams=num_beams, **GEN), ref_gen)
        assert torch.equal(m.generate(**inp, inputs_embeds=emb["inputs_embeds"], num_beams=num_beams, **GEN),
                           ref_both)


def test_inputs_embeds_static_cache_keep1_equals_unpatched():
    m = tiny_llava()
    emb = embeds(m, llava_inputs(m, PROMPTS))
    ref = m.generate(**emb, cache_implementation="static", **GEN)
    with vltok.patched(m, "pool", keep=1.0):
        assert torch.equal(m.generate(**emb, cache_implementation="static", **GEN), ref)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("method,kw", [("pool", {}), ("random", {})])
def test_inputs_embeds_reduced_like_input_ids(padding, method, kw):
    """keep < 1: the placeholder rows found by embedding equality are shrunk as the input_ids runs are: the same
    logits on the kept columns and the same generated tokens as the patched model on input_ids."""
    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS, padding=padding)
    emb = embeds(m, inp)
    with vltok.patched(m, method, keep=0.25, **kw) as h:
        with torch.no_grad():
            ref = m(**inp).logits
            n_ids = h.stats["seq_len_out"]
            got = m(**emb).logits
        assert h.stats["seq_len_out"] == n_ids < inp["input_ids"].shape[1]
        assert torch.allclose(got, ref, atol=1e-5)
        ref_gen = m.generate(**llava_inputs(m, PROMPTS, padding="left"), **GEN)
        got_gen = m.generate(**embeds(m, llava_inputs(m, PROMPTS, padding="left")), **GEN)
        assert got_gen.shape[1] == 4   # from inputs_embeds only: the new tokens only
        assert torch.equal(got_gen, ref_gen[:, -4:])


def test_inputs_embeds_reduced_qwen_images_and_videos():
    m = tiny_qwen("2")
    inp = qwen_inputs(m, QPROMPTS, QIMAGES, QVIDEOS)
    with vltok.patched(m, "pool", keep=0.3) as h:
        with torch.no_grad():
            m(**inp)
            n_ids = h.stats["seq_len_out"]
            out = m(**embeds(m, inp))
        assert out.logits.shape[1] == n_ids == h.stats["seq_len_out"] < inp["input_ids"].shape[1]


def test_inputs_embeds_inllm_equals_input_ids():
    m = deep_llava("llava", layers=4)
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "fastv", keep=0.5, K=1) as h:
        with torch.no_grad():
            ref = m(**inp).logits
            per_layer = h.stats["tokens_per_layer"]
            h.stats = {}
            got = m(**embeds(m, inp)).logits
        assert h.stats["tokens_per_layer"] == per_layer and per_layer[-1] < per_layer[0]
        assert torch.allclose(got, ref, atol=1e-5)


def test_inputs_embeds_keep1_with_inllm_stage_equals_unpatched():
    """pre-LLM + in-LLM method at keep=1.0 from inputs_embeds: nothing to shrink, the in-LLM layout still found."""
    m = deep_llava("llava", layers=4)
    emb = embeds(m, llava_inputs(m, PROMPTS))
    with torch.no_grad():
        ref = m(**emb).logits
        with vltok.patched(m, "fastv", keep=1.0, K=1):
            assert torch.equal(m(**emb).logits, ref)


def test_inputs_embeds_without_placeholders_is_the_models_error():
    m = tiny_llava()
    emb = embeds(m, llava_inputs(m, PROMPTS))
    emb["inputs_embeds"] = torch.randn_like(emb["inputs_embeds"])
    with vltok.patched(m, "pool", keep=0.25):
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            m(**emb)


# -- torch.compile ---------------------------------------------------------------------------------------------
def test_compiled_decode_forward_fullgraph():
    """generate()'s compiled decode steps (static cache) trace the patched forward without graph breaks."""
    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    ref = m.generate(**inp, **GEN)
    torch.compiler.reset()
    with vltok.patched(m, "pool", keep=0.25):
        red = m.generate(**inp, **GEN)
        step = dict(input_ids=red[:, -1:], attention_mask=torch.ones_like(red))
        with torch.no_grad():
            eager = m(**step).logits
            compiled = torch.compile(m, fullgraph=True, backend="eager")(**step).logits
        assert torch.equal(compiled, eager)
    assert ref.shape == red.shape


def test_compiled_call_that_must_rewrite():
    """keep < 1 with images: a graph break (eager rewrite) without fullgraph; fullgraph names the reason."""
    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "pool", keep=0.25):
        with torch.no_grad():
            ref = m(**inp).logits
            torch.compiler.reset()
            assert torch.equal(torch.compile(m, backend="eager")(**inp).logits, ref)
            torch.compiler.reset()
            with pytest.raises(Exception, match="vltok shrinks the image placeholder runs"):
                torch.compile(m, fullgraph=True, backend="eager")(**inp)


# -- Qwen without mm_token_type_ids ----------------------------------------------------------------------------
def _own_positions(m, inp):
    with torch.no_grad():
        return m.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp.get("image_grid_thw"),
                                      inp.get("video_grid_thw"), attention_mask=inp["attention_mask"])[0]


@pytest.mark.parametrize("method,keep", [("pool", 1.0), ("random", 0.5), ("pool", 0.5)])
def test_qwen_without_mm_token_type_ids_where_the_model_runs(method, keep):
    """With position_ids the model runs without mm_token_type_ids; so does the patched model (the same result as
    with them); without position_ids both raise the model's own error."""
    m = tiny_qwen("2")
    inp = qwen_inputs(m, QPROMPTS, QIMAGES, QVIDEOS)
    inp["position_ids"] = _own_positions(m, inp)
    bare = {k: v for k, v in inp.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        unpatched = m(**bare).logits
        with vltok.patched(m, method, keep=keep):
            ref = m(**inp).logits
            got = m(**bare).logits
            assert torch.equal(got, ref)
            if keep == 1.0:
                assert torch.equal(got, unpatched)
            bare.pop("position_ids")
            with pytest.raises(ValueError, match="mm_token_type_ids"):
                m(**bare)


# -- get_image_features / get_video_features return what the original returns ----------------------------------
@pytest.mark.parametrize("return_dict", [True, False, None])
def test_qwen_features_return_type(return_dict):
    m = tiny_qwen("2")
    inp = qwen_inputs(m, QPROMPTS, QIMAGES, QVIDEOS)
    if return_dict is None:
        m.config.return_dict = False
    kw = {} if return_dict is None else {"return_dict": return_dict}
    with torch.no_grad():
        ref_i = m.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"], **kw)
        ref_v = m.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"], **kw)
        with vltok.patched(m, "pool", keep=1.0):
            got_i = m.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"], **kw)
            got_v = m.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"], **kw)
    for got, ref in ((got_i, ref_i), (got_v, ref_v)):
        assert type(got) is type(ref) and isinstance(got, ModelOutput) == bool(return_dict)
        got, ref = (got.to_tuple(), ref.to_tuple()) if return_dict else (got, ref)
        assert len(got) == len(ref)
        for a, b in zip(got, ref):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            else:   # pooler_output: one tensor per image / video
                assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# -- the model's mismatch phrase -------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_placeholder_mismatch_keeps_the_models_phrase(keep):
    m = tiny_llava()
    inp = llava_inputs(m, PROMPTS)
    inp["pixel_values"] = inp["pixel_values"][:1]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        m(**inp)
    with vltok.patched(m, "pool", keep=keep):
        with pytest.raises(vltok.VltokError, match="Image features and image tokens do not match"):
            m(**inp)


def test_placeholder_mismatch_names_videos():
    m = tiny_qwen("2")
    inp = qwen_inputs(m, QPROMPTS, QIMAGES, QVIDEOS)
    inp["video_grid_thw"] = torch.tensor([(2, 8, 4)])
    inp["pixel_values_videos"] = inp["pixel_values_videos"][:64]
    with vltok.patched(m, "pool", keep=0.5):
        with pytest.raises(vltok.VltokError, match="Video features and video tokens do not match"):
            m(**inp)
