"""The in-LLM engine's batched path (all samples with the same grids): the same selections as the per-sample path,
and no host sync inside vltok during a forward (counted at the dispatcher by vltok.eval.tools.profile_vltok)."""
import pytest
import torch

import vltok
from test_inllm import batch, tiny_llava_deep
from vltok.eval.tools.profile_vltok import count_syncs
from vltok.inllm import BatchView, Cut, ImageView

METHODS = [("fastv", dict(keep=0.5, K=2)), ("feather", dict(keep=0.5)), ("feather", dict(keep=0.3, stride=2)),
           ("fastv", dict(keep=0.5, K=1, rope=False))]


def run(m, inp, method, kw, per_sample):
    with vltok.patched(m, method, **kw) as h:
        if per_sample:   # a select() set on the instance is honoured: the engine goes sample by sample
            h.method.in_llm.select = h.method.in_llm.select
        out = m(**inp).logits
        gen = m.generate(**inp, max_new_tokens=3, do_sample=False)
        return out, h.inllm_prefill_columns, gen, dict(h.stats)


@pytest.mark.parametrize("kind", ["b1", "b2-left", "b2-right"])
@pytest.mark.parametrize("method,kw", METHODS)
def test_batched_path_equals_per_sample_path(kind, method, kw):
    m = tiny_llava_deep("sdpa")
    inp = batch(m, kind)
    out_b, cols_b, gen_b, st_b = run(m, inp, method, kw, per_sample=False)
    out_s, cols_s, gen_s, st_s = run(m, inp, method, kw, per_sample=True)
    assert cols_b.keys() == cols_s.keys() and cols_b
    for layer in cols_b:
        assert torch.equal(cols_b[layer], cols_s[layer])
    assert (out_b - out_s).abs().max() < 1e-5 and torch.equal(gen_b, gen_s)
    for key in ("tokens_per_layer", "images", "tokens_out", "flops_keep", "llm_input_tokens"):
        assert st_b[key] == st_s[key]


@pytest.mark.parametrize("method,kw", METHODS[:2])
def test_forward_has_no_host_sync_inside_vltok(method, kw):
    m = tiny_llava_deep("sdpa")
    inp = batch(m, "b2-left")
    with vltok.patched(m, method, **kw) as h, torch.no_grad():
        with count_syncs(h) as c:
            m(**inp)
        assert h.stats["prune_layers"]
    # the one read-back of input_ids that locates the placeholder runs; nothing in the hooks
    assert c.where == {"split_runs readback": 1}, c.where


def test_the_counter_sees_syncs():
    """The counter is not blind: the per-sample path (a select() set on the instance) syncs in the hooks."""
    m = tiny_llava_deep("sdpa")
    inp = batch(m, "b2-left")
    with vltok.patched(m, "fastv", keep=0.5, K=2) as h, torch.no_grad():
        h.method.in_llm.select = h.method.in_llm.select
        with count_syncs(h) as c:
            m(**inp)
    assert c.count > 4 and "aten.nonzero.default" in c.where


@pytest.mark.parametrize("grid,n,stride,a", [((8, 8), 64, 3, 0.3), ((6, 10), 60, 2, 0.5), (None, 50, 3, 0.2),
                                            ((8, 8), 64, 3, 0.05)])
def test_feather_and_fastv_select_batch_equal_select_row_by_row(grid, n, stride, a):
    g = torch.Generator().manual_seed(n)
    m = vltok.api.build_method("feather", a=a, stride=stride).in_llm   # a fixes the budget: no keep
    scores = (torch.rand(5, 1, n, generator=g) * 8).floor() / 8   # many ties
    raster = torch.arange(n).expand(5, n)
    c1 = Cut(3, stage=0, params=(a, a * a))
    got = m.select_batch(c1, BatchView(grid, n, raster), scores)
    for r in range(5):
        assert torch.equal(got[r], m.select(c1, ImageView(grid, n, raster[r]), scores[r]))
    # stage 2 on a partial raster
    part = torch.stack([torch.randperm(n, generator=g)[:n // 2].sort().values for _ in range(5)])
    c2 = Cut(5, stage=1, params=(a, 0.4))
    got = m.select_batch(c2, BatchView(grid, n, part), scores[:, :, :n // 2])
    for r in range(5):
        assert torch.equal(got[r], m.select(c2, ImageView(grid, n, part[r]), scores[r, :, :n // 2]))
    # stage 1 on a partial raster is declined (the engine then goes sample by sample)
    assert m.select_batch(c1, BatchView(grid, n, part), scores[:, :, :n // 2]) is None
    f = vltok.api.build_method("fastv", 0.3, keep_mode="final").in_llm
    cf = Cut(2, params=(8,))
    got = f.select_batch(cf, BatchView(grid, n, raster), scores)
    for r in range(5):
        assert torch.equal(got[r], f.select(cf, ImageView(grid, n, raster[r]), scores[r]))


def test_engine_with_the_triton_gather_equals_torch(monkeypatch):
    """On CUDA the real kernel, on CPU the interpreter (conftest sets TRITON_INTERPRET=1 when there is no GPU)."""
    pytest.importorskip("triton")
    import vltok.kernels.gather as kg

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = tiny_llava_deep("eager").to(dev)
    inp = {k: v.to(dev) for k, v in batch(m, "b2-right").items()}
    orig = kg.gather_rows
    calls = []

    def forced(impl):
        def gather(*a, **k):
            calls.append(impl)
            return orig(*a, **dict(k, impl=impl))
        return gather

    with vltok.patched(m, "feather", keep=0.5) as h:
        monkeypatch.setattr(kg, "gather_rows", forced("torch"))
        want = m(**inp).logits
        monkeypatch.setattr(kg, "gather_rows", forced("triton"))
        got = m(**inp).logits
    assert calls.count("triton") == calls.count("torch") == len(h.stats["prune_layers"]) == 2
    assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["b1", "b2-left", "b2-right"])
def test_mustdrop_batched_equals_per_sample_with_key_set_and_decode_eviction(kind):
    m = tiny_llava_deep("sdpa")
    inp = batch(m, kind)
    kw = dict(keep=0.4, key_rate=0.1)
    out_b, cols_b, gen_b, st_b = run(m, inp, "mustdrop", kw, per_sample=False)
    out_s, cols_s, gen_s, st_s = run(m, inp, "mustdrop", kw, per_sample=True)
    assert len(cols_b) >= 2 and cols_b.keys() == cols_s.keys()
    for layer in cols_b:
        assert torch.equal(cols_b[layer], cols_s[layer])
    assert (out_b - out_s).abs().max() < 1e-5 and torch.equal(gen_b, gen_s)
    assert st_b["tokens_per_layer"] == st_s["tokens_per_layer"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["b1", "b2-left"])
@pytest.mark.parametrize("method,kw", METHODS[:3])
def test_cut_graph_replays_equal_the_eager_cut_on_gpu(kind, method, kw, monkeypatch):
    """The cut replayed from a CUDA graph (3rd call of a shape on) keeps the eager cut's columns and logits, also
    with other images between replays, and generate() with the cache is unchanged."""
    m = tiny_llava_deep("sdpa").cuda()
    base = {k: v.cuda() for k, v in batch(m, kind).items()}
    inputs = [dict(base, pixel_values=base["pixel_values"] + 0.5 * i * torch.randn_like(base["pixel_values"]))
              for i in range(4)]
    got = {}
    for graphs in ("0", "1"):
        with vltok.patched(m, method, cut_graphs=None if graphs == "1" else False, **kw) as h:
            runs = []
            for inp in inputs + inputs[:1]:   # capture on the 2nd call, replays after, with changing pixels
                logits = m(**inp).logits
                runs.append((logits, {k: v.clone() for k, v in h.inllm_prefill_columns.items()}))
            gen = m.generate(**inputs[2], max_new_tokens=3, do_sample=False)
            n_graphs = sum(isinstance(e, dict) for e in h.adapter.engine._graphs.values())
        got[graphs] = (runs, gen, n_graphs)
    assert got["0"][2] == 0 and got["1"][2] >= 1
    for (la, ca), (lb, cb) in zip(got["0"][0], got["1"][0]):
        assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
        assert (la - lb).abs().max() < 1e-4
    assert torch.equal(got["0"][1], got["1"][1])



@pytest.mark.gpu
def test_cut_graph_cache_is_bounded_on_gpu(monkeypatch):
    """Many prompt lengths keep at most _MAX_GRAPHS cut graphs (or shapes seen once), and results stay right."""
    import vltok.inllm as inllm

    monkeypatch.setattr(inllm, "_MAX_GRAPHS", 2)
    m = tiny_llava_deep("sdpa").cuda()
    inp = {k: v.cuda() for k, v in batch(m, "b1").items()}
    calls = [dict(inp, input_ids=torch.cat([inp["input_ids"], inp["input_ids"][:, -1:].repeat(1, extra)], 1),
                  attention_mask=None) for extra in range(4)]
    with vltok.patched(m, "fastv", keep=0.5, K=2) as h:
        ref = []
        h.cut_graphs = False
        for call in calls:
            ref.append(m(**call).logits)
        h.cut_graphs = None
        for _ in range(3):   # seen, captured, replayed per length, while older lengths are dropped
            for call, r in zip(calls, ref):
                assert (m(**call).logits - r).abs().max() < 1e-4
                assert len(h.adapter.engine._graphs) <= 2
