"""``resize`` (vltok.resize_processor): the processor asked for a smaller image; token counts from the processor's
own grids against keep x native, stats, refusals, and the reference VLM end to end (a DINOv2 tower)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vltok
from test_reference import needs_ref
from vltok.resize import resize_processor

QWEN_TOKENS = ["<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "hello", "world"]


def qwen_processor():
    """A real Qwen2VLProcessor (image + video processors at their defaults) with a small word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(QWEN_TOKENS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": QWEN_TOKENS[1:5]})
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=fast,
                            video_processor=Qwen2VLVideoProcessor())


def image(h, w, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


IMG_TEXT = "hello <|vision_start|><|image_pad|><|vision_end|> world"
VID_TEXT = "hello <|vision_start|><|video_pad|><|vision_end|> world"


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.16, 0.11])
def test_qwen_images_get_keep_of_the_native_tokens(keep):
    proc = qwen_processor()
    ims = [image(480, 640), image(300, 900, 1)]
    full = proc(images=ims, text=[IMG_TEXT, IMG_TEXT], return_tensors="pt", padding=True)
    rp = resize_processor(proc, keep)
    out = rp(images=ims, text=[IMG_TEXT, IMG_TEXT], return_tensors="pt", padding=True)
    n0 = full["image_grid_thw"].prod(-1) // 4
    n1 = out["image_grid_thw"].prod(-1) // 4
    # the placeholders match the processor's own count for the smaller images
    pad = QWEN_TOKENS.index("<|image_pad|>")
    assert (out["input_ids"] == pad).sum(1).tolist() == n1.tolist()
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())
    # each side scaled by sqrt(keep), rounded to 28 px: within one unit per side of the exact share
    for g0, g1 in zip(full["image_grid_thw"].tolist(), out["image_grid_thw"].tolist()):
        for a, b in zip(g0[1:], g1[1:]):
            assert abs(b / 2 - a / 2 * math.sqrt(keep)) <= 0.5 + 1e-9
    assert [r["tokens_in"] for r in rp.stats["items"]] == n0.tolist()
    assert [r["tokens_out"] for r in rp.stats["items"]] == n1.tolist()
    assert rp.stats["keep_achieved"] == pytest.approx(float(n1.sum() / n0.sum()))
    assert abs(rp.stats["keep_achieved"] - keep) < 0.35 * keep


def test_qwen_video_keep_per_frame():
    proc = qwen_processor()
    frames = [image(240, 320, i) for i in range(4)]
    full = proc(videos=[frames], text=[VID_TEXT], return_tensors="pt")
    rp = resize_processor(proc, 0.25)
    out = rp(videos=[frames], text=[VID_TEXT], return_tensors="pt")
    t0, h0, w0 = full["video_grid_thw"][0].tolist()
    t1, h1, w1 = out["video_grid_thw"][0].tolist()
    assert t1 == t0 and (h1, w1) == (h0 // 2, w0 // 2)   # 0.25 = half of each side, every temporal slice
    pad = QWEN_TOKENS.index("<|video_pad|>")
    assert int((out["input_ids"] == pad).sum()) == t1 * h1 * w1 // 4
    assert rp.stats["keep_achieved"] == pytest.approx(0.25)


def test_keep1_is_the_processor_output_and_attributes_pass_through():
    proc = qwen_processor()
    ims = [image(480, 640)]
    a = proc(images=ims, text=[IMG_TEXT], return_tensors="pt")
    b = resize_processor(proc, 1.0)(images=ims, text=[IMG_TEXT], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resize_processor(proc, 0.5).tokenizer is proc.tokenizer


@pytest.mark.parametrize("keep", [0, 1.5, "0.5", True, None])
def test_bad_keep_is_refused(keep):
    with pytest.raises(vltok.VltokError, match="keep"):
        resize_processor(qwen_processor(), keep)


def test_fixed_position_towers_and_anyres_are_refused():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextImageProcessor
    from tiny import CLIPV, IMG, LLAMA

    class Proc:   # a LLaVA-1.5-style processor: square crop + patch size
        patch_size = 8

        class image_processor:
            crop_size = {"height": 64, "width": 64}

    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=CLIPV, text_config=LLAMA, image_token_index=IMG))
    with pytest.raises(vltok.VltokError, match="fixed position embeddings"):
        resize_processor(Proc(), 0.25, model=m)
    assert resize_processor(Proc(), 0.25).llava_side() == 32   # 64 px x sqrt(0.25), in whole patches

    class Next:
        image_processor = LlavaNextImageProcessor()
    with pytest.raises(vltok.VltokError, match="anyres"):
        resize_processor(Next(), 0.25)


@pytest.fixture(scope="module")
def reference():
    from vltok import reference as R

    return R.load(delta=False)


@needs_ref
def test_reference_vlm_resized_runs_unpatched_on_fewer_tokens(reference):
    """The reference VLM (DINOv2 tower, interpolated positions): 336 px -> 140 px at keep 0.16 (10 x 10 grid)."""
    model, proc = reference
    from vltok.eval.runner import build_prompt

    img = image(336, 336)
    text = build_prompt(proc, "What colour is the circle?")
    rp = resize_processor(proc, 0.16, model=model)
    out = rp(images=[img], text=[text], return_tensors="pt")
    n = int((out["input_ids"] == model.config.image_token_id).sum())
    assert rp.stats["grid_out"] == (10, 10) and n == 100   # 'default' strategy: CLS not counted
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape[1] == out["input_ids"].shape[1] and torch.isfinite(logits).all()


@needs_ref
def test_runner_scores_resize_with_the_model_unpatched(reference, tmp_path):
    """The eval runner takes {"method": "resize"}: it wraps the processor, the model is never patched, and the
    result reports the achieved keep (336 px -> 168 px at keep 0.25: 12 x 12 of 24 x 24)."""
    from vltok.eval import runner, shapes

    model, proc = reference
    shapes.generate(tmp_path / "d", n=9, seed=0)
    res = runner.evaluate(model, proc, tmp_path / "d", patch={"method": "resize", "keep": 0.25}, batch_size=9,
                          max_new_tokens=4, progress=False)
    assert res["n"] == 9 and res["stats"]["keep_achieved"] == pytest.approx(0.25)
    assert res["stats"]["grid_out"] == (12, 12) and vltok.get_handle(model) is None
    with pytest.raises(ValueError, match="no options"):
        runner.evaluate(model, proc, tmp_path / "d", patch={"method": "resize", "keep": 0.25, "x": 1}, progress=False)
