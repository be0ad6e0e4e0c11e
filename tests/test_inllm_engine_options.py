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
