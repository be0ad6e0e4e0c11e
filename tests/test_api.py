"""Public API surface: registry, errors with their messages, handle lifecycle, rewrite edge cases."""
import subprocess
import sys

import pytest
import torch

import vltok
from tiny import IMG, LLAMA, llava_inputs, tiny_llava
from vltok import registry
from vltok.rewrite import shrink_placeholders
from vltok.stages import Method


def test_methods_registry_lists_descriptions_and_stages():
    table = vltok.methods()
    assert {"fourier", "pool", "random"} <= set(table)
    assert table["fourier"].stages == ("pre_llm",)
    text = str(table)
    assert "fourier" in text and "DCT" in text and "[pre_llm]" in text


def test_import_prints_methods_in_subprocess():
    out = subprocess.run([sys.executable, "-c", "import vltok; print(vltok.methods())"], capture_output=True,
                         text=True, check=True).stdout
    assert "fourier" in out and "pool" in out and "random" in out


def test_unknown_method_lists_valid_ones():
    m = tiny_llava()
    with pytest.raises(vltok.UnknownMethodError,
                       match=r"unknown method .fouirer.*valid methods are: .*fourier, .*pool, .*random"):
        vltok.patch(m, "fouirer", keep=0.5)
    assert "forward" not in m.__dict__


def test_method_names_are_case_insensitive_and_a_typo_gets_a_suggestion():
    from vltok import registry

    names = list(vltok.methods())
    assert len({n.lower() for n in names}) == len(names)   # no two names differ only in case
    assert registry.get("FastV").name == "fastv" and registry.get("TOME").name == "tome"
    m = tiny_llava()
    with vltok.patched(m, "Fourier", keep=0.5) as h:
        assert h.method.name == "fourier"
    with pytest.raises(vltok.UnknownMethodError, match=r"unknown method 'fourir' \(did you mean 'fourier'\?\); "
                                                       r"valid methods are: "):
        vltok.patch(m, "fourir", keep=0.5)
    with pytest.raises(vltok.UnknownMethodError, match=r"did you mean 'tmerge'"):
        registry.get("tmerj")
    with pytest.raises(vltok.UnknownMethodError) as e:
        registry.get("xyzzy")
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("keep", [0, -0.1, 1.5, float("nan"), "0.5", True])
def test_keep_outside_range(keep):
    m = tiny_llava()
    with pytest.raises(vltok.InvalidKeepError, match=r"keep"):
        vltok.patch(m, "fourier", keep=keep)
    assert vltok.get_handle(m) is None and "forward" not in m.__dict__


def test_keep_not_given_is_the_default():   # keep=None means "not given" (the CLIs pass it): 0.16
    m = tiny_llava()
    with vltok.patched(m, "fourier") as a:
        assert a.keep == 0.16 and a.keep_set_by is None and "keep=0.16" in repr(a)
    with vltok.patched(m, "fourier", keep=None) as b:
        assert b.keep == vltok.api.DEFAULT_KEEP == 0.16


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(vltok.VltokError, match=r"no option 'reserve'.*r, gain, rounding"):
        vltok.patch(tiny_llava(), "fourier", keep=0.5, reserve=12)
    with pytest.raises(ValueError, match="gain must be one of"):
        vltok.patch(tiny_llava(), "fourier", keep=0.5, gain="loud")


def test_unsupported_model_names_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in LLAMA.items() if k != "model_type"}))
    with pytest.raises(vltok.UnsupportedModelError,
                       match=r"LlamaForCausalLM.*LlavaForConditionalGeneration, LlavaNextForConditionalGeneration"):
        vltok.patch(lm, "fourier", keep=0.5)
    with pytest.raises(vltok.UnsupportedModelError, match="LlavaModel"):
        vltok.patch(tiny_llava().model, "fourier", keep=0.5)


def test_patching_twice_says_how_to_unpatch():
    m = tiny_llava()
    vltok.patch(m, "pool", keep=0.5)
    with pytest.raises(vltok.AlreadyPatchedError, match=r"already patched \(pool, keep=0.5\).*vltok.unpatch"):
        vltok.patch(m, "fourier", keep=0.25)
    vltok.unpatch(m)
    with pytest.raises(vltok.NotPatchedError):
        vltok.unpatch(m)
    vltok.patch(m, "fourier", keep=0.25).remove()


def test_method_stage_the_adapter_lacks_is_refused(monkeypatch):
    class FakeInLLM(Method):
        pass

    def factory(keep):
        mth = FakeInLLM("fake", keep, {})
        mth.in_llm = object()
        return mth

    monkeypatch.setitem(registry._REGISTRY, "fake", registry.MethodInfo("fake", "test only", ("in_llm",), factory))
    from vltok.adapters.llava import LlavaAdapter

    monkeypatch.setattr(LlavaAdapter, "stages", ("pre_llm",))   # LLaVA has every stage now: pretend it lacks one
    m = tiny_llava()
    with pytest.raises(vltok.IncompatibleError, match=r"stage\(s\) in_llm.*llava adapter"):
        vltok.patch(m, "fake", keep=0.5)
    assert vltok.get_handle(m) is None and "forward" not in m.__dict__


def test_inputs_embeds_without_placeholder_rows_is_refused():   # (inputs_embeds: tests/test_peer_fixes.py)
    m = tiny_llava()
    inp = llava_inputs(m, [[1, -1, 5]])
    emb = m.get_input_embeddings()(inp["input_ids"].masked_fill(inp["input_ids"] == IMG, 0))
    with vltok.patched(m, "fourier", keep=0.25):
        with pytest.raises(vltok.IncompatibleError, match="do not match.*from inputs_embeds"):
            m(inputs_embeds=emb, pixel_values=inp["pixel_values"], attention_mask=inp["attention_mask"])


def test_wrong_placeholder_count_is_explained():
    m = tiny_llava()
    inp = llava_inputs(m, [[1, -1, 5]], n_ph=50)
    with vltok.patched(m, "fourier", keep=0.25):
        with pytest.raises(vltok.IncompatibleError, match=r"50 image placeholder tokens.*would make 64.*reduces them to 16"):
            m(**inp)


def test_already_reduced_runs_pass_through():
    """A processor-side truncation (runs already at the reduced length) is left alone."""
    m = tiny_llava()
    inp = llava_inputs(m, [[1, -1, 5]], n_ph=16)
    with vltok.patched(m, "fourier", keep=0.25) as h:
        out = m(**inp)
    assert out.logits.shape[1] == 18 and h.stats["tokens_out"] == 16


def test_context_manager_restores_on_error():
    m = tiny_llava()
    with pytest.raises(RuntimeError):
        with vltok.patched(m, "pool", keep=0.25):
            raise RuntimeError("boom")
    assert vltok.get_handle(m) is None and "generate" not in m.__dict__


def test_unpatch_restores_a_preexisting_instance_override():
    m = tiny_llava()
    marker = lambda *a, **k: "mine"  # noqa: E731
    m.__dict__["generate"] = marker
    with vltok.patched(m, "pool", keep=0.25):
        assert m.__dict__["generate"] is not marker
    assert m.__dict__["generate"] is marker


def test_shrink_placeholders_two_adjacent_images_and_right_padding():
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, IMG, IMG, 2, 0], [1, 3, IMG, IMG, IMG, 4, 5, 6, 7]])
    am = (torch.arange(9) < torch.tensor([[8], [9]])).long()
    labels = ids.clone()
    rw = shrink_placeholders(ids, IMG, [3, 3, 3], [1, 2, 1], {"attention_mask": am, "labels": labels}, 0, "right")
    assert rw.tensors["input_ids"].tolist() == [[1, IMG, IMG, IMG, 2, 0, 0], [1, 3, IMG, 4, 5, 6, 7]]
    assert rw.tensors["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert rw.tensors["labels"][0, -1] == -100
    assert rw.kept_positions[0].tolist() == [0, 1, 4, 5, 7, -1, -1]
    assert torch.equal(ids, torch.tensor([[1, IMG, IMG, IMG, IMG, IMG, IMG, 2, 0],
                                          [1, 3, IMG, IMG, IMG, 4, 5, 6, 7]]))  # input untouched


def test_shrink_placeholders_left_padding_drops_surplus_pads():
    ids = torch.tensor([[0, 0, 0, 1, IMG, IMG, IMG, IMG], [1, 2, 3, 4, 5, 6, IMG, IMG]])
    am = (ids != 0).long()
    with pytest.raises(ValueError):
        shrink_placeholders(ids, IMG, [4], [1, 2], {"attention_mask": am}, 0, "left")
    ids2 = torch.tensor([[0, 0, 1, IMG, IMG, IMG, IMG, 9], [1, 2, 3, 4, IMG, IMG, IMG, IMG]])
    rw = shrink_placeholders(ids2, IMG, [4, 4], [1, 1], {"attention_mask": (ids2 != 0).long()}, 0, "left")
    assert rw.tensors["input_ids"].tolist() == [[0, 0, 1, IMG, 9], [1, 2, 3, 4, IMG]]


def test_cli_methods_and_bench_help():
    from vltok import cli

    out = subprocess.run([sys.executable, "-m", "vltok.cli", "methods"], capture_output=True, text=True, check=True)
    assert "fourier" in out.stdout
    seen = []
    import vltok.eval.speed as speed

    orig, speed.main = speed.main, seen.append
    try:
        cli.main(["bench", "--models", "llava-1.5-7b", "--keeps", "0.5"])
    finally:
        speed.main = orig
    assert seen == [["--models", "llava-1.5-7b", "--keeps", "0.5"]]


def test_submodules_reachable_as_attributes_after_import_vltok():
    """`import vltok; vltok.reference.load()` as the docs write it (a fresh interpreter: nothing imported before)."""
    import subprocess
    import sys

    code = ("import sys, vltok; assert 'vltok.reference' not in sys.modules; "
            "assert callable(vltok.reference.load) and callable(vltok.reference_video.frames_to_pixels); "
            "assert vltok.stages.GridReducer\n"
            "try:\n    vltok.no_such_thing\nexcept AttributeError as e:\n    print('ok', e)")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ok module 'vltok' has no attribute 'no_such_thing'" in r.stdout


def test_error_classes_for_a_name_an_unknown_option_and_resize_keep(tmp_path):
    """A hub name / path instead of a model says to load it first; an unknown option is an InvalidOptionError (as a bad
    value is); resize's bad keep an InvalidKeepError (as patch's is)."""
    for bad in ("llava-hf/llava-1.5-7b-hf", tmp_path):
        with pytest.raises(vltok.UnsupportedModelError, match="takes a loaded model.*from_pretrained"):
            vltok.patch(bad, "pool", keep=0.5)
    m = tiny_llava()
    with pytest.raises(vltok.InvalidOptionError, match="has no option 'nope'"):
        vltok.patch(m, "pool", keep=0.5, nope=1)
    assert vltok.get_handle(m) is None
    with pytest.raises(vltok.InvalidKeepError, match="resize: keep must be"):
        vltok.resize_processor(object(), 0)


def test_unset_handle_columns_say_why_and_what_to_read_instead():
    m = tiny_llava()
    inp = llava_inputs(m, [[1, -1, 5, 6, 7]])
    h = vltok.patch(m, "fastv", keep=0.75, K=1)
    with pytest.raises(AttributeError, match="no call with images has run"):
        h.inllm_kept_columns
    m(**inp)
    assert h.inllm_kept_columns.shape[1] < inp["input_ids"].shape[1]
    with pytest.raises(AttributeError, match="'fastv' reduces inside the LLM.*handle.inllm_kept_columns"):
        h.kept_positions
    assert not hasattr(h, "kept_positions")   # still an AttributeError: hasattr / getattr defaults keep working
    vltok.unpatch(m)
    h = vltok.patch(m, "pool", keep=0.5)
    m(**inp)
    assert h.kept_positions.shape[1] < inp["input_ids"].shape[1]
    with pytest.raises(AttributeError, match="'pool' has no in-LLM stage.*handle.kept_positions"):
        h.inllm_kept_columns
    vltok.unpatch(m)
