"""Failures a new user hit (issue 14, item 3): mixed batches, generate() modes, copies, threads, option errors.

Tiny random LLaVA-1.5 (tests/test_inllm.py's 6-layer LLM, so in-LLM cuts sit inside the stack)."""
import pytest
import torch

import vltok
from test_inllm import tiny_llava_deep
from tiny import IMG, llava_inputs

IMG_PROMPT, TEXT_PROMPT = [1, 5, -1, 7, 8, 9], [1, 11, 12, 13, 14, 15, 16]
INLLM = [("fastv", dict(keep=0.5, K=2)), ("feather", dict(keep=0.5)), ("mustdrop", dict(keep=0.5)),
         ("llavamini", dict(keep=0.5, mode="early_fusion"))]


@pytest.fixture(scope="module")
def model():
    return tiny_llava_deep()


def last_logits(m, inp, handle=None):
    """Per sample, the logits at its last real column (right padding: positions as in a run alone); with a patch
    handle and images, that column is found among the columns the patched model kept."""
    with torch.no_grad():
        out = m(**inp).logits
    res = []
    for b, row in enumerate(inp["attention_mask"]):
        col = int(row.nonzero().max())
        if handle is not None and "pixel_values" in inp:
            cols = getattr(handle, "inllm_kept_columns", None)
            cols = handle.kept_positions if cols is None else cols
            col = cols[b].tolist().index(col)
        res.append(out[b, col])
    return res


# -- 1. a batch where one sample has no image ------------------------------------------------------------------
@pytest.mark.parametrize("text_first", [False, True])
@pytest.mark.parametrize("method,kw", INLLM + [("pool", dict(keep=0.25))])
def test_text_only_sample_in_an_image_batch(model, method, kw, text_first):
    prompts = [TEXT_PROMPT, IMG_PROMPT] if text_first else [IMG_PROMPT, TEXT_PROMPT]
    t, i = (0, 1) if text_first else (1, 0)
    batch = llava_inputs(model, prompts, padding="right")
    alone_img = llava_inputs(model, [IMG_PROMPT])
    alone_txt = {k: v for k, v in llava_inputs(model, [TEXT_PROMPT]).items() if k != "pixel_values"}
    ref_txt = last_logits(model, alone_txt)[0]                         # the unpatched model on the text sample
    with vltok.patched(model, method, **kw) as h:
        got = last_logits(model, batch, h)
        assert h.stats["tokens_out"] < h.stats["tokens_in"]            # the image sample was reduced
        ref_img = last_logits(model, alone_img, h)[0]                   # the same sample alone, patched
        alone_txt_patched = last_logits(model, alone_txt, h)[0]
        gen_b = model.generate(**llava_inputs(model, prompts), max_new_tokens=4, do_sample=False)
        gen_i = model.generate(**alone_img, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(got[i], ref_img, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[t], ref_txt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone_txt_patched, ref_txt, atol=0, rtol=0)
    assert torch.equal(gen_b[i, -4:], gen_i[0, -4:])
    gen_t = model.generate(**alone_txt, max_new_tokens=4, do_sample=False)   # unpatched
    assert torch.equal(gen_b[t, -4:], gen_t[0, -4:])


# -- 2. / 3. generate() modes ------------------------------------------------------------------------------------
FAMILIES = [("fourier", dict(keep=0.25)), ("random", dict(keep=0.25)), ("tome", dict(keep=0.5))] + INLLM
GEN = dict(max_new_tokens=4, min_new_tokens=4, suppress_tokens=[IMG])   # (a random model may emit the image token)
P2 = [1, 11, 12, -1, 13]


@pytest.mark.parametrize("method,kw", FAMILIES)
def test_beam_search_and_several_sequences(model, method, kw):
    inp = llava_inputs(model, [IMG_PROMPT, P2])
    ids = inp["input_ids"]
    with torch.no_grad():
        ref = model.generate(**inp, num_beams=2, num_return_sequences=2, do_sample=False, **GEN)
    with vltok.patched(model, method, **kw) as h, torch.no_grad():
        beams = model.generate(**inp, num_beams=2, num_return_sequences=2, do_sample=False, **GEN)
        assert h.stats["tokens_out"] < h.stats["tokens_in"]
        # each sample of the batch decodes as it does alone (its rows get its own layout / prompt)
        one = [model.generate(**{**llava_inputs(model, [p]), "pixel_values": inp["pixel_values"][j:j + 1]},
                              num_beams=2, do_sample=False, **GEN) for j, p in enumerate([IMG_PROMPT, P2])]
        best = model.generate(**inp, num_beams=2, do_sample=False, **GEN)
        torch.manual_seed(0)
        sampled = model.generate(**inp, do_sample=True, num_return_sequences=3, **GEN)
    assert beams.shape == ref.shape == (4, ids.shape[1] + 4)
    assert torch.equal(beams[:, :ids.shape[1]], ids.repeat_interleave(2, 0))   # the caller's prompt, per sequence
    assert sampled.shape == (6, ids.shape[1] + 4)
    assert torch.equal(sampled[:, :ids.shape[1]], ids.repeat_interleave(3, 0))
    for j in range(2):
        assert torch.equal(best[j, -4:], one[j][0, -4:]), j


@pytest.mark.parametrize("method,kw", FAMILIES + [("pool", dict(keep=0.25))])
@pytest.mark.parametrize("prompts", [[IMG_PROMPT, P2], [TEXT_PROMPT, P2]], ids=["images", "text+image"])
def test_use_cache_false_gives_the_cached_tokens(model, method, kw, prompts):
    inp = llava_inputs(model, prompts)
    with vltok.patched(model, method, **kw), torch.no_grad():
        cached = model.generate(**inp, do_sample=False, max_new_tokens=6, suppress_tokens=[IMG])
        plain = model.generate(**inp, do_sample=False, max_new_tokens=6, suppress_tokens=[IMG], use_cache=False)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("method,kw", [("pool", dict(keep=0.25)), ("tome", dict(keep=0.5))])
def test_prompt_lookup_and_assisted_decoding_work_before_the_llm(model, method, kw):
    inp = llava_inputs(model, [[1, 5, -1, 7, 8, 9, 5, 7]])
    helper = tiny_llava_deep(layers=2, seed=1)
    with vltok.patched(model, method, **kw), torch.no_grad():
        ref = model.generate(**inp, do_sample=False, **GEN)
        assert torch.equal(model.generate(**inp, do_sample=False, prompt_lookup_num_tokens=2, **GEN), ref)
        assert torch.equal(model.generate(**inp, do_sample=False, assistant_model=helper, **GEN), ref)


@pytest.mark.parametrize("method,kw", INLLM[:1] + INLLM[2:3])
def test_assisted_decoding_is_refused_in_the_llm(model, method, kw):
    inp = llava_inputs(model, [[1, 5, -1, 7, 8, 9, 5, 7]])
    with vltok.patched(model, method, **kw), torch.no_grad():
        for extra in (dict(prompt_lookup_num_tokens=2), dict(assistant_model=tiny_llava_deep(layers=2, seed=1))):
            with pytest.raises(vltok.VltokError, match="assisted decoding"):
                model.generate(**inp, do_sample=False, **GEN, **extra)


# -- 4. copies and pickling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("fastv", dict(keep=0.5)), ("tome", dict(keep=0.5)), ("pool", dict(keep=0.25))])
def test_deepcopy_is_an_independent_patched_model(method, kw):
    import copy
    import io

    m = tiny_llava_deep()
    inp = llava_inputs(m, [IMG_PROMPT, P2])
    with torch.no_grad():
        plain = m(**inp).logits
    h = vltok.patch(m, method, **kw)
    with torch.no_grad():
        patched = m(**inp).logits
    c = copy.deepcopy(m)
    hc = vltok.get_handle(c)
    assert hc is not None and hc is not h and hc.model is c and h.model is m
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.parameters(), c.parameters()))
    with torch.no_grad():
        assert torch.equal(c(**inp).logits, patched)
    vltok.unpatch(c)   # unpatching the copy leaves the original patched
    assert vltok.get_handle(m) is h
    with torch.no_grad():
        assert torch.equal(m(**inp).logits, patched)
        assert torch.equal(c(**inp).logits, plain)
    with pytest.raises(vltok.VltokError, match="state_dict"):
        torch.save(m, io.BytesIO())
    torch.save(m.state_dict(), io.BytesIO())   # the weights save as usual
    vltok.unpatch(m)
    with torch.no_grad():
        assert torch.equal(m(**inp).logits, plain)


# -- 5. concurrent calls -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,kw", [("fastv", dict(keep=0.5)), ("feather", dict(keep=0.5)),
                                       ("mustdrop", dict(keep=0.5)), ("tome", dict(keep=0.5)),
                                       ("crossget", dict(keep=0.5)), ("pool", dict(keep=0.25))])
def test_threads_get_their_serial_results(model, method, kw):
    import threading

    jobs = [llava_inputs(model, [IMG_PROMPT], seed=1), llava_inputs(model, [IMG_PROMPT, P2], seed=2),
            llava_inputs(model, [P2, TEXT_PROMPT, IMG_PROMPT], seed=3, padding="right"),
            llava_inputs(model, [[1, -1, 4]], seed=4)]
    with vltok.patched(model, method, **kw) as h, torch.no_grad():
        serial = [model(**inp).logits for inp in jobs]
        serial_stats = []
        for inp in jobs:
            model(**inp)
            serial_stats.append((h.stats["tokens_in"], h.stats["tokens_out"]))
        serial_gen = [model.generate(**inp, do_sample=False, **GEN) for inp in jobs]
        got, errors = {}, []
        start = threading.Barrier(4)

        def work(t):
            try:
                start.wait()
                for r in range(3):
                    j = (t + r) % 4
                    logits = model(**jobs[j]).logits
                    stats = (h.stats["tokens_in"], h.stats["tokens_out"])   # this thread's last call
                    got[t, r] = (j, logits, stats,
                                 model.generate(**jobs[j], do_sample=False, **GEN) if r == 0 else None)
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert not errors, errors
    assert len(got) == 12
    for j, logits, stats, gen in got.values():
        assert torch.equal(logits, serial[j]) and stats == serial_stats[j]
        if gen is not None:
            assert torch.equal(gen, serial_gen[j])


# -- 6. option errors --------------------------------------------------------------------------------------------
MISSING = "/nonexistent/vltok-checkpoint.safetensors"
BAD = {
    "pool": {"rounding": ["up", 1]},
    "random": {"seed": ["abc", 1.5, -1, True], "positions": ["raster", 1]},
    "fourier": {"r": ["10", 0, (0, 2), (2,), 1.5, (100, "a")], "gain": [123, "loud"], "rounding": ["x"],
                "impl": ["cuda"], "precise": ["yes", 1]},
    "tome": {"order": ["zigzag"], "prop_attn": ["no"], "schedule": ["middle"]},
    "crossget": {"importance": ["x"], "ensemble": [3], "prop_attn": [None], "cross_tokens": [MISSING, 3],
                 "schedule": ["x"]},
    "llavamini": {"mode": ["fast"], "budget": ["x"], "K": [0, "2", 1.0], "reduce": ["mean"], "weights": [MISSING, 5]},
    "tokenshuffle": {"window": [(0, 2), 0, "2", (2, 2, 2)], "pool": ["sum"], "projector": [MISSING, 1]},
    "fastv": {"K": [0, "2", 2.0], "keep_mode": ["x"], "rope": ["yes"]},
    "feather": {"layers": ["2,3", (3, 2), (0, 2), (2,)], "a": [1.5, -0.1, "0.5"], "s2": [2], "stride": [0, 1.5],
                "keep_mode": ["x"], "preset": ["fast"], "stage1": ["both", 1]},
    "evs": {"metric": ["l1", 2], "threshold": [-0.1, "0.5", 0.2]},   # any threshold: data-dependent count
    "tmerge": {},
    "mustdrop": {"mode": ["x"], "keep_mode": ["x"], "stages": ["prefill", ("vision",), ("prefill", "x")],
                 "key_rate": [1.0, -0.1], "pruning_layers": [(-1,), "2", ()], "thr": [(0.001,), (0, 0.1)],
                 "window": [1, "3"], "window_thr": ["0.8", None], "vision_windows": [-1, 1.5], "vision_guard": ["yes"],
                 "prop_attn": [0]},
    "visionzip": {"contextual_share": [1.0, -0.1, "0.2"], "merge": ["sum"], "order": ["x"]},
    "dart": {"pivots": [0, "4", 1.5], "text_pivots": [-1, "4"], "positions": ["x", True]},
    "dart_llm": {"K": [0, "2", 2.0], "pivots": [0, "8"], "keep_mode": ["x"]},
    "dpp": {"condition": ["always", None], "negate": ["yes", 1], "positions": ["x"]},
}
CASES = [(m, k, v) for m, opts in BAD.items() for k, vals in opts.items() for v in vals]


def test_every_option_of_every_method_is_declared_and_tested():
    import inspect

    for name, info in vltok.methods().items():
        params = [p for p in inspect.signature(info.factory).parameters if p != "keep"]
        assert sorted(info.options) == sorted(params), name
        assert sorted(BAD[name]) == sorted(params), name


@pytest.fixture(scope="module")
def small():
    from tiny import tiny_llava

    return tiny_llava()


@pytest.mark.parametrize("method,key,value", CASES, ids=[f"{m}-{k}={v!r}" for m, k, v in CASES])
def test_bad_option_is_refused_naming_option_value_and_accepted(small, method, key, value):
    before = dict(small.__dict__)
    with pytest.raises(vltok.VltokError) as e:
        vltok.patch(small, method, keep=0.5, **{key: value})
    msg = str(e.value)
    assert f"{key}={value!r}" in msg and f"{key} must be" in msg, msg
    assert vltok.get_handle(small) is None and small.__dict__.keys() == before.keys()   # nothing half-applied


def test_fourier_r_larger_than_the_grid_warns(small):
    inp = llava_inputs(small, [IMG_PROMPT])
    with vltok.patched(small, "fourier", r=(100, 100)), pytest.warns(UserWarning, match="no reduction"):
        with torch.no_grad():
            small(**inp)


def test_factory_errors_are_vltok_errors(small):
    """Cross-option rules (checked by the factories) and plans impossible on this model also raise VltokError, the
    model left unpatched."""
    for method, kw, match in [("llavamini", dict(mode="trained"), "weights"),
                              ("llavamini", dict(K=2), "early_fusion"),
                              ("feather", dict(layers=(1, 100)), "layer")]:
        with pytest.raises(vltok.VltokError, match=match):
            vltok.patch(small, method, keep=0.5, **kw)
        assert vltok.get_handle(small) is None and "forward" not in small.__dict__
