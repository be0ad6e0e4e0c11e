"""The support matrix: every registered method on every adapter family's tiny config (parametrised from the
registry and vltok.adapters.SUPPORTED, so new methods and families are picked up). Supported pairs: forward and
generate on a padded batch of 2, keep=1.0 bit-identical, the reported token counts equal what really reaches the
LLM (or the cross-attention memory). Unsupported pairs: vltok.patch raises the matrix's reason, model untouched.
The README table must be the generated one."""
import functools
import pathlib

import pytest
import torch

import vltok
from vltok import support
from vltok.adapters import SUPPORTED
from tiny import IMG, llava_inputs, llava_next_inputs
from tiny_families import (VID, blip_inputs, deep_llava, onevision_inputs, qwen_inputs, tiny_blip, tiny_blip2,
                           tiny_next_video, tiny_onevision, tiny_open_clip, tiny_qwen, tiny_video_llava)


def _first_seen(register, run):
    """``register(record)`` installs a hook that calls ``record(value)`` and returns its handle; run once with it
    and return the first value recorded (the hook is removed in every case)."""
    seen = []
    hk = register(seen.append)
    try:
        run()
    finally:
        hk.remove()
    return seen[0]


def _llm_probe(module_of):
    """Family probe for LLM-splicing families: (text tokens of the batch, real tokens entering the LLM)."""
    def probe(m, inp, run):
        n_llm = _first_seen(lambda rec: module_of(m).register_forward_pre_hook(
            lambda mod, a, kw: rec(int(kw["attention_mask"].sum()) if kw.get("attention_mask") is not None
                                   else kw["inputs_embeds"].shape[0] * kw["inputs_embeds"].shape[1]),
            with_kwargs=True), run)
        ids, am = inp["input_ids"], inp["attention_mask"]
        n_text = int(((ids != IMG) & (ids != VID) & (am == 1)).sum())
        return n_text, n_llm
    return probe


def _memory_probe(module_of):
    """Cross-attention families: (0, memory tokens the text model / Q-Former reads)."""
    def probe(m, inp, run):
        return 0, _first_seen(lambda rec: module_of(m).register_forward_pre_hook(
            lambda mod, a, kw: rec(kw["encoder_hidden_states"].shape[0] * kw["encoder_hidden_states"].shape[1]),
            with_kwargs=True), run)
    return probe


# in-LLM methods keep batches rectangular: both samples carry the same visual grids (prompts differ: padding)
QWEN_PROMPTS, QWEN_IMAGES, QWEN_VIDEOS = [[1, 5, -1, 7, -2], [1, 2, 3, -1, 9, -2, 4]], [(1, 8, 8)] * 2, [(2, 8, 8)] * 2
NEXT_SIZES = [[80, 120], [80, 120]]   # equal sizes: in-LLM methods keep rectangular batches
# class name -> (tiny model, padded batch of 2, generate kwargs, probe); 6-layer LLMs leave room for in-LLM cuts
FAMILIES = {
    "LlavaForConditionalGeneration": (
        lambda: deep_llava("llava"), lambda m: llava_inputs(m, [[1, 5, -1, 7], [1, 2, 3, 4, -1, 9]]), {},
        _llm_probe(lambda m: m.model.language_model)),
    "LlavaNextForConditionalGeneration": (
        lambda: deep_llava("llava_next"), lambda m: llava_next_inputs(m, [[1, -1, 5], [1, 6, 7, -1, 9, 10]], NEXT_SIZES), {},
        _llm_probe(lambda m: m.model.language_model)),
    "Qwen2VLForConditionalGeneration": (
        lambda: tiny_qwen("2", layers=6), lambda m: qwen_inputs(m, QWEN_PROMPTS, QWEN_IMAGES, QWEN_VIDEOS),
        {"pad_token_id": 0}, _llm_probe(lambda m: m.model.language_model)),
    "Qwen2_5_VLForConditionalGeneration": (
        lambda: tiny_qwen("2.5", layers=6), lambda m: qwen_inputs(m, QWEN_PROMPTS, QWEN_IMAGES, QWEN_VIDEOS),
        {"pad_token_id": 0}, _llm_probe(lambda m: m.model.language_model)),
    "LlavaOnevisionForConditionalGeneration": (
        lambda: tiny_onevision(layers=6), lambda m: onevision_inputs(m, [[1, -1, 5, -2], [1, 2, 3, -1, 9, -2, 4]],
                                                                      NEXT_SIZES, frames=2), {},
        _llm_probe(lambda m: m.model.language_model)),
    "LlavaNextVideoForConditionalGeneration": (
        lambda: tiny_next_video(layers=6), lambda m: onevision_inputs(m, [[1, -1, 5, -2], [1, 2, 3, -1, 9, -2, 4]],
                                                                      NEXT_SIZES, frames=2), {},
        _llm_probe(lambda m: m.model.language_model)),
    "VideoLlavaForConditionalGeneration": (
        lambda: tiny_video_llava(layers=6), lambda m: onevision_inputs(m, [[1, -1, 5, -2], [1, 2, 3, -1, 9, -2, 4]],
                                                                       [0, 0], frames=2), {},
        _llm_probe(lambda m: m.model.language_model)),
    "BlipForConditionalGeneration": (
        lambda: tiny_blip("caption"), lambda m: blip_inputs(m, [[1, 5, 6, 7], [1, 8]]), {},
        _memory_probe(lambda m: m.text_decoder)),
    "BlipForQuestionAnswering": (
        lambda: tiny_blip("vqa"), lambda m: dict(blip_inputs(m, [[1, 5, 6, 7], [1, 8]]),
                                                 labels=torch.tensor([[1, 4, 2], [1, 5, 2]])),
        {}, _memory_probe(lambda m: m.text_encoder)),
    "Blip2ForConditionalGeneration": (
        tiny_blip2, lambda m: blip_inputs(m, [[-1, 1, 5, 6, 7], [-1, 1, 8]], padding="left"), {},
        _memory_probe(lambda m: m.qformer)),
}

KNOWN = {}   # (method, class) -> reason: a known bug, kept visible (strict xfail: the mark fails once fixed)


def _tiny_timm_vit():
    timm = pytest.importorskip("timm", reason="timm needs torchvision: run in .venv-vision (see README)")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, depth=4,
                             global_pool="token").eval()


def _encoder_probe(last_block, n_prefix):
    """An image encoder alone: (0, patch tokens leaving its last block; CLS / registers are not counted, as in
    stats). ``last_block(m)`` / ``n_prefix(m)`` locate them."""
    def probe(m, inp, run):
        p = n_prefix(m)
        return 0, _first_seen(lambda rec: last_block(m).register_forward_hook(
            lambda mod, a, out: rec(out.shape[0] * (out.shape[1] - p))), run)
    return probe


# image encoders have no generate(): gen kwargs None
FAMILIES["VisionTransformer"] = (_tiny_timm_vit, lambda m: {"x": torch.randn(2, 3, 64, 64)}, None,
                                 _encoder_probe(lambda m: m.blocks[-1], lambda m: m.num_prefix_tokens))
FAMILIES["CLIP"] = (tiny_open_clip, lambda m: {"image": torch.randn(2, 3, 64, 64)}, None,
                    _encoder_probe(lambda m: m.visual.transformer.resblocks[-1], lambda m: 1))
ROWS = {label: (name, opts) for label, name, opts in support.rows()}   # methods and their registered variants
CASES = [pytest.param(method, cls, marks=pytest.mark.xfail(strict=True, reason=KNOWN[(method, cls)]))
         if (method, cls) in KNOWN else (method, cls) for method in ROWS for cls in SUPPORTED]
IDS = [f"{m.replace(' ', ':')}-{c}" for m in ROWS for c in SUPPORTED]


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):   # open_clip CLIP(image=...): (image features, text features or None, scale)
        return out[0]
    return out.logits if getattr(out, "logits", None) is not None else out.loss


def _gen_inputs(cls, inp):
    return {k: v for k, v in inp.items() if k != "labels"}


@functools.lru_cache(maxsize=None)
def _family(cls):
    """One model, batch and unpatched outputs per family, shared by its methods (every case ends unpatched, and
    checks that the model is exactly restored, so sharing is safe and keeps the matrix fast)."""
    factory, make, gen_kw, probe = FAMILIES[cls]
    m = factory()
    inp = make(m)
    with torch.no_grad():
        ref = _outputs(m(**inp))
        ref_gen = None if gen_kw is None else m.generate(**_gen_inputs(cls, inp), max_new_tokens=3, do_sample=False,
                                                          **gen_kw)
    return m, inp, ref, ref_gen


@pytest.mark.parametrize("method,cls", CASES, ids=IDS)
@torch.no_grad()
def test_method_on_family(method, cls):
    assert cls in FAMILIES, f"no tiny config for {cls} in tests/test_support.py: add one so the matrix covers it"
    _, _, gen_kw, probe = FAMILIES[cls]
    m, inp, ref, ref_gen = _family(cls)
    family = SUPPORTED[cls]
    method, opts = ROWS[method]
    reason = support.incompatibility(family, support.default_method(method, **opts))
    if reason is not None:
        with pytest.raises(vltok.IncompatibleError) as e:
            vltok.patch(m, method, keep=0.5, **opts)
        assert reason in str(e.value), (reason, str(e.value))
        assert vltok.get_handle(m) is None and "forward" not in m.__dict__
        assert torch.equal(_outputs(m(**inp)), ref)
        return
    gi = _gen_inputs(cls, inp)
    with vltok.patched(m, method, keep=1.0, **opts):
        assert torch.equal(_outputs(m(**inp)), ref), "keep=1.0 must be bit-identical"
        if gen_kw is not None:
            assert torch.equal(m.generate(**gi, max_new_tokens=3, do_sample=False, **gen_kw), ref_gen)
    with vltok.patched(m, method, keep=0.5, **opts) as h:
        n_text, n_llm = probe(m, inp, lambda: m(**inp))
        s = h.stats
        assert s["tokens_out"] < s["tokens_in"], s
        assert n_llm == n_text + s["llm_input_tokens"], (n_llm, n_text, s)
        if "in_llm" not in h.method.stages:
            assert s["llm_input_tokens"] == s["tokens_out"] == sum(i["tokens_out"] for i in s["images"])
        if gen_kw is not None:
            out = m.generate(**gi, max_new_tokens=3, do_sample=False, **gen_kw)
            assert out.shape[0] == 2
            if "input_ids" in gi and out.shape[1] > gi["input_ids"].shape[1] and not cls.startswith("Blip"):
                assert torch.equal(out[:, :gi["input_ids"].shape[1]], gi["input_ids"])
    assert torch.equal(_outputs(m(**inp)), ref), "remove() must restore the model exactly"


def test_readme_matrix_is_the_generated_one():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = text.split(support.BEGIN, 1)[1].split(support.END, 1)[0].strip()
    assert block == support.markdown(), "README's support matrix is stale: run `python -m vltok.support --write`"


def test_unsupported_reason_comes_from_the_adapter():
    from vltok.adapters.blip import Blip2Adapter

    r = support.incompatibility(Blip2Adapter, ("in_llm",))
    assert Blip2Adapter.not_applicable["in_llm"] in r and "blip2" in r
    assert support.incompatibility(Blip2Adapter, ("pre_llm",)) is None
