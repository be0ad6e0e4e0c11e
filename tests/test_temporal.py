"""Temporal methods (evs, tmerge): the tensor functions against written-out loop references, and their use by the
video families' adapters (what reaches the projector / the LLM equals the function applied to the unpatched
features; keep=1.0 is bit-identical; images pass through; image-only families refuse)."""
from __future__ import annotations

import math

import pytest
import torch

import vltok
from vltok.methods import temporal as T
from tiny import llava_inputs
from tiny_families import deep_llava, onevision_inputs, qwen_inputs, tiny_next_video, tiny_qwen, tiny_video_llava


# ---------------------------------------------------------------------------------------------------------------
# written-out references (plain Python loops)


def ref_evs(x, count):
    Tn, h, w, d = x.shape
    n = h * w
    y = x.reshape(Tn, n, d).double()
    score = []
    for t in range(Tn):
        for i in range(n):
            if t == 0:
                s = math.inf
            else:
                a, b = y[t, i], y[t - 1, i]
                s = 1 - float(a @ b / (a.norm().clamp_min(1e-8) * b.norm().clamp_min(1e-8)))
            score.append((-s, t * n + i))
    keep = sorted(k for _, k in sorted(score)[:count])
    return keep


def ref_tmerge(x, count):
    Tn, h, w, d = x.shape
    n = h * w
    y = x.reshape(Tn, n, d).double()
    r = min(Tn * n - count, (Tn - 1) * n)
    pairs = []
    for t in range(1, Tn):
        for i in range(n):
            a, b = y[t, i], y[t - 1, i]
            pairs.append((-float(a @ b / (a.norm() * b.norm())), (t - 1) * n + i, t, i))
    chosen = {(t, i) for _, _, t, i in sorted(pairs)[:r]}
    groups = {}
    for i in range(n):
        start = 0
        for t in range(Tn):
            if (t, i) not in chosen:
                start = t
            groups.setdefault(start * n + i, []).append(y[t, i])
    keys = sorted(groups)
    return keys, torch.stack([torch.stack(groups[k]).mean(0) for k in keys])


def test_evs_hand_example():
    # seeded: with the global RNG, a changed token's L2 jump (2|x|) fell below the 1.5 threshold in some test orders
    x = torch.randn(3, 2, 2, 4, generator=torch.Generator().manual_seed(0))
    x[1] = x[0]
    x[1, 1, 1] = -x[0, 1, 1]          # position 3 changes at frame 1
    x[2] = x[1]
    x[2, 0, 0] = -x[1, 0, 0] + 0.1    # position 0 changes at frame 2
    idx, rows = T.evs(x, 6)
    assert idx.tolist() == [0, 1, 2, 3, 7, 8]
    assert torch.equal(rows, x.reshape(-1, 4)[idx])
    with pytest.raises(ValueError, match="first frame"):
        T.evs(x, 3)
    # threshold mode: the two changed tokens and frame 0
    assert T.evs_select(x, threshold=0.99).tolist() == [0, 1, 2, 3, 7, 8]
    assert T.evs_select(x, threshold=1.5, metric="l2").tolist() == [0, 1, 2, 3, 7, 8]


@pytest.mark.parametrize("shape,count", [((4, 3, 3, 8), 20), ((5, 2, 4, 6), 16), ((2, 4, 4, 3), 30)])
def test_evs_matches_reference(shape, count):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    idx, _ = T.evs(x, count)
    assert idx.tolist() == ref_evs(x, count)


@pytest.mark.parametrize("shape,count", [((4, 3, 3, 8), 20), ((5, 2, 4, 6), 16), ((3, 2, 2, 5), 9), ((3, 2, 2, 5), 4)])
def test_tmerge_matches_reference(shape, count):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[1, 0, 0] = x[0, 0, 0] * 2   # a perfectly similar pair
    idx, rows = T.tmerge(x, count)
    n = shape[1] * shape[2]
    if count >= n:
        keys, means = ref_tmerge(x, count)
        assert idx.tolist() == keys
        torch.testing.assert_close(rows, means)
    else:   # below one token per position: full-length runs (means over time) merged in space by postmerge
        from vltok.methods.postmerge import post_merge

        full = x.reshape(shape[0], n, -1).mean(0)
        pos, want = post_merge(full[None], count, "cgsm")
        assert idx.tolist() == pos[0].tolist()
        torch.testing.assert_close(rows, want[0])
    assert rows.shape == (count, shape[-1])


def test_budgets_and_images():
    r = T.make_evs(0.25).pre_llm
    assert r.video_count(4, 6, 6) == 4 * 9 and r.video_count(8, 6, 6) == 8 * 9
    assert r.video_count(16, 6, 6) == 16 * 9 and T.make_evs(0.05).pre_llm.video_count(16, 6, 6) == 16 * 3  # >= frame 0
    assert T.make_tmerge(0.05).pre_llm.video_count(16, 6, 6) == 16 * 2
    assert r.plan(6, 6).identity and r.video_count(1, 6, 6) == 36   # images / one frame: unchanged
    with pytest.raises(ValueError, match="data-dependent"):
        T.make_evs(0.5, threshold=0.9)
    with pytest.raises(ValueError, match="metric"):
        T.make_evs(0.5, metric="dot")
    with pytest.raises(ValueError, match="frames, h, w, d"):
        T.tmerge(torch.zeros(4, 3), 2)


# ---------------------------------------------------------------------------------------------------------------
# adapters


def _capture(module):
    seen = []
    h = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    return seen, h


@pytest.mark.parametrize("method", ["evs", "tmerge"])
def test_next_video_projector_gets_the_temporal_reduction(method):
    m = tiny_next_video(layers=2)
    inp = onevision_inputs(m, [[1, -2, 5]], frames=4)
    pv = inp["pixel_values_videos"]
    with torch.no_grad():
        seen, h = _capture(m.model.multi_modal_projector)
        ref = m(**inp).logits
        h.remove()
        full = seen[0]                      # [frames, 16 (4x4 pooled), C]
        with vltok.patched(m, method, keep=1.0):
            assert torch.equal(m(**inp).logits, ref)
        with vltok.patched(m, method, keep=0.5) as hd:
            seen, h = _capture(m.model.multi_modal_projector)
            m(**inp)
            h.remove()
            _, want = T.evs(full.reshape(4, 4, 4, -1), 32) if method == "evs" else T.tmerge(full.reshape(4, 4, 4, -1), 32)
            torch.testing.assert_close(seen[0].reshape(-1, full.shape[-1]), want)
            assert hd.stats["tokens_in"] == 64 and hd.stats["tokens_out"] == 32
            out = m.generate(**inp, max_new_tokens=2, do_sample=False)
            assert torch.equal(out[:, :inp["input_ids"].shape[1]], inp["input_ids"])
    assert pv is inp["pixel_values_videos"]


def test_video_llava_keeps_each_frames_cls():
    m = tiny_video_llava(layers=2)
    inp = onevision_inputs(m, [[1, -2, 5]], frames=4)
    with torch.no_grad():
        seen, h = _capture(m.model.multi_modal_projector)
        m(**inp)
        h.remove()
        full = seen[0]                      # [4, 1 + 64, C]
        with vltok.patched(m, "evs", keep=0.25) as hd:
            seen, h = _capture(m.model.multi_modal_projector)
            m(**inp)
            h.remove()
    idx, rows = T.evs(full[:, 1:].reshape(4, 8, 8, -1), 64)
    seq = []
    for f in range(4):
        seq.append(full[f, :1])
        seq.append(rows[(idx // 64) == f])
    torch.testing.assert_close(seen[0].reshape(-1, full.shape[-1]), torch.cat(seq))
    assert hd.stats["tokens_out"] == 4 + 64


def test_qwen_video_positions_and_features():
    m = tiny_qwen("2", layers=2)
    inp = qwen_inputs(m, [[1, 5, -2, 7]], (), [(4, 8, 8)])   # t=4 slices of 4x4 (after the 2x2 merger)
    inner = m.model
    with torch.no_grad():
        full = inner.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output[0]
        pos_full, _ = inner.get_rope_index(inp["input_ids"], mm_token_type_ids=inp["mm_token_type_ids"],
                                           video_grid_thw=inp["video_grid_thw"], attention_mask=inp["attention_mask"])
        ref = m(**inp).logits
        with vltok.patched(m, "tmerge", keep=1.0):
            assert torch.equal(m(**inp).logits, ref)
        with vltok.patched(m, "tmerge", keep=0.5) as hd:
            seen = []
            hk = inner.language_model.register_forward_pre_hook(
                lambda mod, args, kw: seen.append(kw.get("position_ids")), with_kwargs=True)
            out = m(**inp)
            hk.remove()
            assert hd.stats["tokens_in"] == 64 and hd.stats["tokens_out"] == 32
            got = inner.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output[0]
            gen = m.generate(**inp, max_new_tokens=2, do_sample=False, pad_token_id=0)
            assert gen.shape[1] == inp["input_ids"].shape[1] + 2
    idx, want = T.tmerge(full.reshape(4, 4, 4, -1), 32)
    torch.testing.assert_close(got, want)
    # the LLM saw 32 video tokens, each at the M-RoPE position of its run's first token
    assert out.logits.shape[1] == inp["input_ids"].shape[1] - 32
    cols = (inp["input_ids"][0] == 101).nonzero().flatten()
    pos = seen[0][-3:, 0]   # (t, h, w) rows
    assert torch.equal(pos[:, cols[0]:cols[0] + 32], pos_full[:, 0, cols[idx]])


def test_image_families_refuse_and_per_frame_methods_still_work_on_video():
    m = deep_llava("llava", layers=2)
    with pytest.raises(vltok.IncompatibleError, match="temporal"):
        vltok.patch(m, "evs", keep=0.5)
    assert vltok.get_handle(m) is None
    v = tiny_next_video(layers=2)
    inp = onevision_inputs(v, [[1, -2, 5]], frames=4)
    with torch.no_grad(), vltok.patched(v, "pool", keep=0.25) as hd:
        v(**inp)
        assert hd.stats["tokens_out"] == 4 * 4   # 2x2 per frame
