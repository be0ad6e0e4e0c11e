"""Full-size configs (meta device: shapes only) and the on-device random builder's buffers."""
import pytest
import torch

from tiny import tiny_llava, tiny_llava_next
from tiny_families import tiny_blip2, tiny_next_video, tiny_qwen, tiny_video_llava
from vltok.eval import configs
from vltok.eval.configs import build_random_from


@pytest.mark.parametrize("name,billions", [("llava-1.5-7b", 7.06), ("llava-next-7b", 7.06), ("llava-next-video-7b", 7.06),
                                           ("qwen2-vl-7b", 8.29),
                                           ("qwen2.5-vl-7b", 8.29), ("blip2-opt-2.7b", 3.74)])
def test_full_size_parameter_counts(name, billions):
    m = configs.build_random(name, device="meta")
    assert sum(p.numel() for p in m.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("make", [tiny_llava, tiny_llava_next, lambda: tiny_qwen("2"), lambda: tiny_qwen("2.5"),
                                  tiny_blip2, tiny_next_video, tiny_video_llava])
def test_random_builder_recomputes_every_buffer(make):
    ref = make()
    built = build_random_from(type(ref), ref.config, device="cpu", dtype=torch.float32)
    bufs = dict(built.named_buffers())
    for name, b in ref.named_buffers():
        assert torch.equal(bufs[name], b), name
    assert all(torch.isfinite(p).all() for p in built.parameters())
