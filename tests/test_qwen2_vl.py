"""Qwen2-VL / Qwen2.5-VL: images and videos, per-frame reduction, M-RoPE on a compressed grid copy (resampling)
or original positions of kept tokens (selection), rope_deltas for decoding; explicit references."""
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vltok
from test_fourier import fft_reference
from tiny import IMG
from tiny_families import VID, qwen_inputs, tiny_qwen
from vltok.methods.baselines import pool_grid, random_indices

PROMPTS = [[1, 5, -1, 7, 8], [1, -2, 9, -1, 3, 4, 5, 6]]
IMAGES = [(1, 8, 8), (1, 4, 8)]      # in patches; merged grids 4x4 and 2x4
VIDEOS = [(2, 8, 8)]                 # 2 temporal slices of 4x4


def native_features(m, inp):
    with torch.no_grad():
        img = m.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
        vid = m.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output
    return list(img), list(vid)


def frames(grid):
    t, h, w = grid
    return t, h // 2, w // 2


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method,fn", [
    ("fourier", lambda x, h, w, r_h, r_w: fft_reference(x.double(), h, w, r_h, r_w, "resize").float()),
    ("pool", lambda x, h, w, r_h, r_w: pool_grid(x, h, w, r_h, r_w)),
])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_resampling_equals_unpatched_model_on_reduced_features_and_compressed_grid(version, method, fn, padding):
    """Reference: the UNPATCHED model fed hand-reduced features (its feature calls replaced on the instance) and a compressed grid copy
    (t, 2 r_h, 2 r_w) for its own M-RoPE computation."""
    m = tiny_qwen(version)
    keep = 0.3
    inp = qwen_inputs(m, PROMPTS, IMAGES, VIDEOS, padding=padding)
    saved = {k: v.clone() for k, v in inp.items()}
    img, vid = native_features(m, inp)
    red, small, counts = {"image": [], "video": []}, {"image": [], "video": []}, []
    for kind, feats, grids in (("image", img, IMAGES), ("video", vid, VIDEOS)):
        for f, g in zip(feats, grids):
            t, h, w = frames(g)
            r_h, r_w = round(h * keep ** 0.5), round(w * keep ** 0.5)
            x = f.view(t, h * w, -1)
            red[kind].append(fn(x, h, w, r_h, r_w).reshape(-1, f.shape[-1]))
            small[kind].append([t, 2 * r_h, 2 * r_w])
            counts.append(t * r_h * r_w)
    ref_inp = qwen_inputs(m, PROMPTS, IMAGES, VIDEOS, padding=padding, reduced=counts)
    # the unpatched model's own feature calls return the hand-reduced features (an instance attribute for the
    # reference forward only; transformers 5.17 has no mm_encoder_outputs argument, 5.23 has)
    m.model.get_image_features = lambda *a, **k: BaseModelOutputWithPooling(pooler_output=tuple(red["image"]))
    m.model.get_video_features = lambda *a, **k: BaseModelOutputWithPooling(pooler_output=tuple(red["video"]))
    try:
        with torch.no_grad():
            ref = m(input_ids=ref_inp["input_ids"], attention_mask=ref_inp["attention_mask"],
                    mm_token_type_ids=ref_inp["mm_token_type_ids"], pixel_values=inp["pixel_values"],
                    pixel_values_videos=inp["pixel_values_videos"],
                    image_grid_thw=torch.tensor(small["image"]), video_grid_thw=torch.tensor(small["video"]))
    finally:
        del m.model.get_image_features, m.model.get_video_features
    with vltok.patched(m, method, keep=keep) as h:
        out = m(**inp)
    for k in inp:
        assert torch.equal(inp[k], saved[k]), f"caller's {k} was modified"
    valid = ref_inp["attention_mask"].bool()
    assert out.logits.shape == ref.logits.shape
    assert torch.allclose(out.logits[valid], ref.logits[valid], atol=1e-5)
    assert h.stats["tokens_in"] == 16 + 8 + 32 and h.stats["tokens_out"] == sum(counts)
    assert [i["tokens_out"] for i in h.stats["images"]] == counts


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_selection_keeps_original_positions(version):
    """Reference: the same model on the FULL sequence with the dropped visual tokens masked out of attention and
    the unpatched 3-D positions; the kept columns' logits must match the patched (shortened) run."""
    m = tiny_qwen(version)
    keep = 0.4
    inp = qwen_inputs(m, PROMPTS, IMAGES, VIDEOS, padding="left")
    with torch.no_grad():
        pos, delta = m.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp["image_grid_thw"],
                                            inp["video_grid_thw"], attention_mask=inp["attention_mask"])
    am = inp["attention_mask"].clone()
    ids = inp["input_ids"]
    keep_mask = am.bool().clone()
    # visual items in splice order: images row-major, then videos row-major (one run each)
    for tok, grids in ((IMG, IMAGES), (VID, VIDEOS)):
        cols = (ids == tok).nonzero().tolist()
        start = 0
        for g in grids:
            t, h, w = frames(g)
            n, k = h * w, round(keep * h * w)
            sel = random_indices(n, k, 0)
            run = cols[start:start + t * n]
            for s in range(t):
                dropped = set(range(n)) - set(sel.tolist())
                for i in dropped:
                    b, c = run[s * n + i]
                    keep_mask[b, c] = False
            start += t * n
    am_ref = keep_mask.long()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am_ref, position_ids=pos, mm_token_type_ids=inp["mm_token_type_ids"],
                pixel_values=inp["pixel_values"], image_grid_thw=inp["image_grid_thw"],
                pixel_values_videos=inp["pixel_values_videos"], video_grid_thw=inp["video_grid_thw"])
    with vltok.patched(m, "random", keep=keep) as h:
        out = m(**inp)
        kp = h.kept_positions
        removed = int(inp["attention_mask"].sum() - (kp >= 0).sum())
        n_removed_rows = (inp["attention_mask"].sum(1) - (kp >= 0).sum(1))
        assert torch.equal(m.model.rope_deltas.flatten(), (delta.flatten() + n_removed_rows))
    assert removed == (16 + 8 + 32) - h.stats["tokens_out"]
    # compare on kept real columns: map each new column to the reference's column via the rewrite ... but the
    # rewrite keeps the FIRST k placeholders of a run; the features there are those of the selected tokens, so the
    # matching reference column is the selected token's column: compare text columns (all kept), which see every
    # kept visual token through attention
    new_ids = ids.gather(1, kp.clamp(min=0))
    text = (kp >= 0) & (new_ids != IMG) & (new_ids != VID)
    ref_cols = ref.logits.gather(1, kp.clamp(min=0)[..., None].expand(-1, -1, ref.logits.shape[-1]))
    assert torch.allclose(out.logits[text], ref_cols[text], atol=1e-5)


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method", ["fourier", "pool", "random"])
def test_keep1_exact_and_generate_cached_equals_uncached(version, method):
    m = tiny_qwen(version)
    inp = qwen_inputs(m, PROMPTS, IMAGES, VIDEOS)
    ref = m(**inp).logits
    ref_gen = m.generate(**inp, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with vltok.patched(m, method, keep=1.0):
        assert torch.equal(m(**inp).logits, ref)
        assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False, pad_token_id=0), ref_gen)
    with vltok.patched(m, method, keep=0.3) as h:
        a = m.generate(**inp, max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = m.generate(**inp, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
        assert h.stats["tokens_out"] < h.stats["tokens_in"]
    L = inp["input_ids"].shape[1]
    assert torch.equal(a, b), "cached decoding (rope_deltas) must equal recomputing the whole prefix"
    assert torch.equal(a[:, :L], inp["input_ids"])
    assert torch.equal(m(**inp).logits, ref)


def test_batch_equals_singles():
    m = tiny_qwen("2")
    batch = qwen_inputs(m, [[1, 5, -1, 7], [1, 2, 3, 4, -1, 9]], [(1, 8, 8), (1, 4, 8)], padding="left")
    with vltok.patched(m, "fourier", keep=0.3):
        out = m.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        n0 = 64
        for i, (p, g) in enumerate(zip([[1, 5, -1, 7], [1, 2, 3, 4, -1, 9]], [(1, 8, 8), (1, 4, 8)])):
            one = qwen_inputs(m, [p], [g])
            one["pixel_values"] = batch["pixel_values"][:n0] if i == 0 else batch["pixel_values"][n0:]
            s = m.generate(**one, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(out[i, -4:], s[0, -4:])


def test_missing_mm_token_type_ids_is_a_clear_error():
    m = tiny_qwen("2")
    inp = qwen_inputs(m, PROMPTS[:1], IMAGES[:1])
    inp.pop("mm_token_type_ids")
    with vltok.patched(m, "fourier", keep=0.3):
        with pytest.raises(ValueError, match="mm_token_type_ids"):   # the model's own error (tests/test_peer_fixes.py)
            m(**inp)


INLLM = [("fastv", dict(keep=0.5, K=2)), ("feather", dict(keep=0.5))]
SPECIAL = [IMG, VID, VID + 1, VID + 2]   # never generated here: a generated placeholder would break the reference


def _qwen_positions(m, inp):
    with torch.no_grad():
        return m.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp.get("image_grid_thw"),
                                      inp.get("video_grid_thw"), attention_mask=inp["attention_mask"])[0]


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method,kw", INLLM)
def test_inllm_equals_masked_reference_with_original_mrope_positions(version, method, kw):
    """In-LLM pruning on Qwen: the unpatched model on the full sequence (its own 3-D positions), with the dropped
    visual keys masked out per layer from the cut on (tests/test_inllm.py's reference); images and a video, one
    grid per frame; then greedy decoding on the pruned cache against the same reference."""
    from test_inllm import assert_same_until_eos, masked_reference

    m = tiny_qwen(version, layers=6)
    prompts = [[1, 5, -1, 7, -2, 8], [1, 2, 3, -1, 4, -2, 9]]
    inp = qwen_inputs(m, prompts, [(1, 8, 8), (1, 8, 8)], [(2, 8, 8), (2, 8, 8)], padding="left")
    with vltok.patched(m, method, **kw) as h:
        out = m(**inp).logits
        cols, final = h.inllm_prefill_columns, h.inllm_kept_columns
        assert h.stats["tokens_in"] == 2 * (16 + 32) and h.stats["prune_layers"]
        gen = m.generate(**inp, max_new_tokens=4, do_sample=False, pad_token_id=0, suppress_tokens=SPECIAL)
        gen_cols = h.inllm_layer_columns
    ref = masked_reference(m, inp, cols, position_ids=_qwen_positions(m, inp))
    ref_kept = ref[torch.arange(2)[:, None], final]
    real = inp["attention_mask"].gather(1, final).bool()
    assert out.shape[1] == final.shape[1] < inp["input_ids"].shape[1]
    assert (out[real] - ref_kept[real]).abs().max() < 1e-5
    # greedy decoding: generated tokens continue M-RoPE after the unpruned prompt (rope_deltas unchanged)
    L = inp["input_ids"].shape[1]
    cur = dict(inp)
    for t in range(4):
        pos = _qwen_positions(m, cur)
        logits = masked_reference(m, cur, gen_cols, extra=t, position_ids=pos)
        nxt = logits[:, -1].index_fill(-1, torch.tensor(SPECIAL), float("-inf")).argmax(-1, keepdim=True)
        cur = dict(cur, input_ids=torch.cat([cur["input_ids"], nxt], 1),
                   attention_mask=torch.cat([cur["attention_mask"], torch.ones_like(nxt)], 1),
                   mm_token_type_ids=torch.cat([cur["mm_token_type_ids"], torch.zeros_like(nxt)], 1))
    assert_same_until_eos(gen[:, L:], cur["input_ids"][:, L:])
