"""The in-LLM / decode contract lives in vltok.stages as typed Protocols (InLLMPolicy, BatchedInLLMPolicy,
DecodePolicy); every shipped in-LLM method satisfies them, and vltok.inllm re-exports the same types."""
import pytest

import vltok.inllm as inllm
import vltok.stages as stages
from vltok.api import build_method


@pytest.mark.parametrize("name,kw", [("fastv", {}), ("feather", {}), ("mustdrop", {}),
                                     ("llavamini", dict(mode="early_fusion"))])
def test_in_llm_methods_implement_the_protocols(name, kw):
    m = build_method(name, 0.5, **kw)
    assert isinstance(m.in_llm, stages.InLLMPolicy)
    assert isinstance(m.in_llm, stages.BatchedInLLMPolicy)
    if m.decode is not None:
        assert isinstance(m.decode, stages.DecodePolicy)
        assert not isinstance(m.in_llm, stages.DecodePolicy)


def test_a_policy_without_select_is_not_an_in_llm_policy():
    class PlanOnly:
        def plan(self, n_layers, images):
            return []

    assert not isinstance(PlanOnly(), stages.InLLMPolicy)
    assert not isinstance(PlanOnly(), stages.DecodePolicy)


def test_inllm_reexports_the_stage_types():
    for name in ("Cut", "Merge", "ImageView", "BatchView", "InLLMPolicy", "DecodePolicy"):
        assert getattr(inllm, name) is getattr(stages, name)
