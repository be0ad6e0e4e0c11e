"""The engine's explicit options: the adapter's declared rotary convention (no code-object comparison) and the
cut_graphs patch option."""
import pytest
import torch

import vltok
from vltok.adapters.llava import LlavaAdapter
from test_inllm import batch, tiny_llava_deep
from vltok.errors import IncompatibleError


@pytest.fixture(scope="module")
def model():
    return tiny_llava_deep("sdpa")


def _run(m, inp):
    with vltok.patched(m, "fastv", keep=0.5, K=2, rope=True) as h:
        return m(**inp).logits, {k: v.clone() for k, v in h.inllm_prefill_columns.items()}


def test_custom_rope_convention_calls_the_adapters_apply_rope(model, monkeypatch):
    """rotate_half: the fused scoring path, apply_rope never called; custom: the engine rotates through apply_rope,
    and (here the override is the same rotation) selects the same columns with the same logits."""
    inp = batch(model, "b2-left")
    calls = []
    base = LlavaAdapter.apply_rope

    def counted(self, q, k, cos, sin):
        calls.append(q.shape)
        return base(self, q, k, cos, sin)

    monkeypatch.setattr(LlavaAdapter, "apply_rope", counted)
    want, cols_want = _run(model, inp)
    assert calls == []
    monkeypatch.setattr(LlavaAdapter, "rope_convention", "custom")
    got, cols_got = _run(model, inp)
    assert calls, "a custom rotary convention must go through the adapter's apply_rope"
    assert cols_got.keys() == cols_want.keys() and all(torch.equal(cols_got[k], cols_want[k]) for k in cols_want)
    assert (got - want).abs().max() < 1e-5


def test_unknown_rope_convention_is_refused_at_patch_time(model, monkeypatch):
    monkeypatch.setattr(LlavaAdapter, "rope_convention", "yarn")
    with pytest.raises(IncompatibleError, match="rope_convention='yarn'"):
        vltok.patch(model, "fastv", keep=0.5)
    assert vltok.get_handle(model) is None


def test_cut_graphs_option_is_validated_and_reaches_the_engine(model):
    """cut_graphs: True / False / None, checked at patch time (nothing is left installed when refused); the
    engine reads it from the handle (CPU: True is refused, since graphs need the model on CUDA; GPU behaviour is
    tests/test_inllm_batched.py's and tests/test_cut_graphs.py's)."""
    from vltok.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="cut_graphs must be True, False or None"):
        vltok.patch(model, "fastv", keep=0.5, cut_graphs="0")
    with pytest.raises(IncompatibleError, match="model.cuda"):
        vltok.patch(model, "fastv", keep=0.5, cut_graphs=True)
    with pytest.raises(IncompatibleError, match="graph_safe"):
        vltok.patch(model, "mustdrop", keep=0.5, cut_graphs=True)
    with pytest.raises(IncompatibleError, match="graph_safe"):
        vltok.patch(model, "pool", keep=0.25, cut_graphs=True)
    assert vltok.get_handle(model) is None
    for value in (None, False):
        with vltok.patched(model, "fastv", keep=0.5, cut_graphs=value) as h:
            assert h.cut_graphs is value and h.adapter.engine.handle is h
    with vltok.patched(model, "feather", keep=0.5) as h:
        h.cut_graphs = False                       # assignable, validated like the option
        assert h.cut_graphs is False
        with pytest.raises(IncompatibleError, match="model.cuda"):
            h.cut_graphs = True
        with pytest.raises(InvalidOptionError):
            h.cut_graphs = 1
        assert h.cut_graphs is False
        import copy

        clone = copy.deepcopy(model)               # the copy is patched with the same option
        assert vltok.get_handle(clone).cut_graphs is False
        vltok.unpatch(clone)


def test_speed_profiles_the_eager_cut_through_the_option(model):
    """eval/speed.py turns the cut graphs off through the handle (no environment variable) and restores them."""
    import os

    from vltok.eval.speed import _eager_cut

    with vltok.patched(model, "fastv", keep=0.5) as h:
        with _eager_cut(h):
            assert h.cut_graphs is False
        assert h.cut_graphs is None
    assert "VLTOK_CUT_GRAPHS" not in os.environ


@pytest.mark.gpu
@pytest.mark.parametrize("value", [True, None, False])
def test_cut_graphs_option_on_gpu(value):
    """On CUDA: True / None capture the cut's graph (2nd call of a shape) and replay it; False never does. Every
    setting gives the eager cut's columns."""
    m = tiny_llava_deep("sdpa").cuda()
    inp = {k: v.cuda() for k, v in batch(m, "b2-left").items()}
    with vltok.patched(m, "fastv", keep=0.5, K=2, cut_graphs=False) as h:
        m(**inp)
        want = {k: v.clone() for k, v in h.inllm_prefill_columns.items()}
    with vltok.patched(m, "fastv", keep=0.5, K=2, cut_graphs=value) as h:
        for _ in range(3):
            m(**inp)
            assert all(torch.equal(h.inllm_prefill_columns[k], want[k]) for k in want)
        graphs = sum(isinstance(e, dict) for e in h.adapter.engine._graphs.values())
    assert (graphs >= 1) == (value is not False)
