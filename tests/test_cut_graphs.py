"""The graph-replayed in-LLM cut (vltok.inllm.CutGraphs) against the eager cut on the other families
that take the batched path: LLaVA-NeXT (two grids per image) and Qwen2-VL / Qwen2.5-VL (M-RoPE). GPU only."""
import pytest
import torch

import vltok
from tiny_families import deep_llava, qwen_inputs, tiny_qwen
from tiny import llava_next_inputs

pytestmark = pytest.mark.gpu

METHODS = [("fastv", dict(keep=0.5, K=2)), ("feather", dict(keep=0.5, layers=(2, 4)))]


def _compare(m, inputs, method, kw, monkeypatch):
    got = {}
    for graphs in ("0", "1"):
        with vltok.patched(m, method, cut_graphs=None if graphs == "1" else False, **kw) as h:
            runs = []
            for inp in inputs + inputs[:1]:   # capture on the 2nd call of the shape, replays after
                logits = m(**inp).logits
                runs.append((logits, {k: v.clone() for k, v in h.inllm_prefill_columns.items()}))
            graphs_made = sum(isinstance(e, dict) for e in h.adapter.engine._graphs.values())
        got[graphs] = (runs, graphs_made)
    assert got["0"][1] == 0 and got["1"][1] >= 1
    for (la, ca), (lb, cb) in zip(got["0"][0], got["1"][0]):
        assert ca.keys() == cb.keys() and ca and all(torch.equal(ca[k], cb[k]) for k in ca)
        assert (la - lb).abs().max() < 1e-4


def _variants(inp, key):
    return [dict(inp, **{key: inp[key] + 0.5 * i * torch.randn_like(inp[key])}) for i in range(3)]


@pytest.mark.parametrize("method,kw", METHODS)
def test_llava_next_cut_graph_equals_eager(method, kw, monkeypatch):
    m = deep_llava("next").cuda()
    inp = llava_next_inputs(m, [[1, -1, 5, 6], [1, 7, -1, 9]], [[80, 120], [80, 120]], padding="left")
    inp = {k: v.cuda() for k, v in inp.items()}
    _compare(m, _variants(inp, "pixel_values"), method, kw, monkeypatch)


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method,kw", METHODS)
def test_qwen_cut_graph_equals_eager(version, method, kw, monkeypatch):
    m = tiny_qwen(version, layers=6).cuda()
    inp = qwen_inputs(m, [[1, 5, -1, 7], [1, 2, -1, 4]], [(1, 8, 8), (1, 8, 8)], padding="left")
    inp = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    _compare(m, _variants(inp, "pixel_values"), method, kw, monkeypatch)
