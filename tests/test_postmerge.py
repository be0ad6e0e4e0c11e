"""tome / crossget with schedule="post" (merging after the vision encoder): the pure function against a reference
that tracks each group's members explicitly, and the adapters (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / 2.5-VL) against
explicit references; schedule="auto" picks the post placement where a family has no vision stage."""
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vltok
from test_cgsm import brute_force
from test_qwen_positions import own_positions
from test_llava import NEXT_PROMPTS, NEXT_SIZES, PROMPTS, manual_llava, next_reference
from tiny import IMG, llava_inputs, llava_next_inputs, tiny_llava, tiny_llava_next
from tiny_families import VID, qwen_inputs, tiny_qwen
from vltok.methods.postmerge import PostMergeReducer, post_merge
from vltok.methods.tome import spread_schedule

MATCHERS = {"tome": "bipartite", "crossget": "cgsm"}


def group_reference(x, n_out, matcher):
    """One sample x [N, C] (float64): merge rounds of at most half the tokens on the normalised group means, each
    group a list of original indices; returns (each group's smallest index ascending, the groups' plain means)."""
    groups = [[i] for i in range(x.shape[0])]
    while len(groups) > n_out:
        step = min(len(groups) - n_out, len(groups) // 2)
        means = torch.stack([x[g].mean(0) for g in groups])
        metric = F.normalize(means, dim=-1)
        if matcher == "bipartite":   # A = even places, B = odd places; the best-matched A tokens join their partner
            a, b = list(range(0, len(groups), 2)), list(range(1, len(groups), 2))
            best = [(max((metric[i] @ metric[j]).item() for j in b), i) for i in a]
            partner = {i: max(b, key=lambda j: ((metric[i] @ metric[j]).item(), -j)) for i in a}
            src = [i for _, i in sorted(best, key=lambda t: (-t[0], a.index(t[1])))[:step]]
            dst = [partner[i] for i in src]
        else:
            src, dst = brute_force(metric, torch.zeros(len(groups), dtype=torch.float64), step,
                                   [False] * len(groups))
        merged = {j: list(groups[j]) for j in range(len(groups)) if j not in src}
        for s, d in zip(src, dst):
            merged[d] += groups[s]
        groups = sorted((sorted(g) for g in merged.values()), key=lambda g: g[0])
    return torch.tensor([g[0] for g in groups]), torch.stack([x[g].mean(0) for g in groups])


@pytest.mark.parametrize("matcher", ["bipartite", "cgsm"])
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("N,n_out", [(37, 6), (24, 12), (16, 1)])
def test_post_merge_equals_group_reference(matcher, seed, N, n_out):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N, 6, generator=g, dtype=torch.float64)
    x[1, 5] = x[1, 9]   # exact duplicates: a tie the index must break
    saved = x.clone()
    idx, y = post_merge(x, n_out, matcher)
    assert torch.equal(x, saved)
    assert idx.shape == (2, n_out) and y.shape == (2, n_out, 6)
    for b in range(2):
        ref_idx, ref_y = group_reference(x[b], n_out, matcher)
        assert idx[b].tolist() == ref_idx.tolist()
        assert torch.allclose(y[b], ref_y, atol=1e-12)


def test_post_merge_half_precision_and_errors():
    x = torch.randn(1, 20, 8).to(torch.bfloat16)
    idx, y = post_merge(x, 5, "cgsm")
    assert y.dtype == torch.bfloat16 and (idx.diff(dim=-1) > 0).all()
    with pytest.raises(ValueError, match="n_out"):
        post_merge(x, 0, "cgsm")
    with pytest.raises(ValueError, match="matcher"):
        post_merge(x, 5, "greedy")


@pytest.mark.parametrize("method", ["tome", "crossget"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_llava_post_equals_explicit_reference(method, padding):
    """LLaVA-1.5 has a vision stage, so 'post' is asked for explicitly; the reference is the unpatched model fed
    the group means (reference above) as inputs_embeds."""
    m = tiny_llava()
    k = round(0.2 * 64)

    def fn(x):
        return torch.stack([group_reference(s.double(), k, MATCHERS[method])[1] for s in x]).to(x.dtype)

    ref = manual_llava(m, PROMPTS, fn, k, padding=padding)
    inp = llava_inputs(m, PROMPTS, padding=padding)
    with vltok.patched(m, method, keep=0.2, schedule="post") as h:
        assert h.method.vision is None and isinstance(h.method.pre_llm, PostMergeReducer)
        out = m(**inp)
    valid = llava_inputs(m, PROMPTS, padding=padding, n_ph=k)["attention_mask"].bool()
    assert torch.allclose(out.logits[valid], ref.logits[valid], atol=1e-5)
    assert h.stats["tokens_out"] == 2 * k


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_next_auto_merges_after_packing_with_every_row_newline(method):
    """LLaVA-NeXT: the base tile and the unpadded map are merged separately; every kept token sits in its earliest
    member's row, each row ends with its newline; reference = the unpatched model on those features."""
    m = tiny_llava_next()
    keep = 0.25
    inp = llava_next_inputs(m, NEXT_PROMPTS, NEXT_SIZES, padding="right")
    merge = lambda x: group_reference(x.double(), round(keep * x.shape[0]), MATCHERS[method])  # noqa: E731

    def merge_map(grid, newline):
        h_u, w_u, C = grid.shape
        idx, merged = merge(grid.reshape(h_u * w_u, C))
        return torch.cat(sum(([merged[idx // w_u == r].float(), newline[None]] for r in range(h_u)), []))

    ref, am, reduced = next_reference(m, inp, lambda t: merge(t)[1].float(), merge_map)
    with vltok.patched(m, method, keep=keep) as h:   # schedule="auto": NeXT has no vision stage
        assert h.method.params == {"schedule": "post"}
        out = m(**inp).logits
        counts = [im["tokens_out"] for im in h.stats["images"]]
        a = m.generate(**inp, max_new_tokens=4, do_sample=False)
        b = m.generate(**inp, max_new_tokens=4, do_sample=False, use_cache=False)
    valid = am.bool()
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)
    assert torch.equal(a, b)
    assert counts == reduced


QP = [[1, 5, -1, 7, 8], [1, -2, 9, -1, 3, 4, 5, 6]]
QI = [(1, 8, 8), (1, 4, 8)]
QV = [(2, 8, 8)]


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_qwen_post_equals_masked_reference_with_earliest_member_positions(version, method):
    """Reference: the unpatched model on the FULL sequence with its native 3-D positions, each kept token's
    feature replaced by its group's mean (at the group's earliest member), the other visual tokens masked out of
    attention; the text logits of the patched (shortened) run must match."""
    m = tiny_qwen(version)
    keep = 0.3
    inp = qwen_inputs(m, QP, QI, QV, padding="left")
    with torch.no_grad():
        img = m.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output
        vid = m.model.get_video_features(inp["pixel_values_videos"], inp["video_grid_thw"]).pooler_output
        pos, delta = m.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp["image_grid_thw"],
                                            inp["video_grid_thw"], attention_mask=inp["attention_mask"])
    ids = inp["input_ids"]
    keep_mask = inp["attention_mask"].bool().clone()
    full = {"image": [], "video": []}
    for kind, feats, grids, tok in (("image", img, QI, IMG), ("video", vid, QV, VID)):
        cols = (ids == tok).nonzero().tolist()
        start = 0
        for f, (t, hh, ww) in zip(feats, grids):
            n = (hh // 2) * (ww // 2)
            f_new = f.clone()
            for s in range(t):
                idx, merged = group_reference(f[s * n:(s + 1) * n].double(), round(keep * n), MATCHERS[method])
                f_new[s * n + idx] = merged.float()
                for i in set(range(n)) - set(idx.tolist()):
                    b, c = cols[start + s * n + i]
                    keep_mask[b, c] = False
            full[kind].append(f_new)
            start += t * n
    m.model.get_image_features = lambda *a, **k: BaseModelOutputWithPooling(pooler_output=tuple(full["image"]))
    m.model.get_video_features = lambda *a, **k: BaseModelOutputWithPooling(pooler_output=tuple(full["video"]))
    try:
        with torch.no_grad():
            ref = m(input_ids=ids, attention_mask=keep_mask.long(), position_ids=pos,
                    mm_token_type_ids=inp["mm_token_type_ids"], pixel_values=inp["pixel_values"],
                    image_grid_thw=inp["image_grid_thw"], pixel_values_videos=inp["pixel_values_videos"],
                    video_grid_thw=inp["video_grid_thw"])
    finally:
        del m.model.get_image_features, m.model.get_video_features
    calls = []
    orig = m.model.visual.forward
    m.model.visual.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with vltok.patched(m, method, keep=keep, schedule="post") as h:   # (auto merges inside the Qwen tower)
            assert h.method.params == {"schedule": "post"}
            out = m(**inp)
            assert len(calls) == 2, "the vision tower runs once per modality (encoded ahead, then reused)"
            kp = h.kept_positions
            removed = inp["attention_mask"].sum(1) - (kp >= 0).sum(1)
            assert torch.equal(m.model.rope_deltas.flatten(), delta.flatten() + removed)
            a = m.generate(**inp, max_new_tokens=5, do_sample=False, pad_token_id=0)
            b = m.generate(**inp, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False)
    finally:
        del m.model.visual.forward
    assert torch.equal(a, b), "cached decoding (rope_deltas) must equal recomputing the whole prefix"
    new_ids = ids.gather(1, kp.clamp(min=0))
    text = (kp >= 0) & (new_ids != IMG) & (new_ids != VID)
    ref_cols = ref.logits.gather(1, kp.clamp(min=0)[..., None].expand(-1, -1, ref.logits.shape[-1]))
    assert torch.allclose(out.logits[text], ref_cols[text], atol=1e-5)


def test_schedule_choice_and_errors():
    m = tiny_llava()
    with vltok.patched(m, "crossget", keep=0.3) as h:   # auto on a family with a vision stage: inside the encoder
        assert h.method.vision is not None and h.method.pre_llm is None
    q = tiny_qwen("2")
    with vltok.patched(q, "tome", keep=0.3, schedule="constant") as h:   # Qwen: inside the tower (qwen_tower.py)
        assert h.method.vision is not None
    assert vltok.get_handle(q) is None
    with pytest.raises(ValueError, match="schedule"):
        vltok.patch(m, "tome", keep=0.3, schedule="sometimes")
    assert spread_schedule(100, 0.5, 5, late=True) == [0, 0, 17, 17, 16]
    assert spread_schedule(100, 0.5, 8, early=True) == [25, 25, 0, 0, 0, 0, 0, 0]
    assert spread_schedule(100, 0.5, 5) == [10] * 5


def test_late_schedule_merges_only_in_the_second_half():
    from tiny import CLIPV
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from tiny import LLAMA

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=dict(CLIPV, num_hidden_layers=5), text_config=LLAMA, image_token_index=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=64)
    m = LlavaForConditionalGeneration(cfg).eval()
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "tome", keep=0.25, schedule="late") as h:
        m(**inp)
        per_layer = h.stats["vision_tokens_per_layer"]
    # 4 layers feed the projector: layers 0-1 keep all 65 tokens, layers 2-3 merge 24 each -> 16 patches + CLS
    assert per_layer[:3] == [65, 65, 65] and per_layer[4] == 17 and h.stats["tokens_out"] == 2 * 16


@pytest.mark.parametrize("rows", [3, 4])
def test_qwen_post_with_caller_positions_equals_own(rows):
    """Caller-supplied M-RoPE positions (the model's own, [3, B, S] or [4, B, S]) need the kept indices before
    the forward: the features are encoded ahead, and the result equals the run with vltok's own positions."""
    m = tiny_qwen("2")
    inp = qwen_inputs(m, QP, QI, QV, padding="left")
    pos = own_positions(m, inp, rows)
    with vltok.patched(m, "crossget", keep=0.3):
        own = m(**inp).logits
        out = m(**inp, position_ids=pos).logits
    assert torch.allclose(out, own, atol=1e-6)
