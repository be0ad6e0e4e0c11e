"""The stage protocol (vltok.stages) and the extension path of docs/extending.md: the templates
(vltok/methods/_example.py, adapters/_example.py) and two additions written by copying them -- a VisionZip-like
method that needs the CLS attention (tests/ext_visionzip.py) and a Gemma 3 adapter (tests/ext_gemma3.py) --, each
checked against an explicit reference, and the files it took to add them counted."""
import ast
import importlib
import pathlib

import pytest
import torch

import vltok
from tiny import IMG, llava_inputs, tiny_llava
from vltok import registry, support
from vltok.stages import GridPlan, GridReducer, Method, check_stage, selection_plan

TESTS = pathlib.Path(__file__).parent


@pytest.fixture
def fresh(monkeypatch):
    """Import a module (method / adapter registration), undoing its registrations afterwards."""
    from vltok.adapters import SUPPORTED

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr("vltok.adapters.SUPPORTED", dict(SUPPORTED))
    import vltok.adapters as ad

    def load(name):
        mod = importlib.import_module(name)
        return importlib.reload(mod)   # (registers again into the patched tables)

    yield load
    ad.SUPPORTED = SUPPORTED


# -- the protocol is checked when a method is built ----------------------------------------------------------------
class _Both(GridReducer):
    def plan(self, h, w):
        return selection_plan(h, w, 0.5)

    def reduce(self, x, plan):
        return x

    def select(self, x, plan):
        return None


class _Plain:   # not a GridReducer
    def plan(self, h, w):
        return GridPlan(h, w, h * w, (h, w))

    def reduce(self, x, plan):
        return x


class _Neither(GridReducer):
    def plan(self, h, w):
        return GridPlan(h, w, h * w, (h, w))


def test_stage_objects_are_checked_at_build_time(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    for obj, msg in [(_Both(), "exactly one of reduce.*it has reduce, select"), (_Neither(), "it has neither"),
                     (_Plain(), "must subclass vltok.stages.GridReducer")]:
        registry.register("bad", "x", ("pre_llm",))(lambda keep, _o=obj: Method("bad", keep, {}, pre_llm=_o))
        with pytest.raises(TypeError, match=msg):
            vltok.patch(tiny_llava(), "bad", keep=0.5)
    with pytest.raises(TypeError, match=r"has no plan\(\) method"):
        check_stage("pre_llm", type("NoPlan", (GridReducer,), {"plan": None, "reduce": lambda s, x, p: x})())
    bad_need = type("Need", (GridReducer,), {"needs": ("depth",), "plan": _Neither.plan, "reduce": _Plain.reduce})()
    with pytest.raises(TypeError, match="needs.*depth"):
        check_stage("pre_llm", bad_need)
    bad_want = type("Want", (GridReducer,), {"wants": ("depth",), "plan": _Neither.plan, "reduce": _Plain.reduce})()
    with pytest.raises(TypeError, match="needs.*depth"):   # an optional side input must be a known one too
        check_stage("pre_llm", bad_want)


def test_plans_say_whether_a_selection_depends_on_the_data():
    rnd = registry.get("random").factory(0.25).pre_llm.plan(4, 4)
    assert not rnd.data_dependent and len(rnd.indices) == rnd.count == 4 and list(rnd.indices) == sorted(rnd.indices)
    assert registry.get("tome").factory(0.25, schedule="post").pre_llm.plan(4, 4).data_dependent
    assert not registry.get("pool").factory(0.25).pre_llm.plan(4, 4).data_dependent


# -- the method template and the VisionZip-like method copied from it ----------------------------------------------
def test_method_template(fresh):
    ex = fresh("vltok.methods._example")
    x = torch.randn(2, 16, 8)
    idx, rows = ex.NormReducer(0.25, "norm").select(x, selection_plan(4, 4, 0.25))
    ref = x.norm(dim=-1).topk(4, dim=1).indices.sort(1).values
    assert torch.equal(idx, ref) and torch.equal(rows, torch.stack([x[b, ref[b]] for b in range(2)]))
    model = tiny_llava()
    inputs = llava_inputs(model, [[5, 6, -1, 7]])
    with torch.no_grad(), vltok.patched(model, "example", keep=0.25) as h:
        model(**inputs)
    assert h.stats["tokens_out"] == 16 and h.stats["tokens_in"] == 64


def _cls_attention_ref(model, pv):
    """CLS attention at the layer feeding the projector, written out: layer norm, q / k, softmax, head mean."""
    tower = model.model.vision_tower
    hs = tower(pv, output_hidden_states=True).hidden_states
    from vltok.adapters.hf_vit import encoder_layers

    layer = encoder_layers(tower)[0]   # vision_feature_layer=-2 of 2 layers: layer 0's output
    y = layer.layer_norm1(hs[0])
    H = layer.self_attn.num_heads
    q = layer.self_attn.q_proj(y).unflatten(-1, (H, -1))
    k = layer.self_attn.k_proj(y).unflatten(-1, (H, -1))
    att = torch.softmax(torch.einsum("bhd,bkhd->bhk", q[:, 0], k) * q.shape[-1] ** -0.5, -1).mean(1)
    return att[:, 1:]


def test_visionzip_like_method_with_cls_attention(fresh):
    vz = fresh("ext_visionzip")
    model = tiny_llava()
    inputs = llava_inputs(model, [[5, 6, -1, 7]])
    with torch.no_grad():
        ref_idx = vz.dominant(_cls_attention_ref(model, inputs["pixel_values"]), 16)
        with vltok.patched(model, "visionzip_fixture", keep=0.25) as h:
            got = model(**inputs).logits
            kept = h.kept_patches()
        # the reference: the same tokens gathered by hand before the projector, placeholders cut by hand
        ref = _hand_reference(model, inputs["input_ids"], inputs["pixel_values"], 16,
                              pre=lambda x: x[:, ref_idx[0]])
    assert [k.kept for k in kept] == ref_idx.tolist() and torch.allclose(got, ref, atol=1e-5)
    # a family whose adapter gives no CLS attention refuses it, naming the side input
    from vltok.adapters import LlavaNextAdapter, Qwen2VLAdapter

    m = registry.get("visionzip_fixture").factory(0.25)
    for ad in (LlavaNextAdapter, Qwen2VLAdapter):
        assert "needs cls_attention" in support.incompatibility(ad, m)
    with pytest.raises(vltok.IncompatibleError, match="cls_attention"):
        vltok.patch(__import__("tiny").tiny_llava_next(), "visionzip_fixture", keep=0.25)


# -- the adapter template and the Gemma 3 adapter copied from it ---------------------------------------------------
def _hand_reference(model, ids, pv, k, post=None, pre=None, **kw):
    """Each run of image placeholders cut to k by hand, the projector's input (pre) or output (post) reduced by a
    hand-written hook."""
    tok = model.config.image_token_id
    rows = []
    for r in ids.tolist():
        out, run = [], 0
        for t in r:
            run = run + 1 if t == tok else 0
            if t != tok or run <= k:
                out.append(t)
        rows.append(out)
    new = torch.tensor(rows)
    proj = model.model.multi_modal_projector
    hook = proj.register_forward_hook(lambda m, a, o: post(o)) if post else \
        proj.register_forward_pre_hook(lambda m, a: (pre(a[0]),))
    try:
        extra = {n: (new == tok).long() for n in kw}
        return model(input_ids=new, pixel_values=pv, **extra).logits
    finally:
        hook.remove()


def _pool(o, side, r):
    from vltok.methods.baselines import pool_grid

    return pool_grid(o, side, side, r, r)


def test_adapter_template_on_llava(fresh):
    ex = fresh("vltok.adapters._example")
    from vltok import adapters

    adapters.register_adapter("LlavaForConditionalGeneration", ex.ProjectorGridAdapter)
    model = tiny_llava()
    inputs = llava_inputs(model, [[5, 6, -1, 7, 8]])
    with torch.no_grad():
        plain = model(**inputs).logits
        with vltok.patched(model, "pool", keep=1.0):
            assert torch.equal(model(**inputs).logits, plain)
        with vltok.patched(model, "pool", keep=0.25) as h:
            got = model(**inputs).logits
        ref = _hand_reference(model, inputs["input_ids"], inputs["pixel_values"], 16, lambda o: _pool(o, 8, 4))
    assert h.family == "example" and torch.allclose(got, ref, atol=1e-5)


def tiny_gemma3(seed=0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4),
        mm_tokens_per_image=16, image_token_index=IMG, boi_token_index=101, eoi_token_index=102)
    return Gemma3ForConditionalGeneration(cfg).eval()


def test_gemma3_adapter_from_the_template(fresh):
    fresh("ext_gemma3")
    model = tiny_gemma3()
    ids = torch.tensor([[1, 5, 101] + [IMG] * 16 + [102, 7, 8]])
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=(ids == IMG).long())
    with torch.no_grad():
        plain = model(**inputs).logits
        with vltok.patched(model, "pool", keep=1.0):
            assert torch.equal(model(**inputs).logits, plain)
        with vltok.patched(model, "pool", keep=0.25) as h:
            got = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        ref = _hand_reference(model, ids, inputs["pixel_values"], 4, lambda o: _pool(o, 4, 2), token_type_ids=1)
    assert h.family == "gemma3" and h.stats["tokens_out"] == 4 and torch.allclose(got, ref, atol=1e-5)
    assert torch.equal(gen[:, :ids.shape[1]], ids)   # generate() hands back the caller's prompt


def test_each_addition_is_one_new_file_with_one_registration_line():
    """VisionZip-like method and Gemma 3 adapter: one new file each (nothing else of vltok changed: both only
    import the public protocol / helpers), one registration line each, the import rules of their layer kept."""
    from test_layering import ADAPTERS, METHODS, under

    for name, rule, reg in [("ext_visionzip", METHODS, "@register("), ("ext_gemma3", ADAPTERS, "register_adapter(")]:
        src = (TESTS / f"{name}.py").read_text()
        assert sum(line.lstrip().startswith(reg) for line in src.splitlines()) == 1
        mods = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) and n.module}
        assert all(under(m, rule) for m in mods if m.startswith("vltok")), mods
