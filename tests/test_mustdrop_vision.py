"""MustDrop stage 1 (3x3 window merge after ViT layer 0): the pure functions against brute-force references, and
the full method (stages 1 + 2 + 3) on tiny random LLaVA-1.5 against an explicit reference."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vltok
from test_inllm import PROMPTS
from tiny import CLIPV, IMG, LLAMA, clip_attention_ref, llava_inputs
from vltok.methods.mustdrop import guard_mask, pick_windows, window_groups, window_merge, window_scores


# -- brute-force references (python loops over the definitions) -------------------------------------------------
def brute_groups(h, w, win):
    out = []
    for wr, wc in itertools.product(range(h // win), range(w // win)):
        out.append([(wr * win + i) * w + wc * win + j for i in range(win) for j in range(win)])
    return out


def brute_score(x, members):
    """Mean cosine over ordered pairs i != j, float64 python sums."""
    v = [x[m].double() / x[m].double().norm() for m in members]
    tot = sum(float(v[i] @ v[j]) for i in range(len(v)) for j in range(len(v)) if i != j)
    return tot / (len(v) * (len(v) - 1))


def brute_pick(scores, blocked, thr, r_w):
    """scores [B][n_win] floats (the implementation's, so exact ties stay ties), blocked [B][n_win] bools."""
    B, n = len(scores), len(scores[0])
    if r_w is None:
        r_w = min(sum(1 for j in range(n) if not blocked[b][j] and scores[b][j] >= thr) for b in range(B))
    out = []
    for b in range(B):
        cand = [j for j in range(n) if not blocked[b][j]]
        best = sorted(cand, key=lambda j: (-scores[b][j], j))[:r_w]   # ties to the lower window index
        out.append(sorted(best))
    return out


def brute_merge(x, size, pos, groups, sel, offset):
    """One sample: each selected window's tokens -> one token at its last member: sum(x*s)/sum(s), sum(s), min pos."""
    val = {i: x[i].double() for i in range(x.shape[0])}
    sz = {i: float(size[i]) for i in range(x.shape[0])}
    ps = {i: int(pos[i]) for i in range(x.shape[0])}
    removed = set()
    for wi in sel:
        mem = [m + offset for m in groups[wi]]
        dst = mem[-1]
        tot = sum(x[m].double() * float(size[m]) for m in mem)
        s = sum(float(size[m]) for m in mem)
        val[dst], sz[dst], ps[dst] = tot / s, s, min(int(pos[m]) for m in mem)
        removed |= set(mem[:-1])
    keep = [i for i in range(x.shape[0]) if i not in removed]
    return torch.stack([val[i] for i in keep]), [sz[i] for i in keep], [ps[i] for i in keep]


@pytest.mark.parametrize("h,w,win", [(9, 9, 3), (8, 8, 3), (7, 6, 3), (6, 6, 2)])
def test_window_groups(h, w, win):
    g = window_groups(h, w, win)
    assert g.tolist() == brute_groups(h, w, win)
    assert g.shape == ((h // win) * (w // win), win * win)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("h,w,n_prot,ties,guard", [(9, 9, 1, False, False), (9, 9, 1, True, True),
                                                    (8, 7, 0, True, True), (6, 9, 2, False, True)])
def test_window_merge_matches_brute_force(seed, h, w, n_prot, ties, guard):
    g = torch.Generator().manual_seed(seed)
    B, C, win = 3, 5, 3
    N = n_prot + h * w
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    groups = window_groups(h, w, win)
    if ties:   # windows 1 and 2 copy window 0 (same values in the same order): exactly equal scores
        for wi in (1, 2):
            x[:, n_prot + groups[wi]] = x[:, n_prot + groups[0]]
    # near-duplicate windows so that a threshold passes some of them
    base = torch.randn(B, 1, C, generator=g, dtype=torch.float64)
    for wi in (3,) if groups.shape[0] > 3 else ():
        x[:, n_prot + groups[wi]] = base + 0.05 * torch.randn(B, win * win, C, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1), generator=g).double()
    pos = torch.arange(N).expand(B, N) * 2   # any smallest-index bookkeeping
    scores = window_scores(x[:, n_prot:], groups)
    for b in range(B):
        for wi, mem in enumerate(groups.tolist()):
            assert scores[b, wi].item() == pytest.approx(brute_score(x[b, n_prot:], mem), abs=1e-12)
    blocked = None
    if guard:
        prot = torch.rand(B, h * w, generator=g) < 0.1
        blocked = prot[:, groups].any(-1)
        brute_blocked = [[any(bool(prot[b, m]) for m in mem) for mem in groups.tolist()] for b in range(B)]
        assert blocked.tolist() == brute_blocked
    bl = blocked.tolist() if blocked is not None else [[False] * groups.shape[0]] * B
    sl = scores.tolist()
    thr = sorted(sl[0])[len(sl[0]) // 2]   # the median of sample 0
    for r_fixed in (None, 0, 1):
        sel = pick_windows(scores, blocked, thr=thr, r_w=r_fixed)
        want = brute_pick(sl, bl, thr, r_fixed)
        assert sel.tolist() == want
        xo, so, po = window_merge(x, size, pos, groups, sel, n_prot)
        r_w = len(want[0])
        assert xo.shape == (B, N - (win * win - 1) * r_w, C)   # one rectangular count for the batch
        assert torch.equal(so.sum(1), size.sum(1))              # sizes add up to the input's
        assert torch.equal(xo[:, :n_prot], x[:, :n_prot])       # protected leading tokens untouched, in place
        for b in range(B):
            rx, rs, rp = brute_merge(x[b], size[b, :, 0], pos[b], groups.tolist(), want[b], n_prot)
            assert torch.allclose(xo[b], rx, atol=1e-12, rtol=0)
            assert so[b, :, 0].tolist() == rs and po[b].tolist() == rp


def test_threshold_count_is_the_batch_minimum_and_untouched_tokens_are_exact():
    groups = window_groups(6, 6, 3)
    scores = torch.tensor([[0.9, 0.95, 0.1, 0.85], [0.2, 0.99, 0.81, 0.3]])
    assert pick_windows(scores, None, thr=0.8).tolist() == [[0, 1], [1, 2]]   # sample 0 has 3, sample 1 has 2
    blocked = torch.tensor([[False, True, False, False], [False, False, False, False]])
    assert pick_windows(scores, blocked, thr=0.8).tolist() == [[0, 3], [1, 2]]
    assert pick_windows(scores, None, thr=1.5).shape == (2, 0)
    x = torch.randn(2, 37, 4)
    out, size, pos = window_merge(x, torch.ones(2, 37, 1), torch.arange(37).expand(2, 37), groups,
                                  torch.tensor([[2], [0]]), 1)
    # sample 1 merged window 0 (patches 0,1,2,6,7,8,12,13,14 -> token 1 + 14); every other token is bit-exact
    keep = [i for i in range(37) if i not in (1, 2, 3, 7, 8, 9, 13, 14)]
    assert torch.equal(out[1, [j for j, i in enumerate(keep) if i != 15]], x[1, [i for i in keep if i != 15]])
    assert torch.allclose(out[1, keep.index(15)], x[1, [1, 2, 3, 7, 8, 9, 13, 14, 15]].mean(0))
    with pytest.raises(vltok.IncompatibleError, match="guarded"):
        pick_windows(scores, torch.ones(2, 4, dtype=torch.bool), r_w=1)


def test_guard_is_the_top_cls_attention():
    g = torch.Generator().manual_seed(0)
    B, N, H, d = 2, 10, 2, 4
    keys, query = torch.randn(B, N, H, d, generator=g), torch.randn(B, H, d, generator=g)
    keys[:, 4] = keys[:, 6]   # a tie: the lower index wins
    m = guard_mask(keys, query, None, 1, 0.25)
    att = torch.softmax(torch.einsum("bhd,bnhd->bhn", query, keys) / 2, -1).mean(1)[:, 1:]
    for b in range(B):
        want = sorted(range(N - 1), key=lambda j: (-float(att[b, j]), j))[:math.ceil(0.25 * (N - 1))]
        assert m[b].nonzero().flatten().tolist() == sorted(want)
    assert guard_mask(keys, None, None, 0, 0.25) is None


# -- the full method on LLaVA-1.5 -----------------------------------------------------------------------------------
def md_llava(attn="sdpa", layers=6, vision_layers=3, seed=0, image_size=72):
    """Tiny LLaVA-1.5 with a 9x9 patch grid (72 px / 8): nine complete 3x3 windows."""
    torch.manual_seed(seed)
    vc = dict(CLIPV, num_hidden_layers=vision_layers, image_size=image_size)
    cfg = LlavaConfig(vision_config=vc, text_config=dict(LLAMA, num_hidden_layers=layers), image_token_index=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      image_seq_length=(image_size // 8) ** 2)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def smooth_pixels(n, seed, flat=48):
    """Images with flat 24 px cells (one 3x3 window each) on the left and noise on the right third, so some windows
    are near-duplicates after layer 0 and some are not."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 3, 3, generator=g)
    noise = torch.randn(n, 3, 72, 72, generator=g)
    noise[..., :flat] *= 0.02
    return F.interpolate(coarse, size=(72, 72), mode="nearest") + noise


def manual_features(m, pixel_values, thr, key_rate, r_w=None):
    """Explicit reference: the CLIP tower written out layer by layer (eager softmax), layer 0 in full, then the
    guard from layer 0's CLS attention, window scores, the batch-minimum count and the merge by the pure
    functions, then the later layers with log(size) added to their logits by hand; -> (projector features, the
    selected windows, the last layer's CLS attention over the merged patches = stage 2's key-set score)."""
    vt = m.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    x = vt.pre_layrnorm(vt.embeddings(pixel_values))
    size = None
    used = len(vt.encoder.layers) - 1   # vision_feature_layer = -2
    for i, layer in enumerate(vt.encoder.layers):
        x, _, _, probs = clip_attention_ref(layer, x, size)
        B, N, _ = x.shape
        x = x + layer.mlp(layer.layer_norm2(x))
        if i == 0:
            groups = window_groups(9, 9, 3)
            cls = probs[:, :, 0, 1:].mean(1)                                   # [B, 81] CLS attention, layer 0
            n_key = math.ceil(key_rate * 81 - 1e-9)
            prot = torch.zeros(B, 81, dtype=torch.bool)
            for b in range(B):
                for j in sorted(range(81), key=lambda j: (-cls[b, j].item(), j))[:n_key]:
                    prot[b, j] = True
            blocked = prot[:, groups].any(-1) if n_key else None
            scores = window_scores(x[:, 1:], groups)
            sel = pick_windows(scores, blocked, thr=thr, r_w=r_w)
            size = torch.ones(B, N, 1)
            x, size, _ = window_merge(x, size, torch.arange(N).expand(B, N), groups, sel, 1)
        if i == used - 1:
            feats = m.model.multi_modal_projector(x[:, 1:])
    return feats, sel, probs[:, :, 0, 1:].mean(1)


def embeds_reference(m, prompts, feats, padding="left"):
    k = feats.shape[1]
    red = llava_inputs(m, prompts, padding=padding, n_ph=k)
    ids = red["input_ids"]
    emb = m.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
    return m(inputs_embeds=emb, attention_mask=red["attention_mask"]).logits, red["attention_mask"].bool()


NO_DROP = dict(mode="reference", thr=(1e-30, 1e-30), pruning_layers=(1, 3))   # stage 2 keeps every token


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("guard,thr", [(True, 0.5), (False, 0.5), (True, -1.0)])
def test_stage1_equals_explicit_reference(attn, guard, thr):
    m = md_llava(attn)
    inp = llava_inputs(m, PROMPTS)
    inp["pixel_values"] = smooth_pixels(2, 0)
    saved = {a: b.clone() for a, b in inp.items()}
    seen = []
    with vltok.patched(m, "mustdrop", window_thr=thr, vision_guard=guard, **NO_DROP) as h:
        sel_fn = h.method.in_llm.select

        def spy(cut, view, scores):
            seen.append(view.saliency)
            return sel_fn(cut, view, scores)

        h.method.in_llm.select = spy
        out = m(**inp).logits
        stats = h.stats
    assert all(torch.equal(inp[a], saved[a]) for a in inp)
    with torch.no_grad():
        feats, sel, cls_last = manual_features(m, inp["pixel_values"], thr, 0.08 if guard else 0.0)
        ref, valid = embeds_reference(m, PROMPTS, feats)
    assert all((seen[b] - cls_last[b]).abs().max() < 1e-5 for b in range(2))   # key-set score after the merge
    r_w = sel.shape[1]
    assert 1 <= r_w < 9, "the test images must merge some windows but not all"
    n_v = 81 - 8 * r_w
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)
    assert stats["vision_tokens_per_layer"][:2] == [82, 82 - 8 * r_w]
    assert stats["stage_tokens"] == {"native": 81, "llm_input": n_v, "cuts": {2: n_v, 4: n_v}, "final": n_v}
    assert stats["tokens_in"] == 2 * 81 and stats["tokens_out"] == 2 * n_v


def test_threshold_that_merges_nothing_is_bit_identical_to_no_stage1():
    m = md_llava()
    inp = llava_inputs(m, PROMPTS)
    ref = m(**inp).logits
    kw = dict(keep=0.5, pruning_layers=(1, 3))
    with vltok.patched(m, "mustdrop", stages=("prefill", "decode"), **kw):
        want = m(**inp).logits
        want_gen = m.generate(**inp, max_new_tokens=4, do_sample=False)
    with vltok.patched(m, "mustdrop", window_thr=1.5, **kw) as h:
        assert torch.equal(m(**inp).logits, want)
        assert torch.equal(m.generate(**inp, max_new_tokens=4, do_sample=False), want_gen)
        assert h.stats["stage_tokens"]["llm_input"] == 81
    with vltok.patched(m, "mustdrop", keep=1.0):
        assert torch.equal(m(**inp).logits, ref)
    assert torch.equal(m(**inp).logits, ref)


def test_full_method_generate_batch_equals_singles_and_budget():
    """Stages 1 + 2 + 3; a fixed window count (vision_windows) makes the batch independent of its composition,
    so a left-padded batch of 2 equals two single calls."""
    m = md_llava()
    inp = llava_inputs(m, PROMPTS)
    inp["pixel_values"] = smooth_pixels(2, 1)
    kw = dict(keep=0.4, pruning_layers=(1, 3), vision_windows=3, key_rate=0.05)
    L = inp["input_ids"].shape[1]
    with vltok.patched(m, "mustdrop", **kw) as h:
        both = m.generate(**inp, max_new_tokens=4, do_sample=False)
        st = h.stats["stage_tokens"]
        assert st["native"] == 81 and st["llm_input"] == 57 and 57 > st["cuts"][2] > st["cuts"][4] >= 3
        # the budget counts the native 81 tokens: layers 0-1 see 57, the rest the cut counts
        n = h.stats["tokens_per_layer"]
        assert n[:2] == [57, 57] and sum(n) / (6 * 81) <= 0.4 + 1 / 81
        for i, p in enumerate(PROMPTS):
            one = llava_inputs(m, [p])
            one["pixel_values"] = inp["pixel_values"][i:i + 1]
            single = m.generate(**one, max_new_tokens=4, do_sample=False)[0, one["input_ids"].shape[1]:]
            assert torch.equal(both[i, L:L + single.numel()], single)
    assert torch.equal(both[:, :L], inp["input_ids"])
    # threshold mode: the batch merges the minimum count of its images (the reference's batch-uniform rule)
    inp["pixel_values"] = torch.cat([smooth_pixels(1, 1), smooth_pixels(1, 2, flat=24)])   # fewer flat windows
    counts = []
    for i in range(2):
        with vltok.patched(m, "mustdrop", window_thr=0.5, **NO_DROP) as h:
            one = llava_inputs(m, [PROMPTS[i]])
            one["pixel_values"] = inp["pixel_values"][i:i + 1]
            m(**one)
            counts.append(h.stats["stage_tokens"]["llm_input"])
    assert counts[0] < counts[1]
    with vltok.patched(m, "mustdrop", window_thr=0.5, **NO_DROP) as h:
        m(**inp)
        assert [im["tokens_out"] for im in h.stats["images"]] == [max(counts)] * 2


def test_dinov2_tower_and_bad_options():
    dino = dict(model_type="dinov2", hidden_size=32, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=4,
                image_size=72, patch_size=8)
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=dino, text_config=dict(LLAMA, num_hidden_layers=6), image_token_index=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=81)
    m = LlavaForConditionalGeneration(cfg).eval()
    inp = llava_inputs(m, PROMPTS)
    with vltok.patched(m, "mustdrop", keep=0.5, pruning_layers=(1, 3), window_thr=-1.0) as h:
        out = m(**inp).logits
        assert h.stats["stage_tokens"]["llm_input"] < 81
        assert out.shape[1] == inp["input_ids"].shape[1] - (81 - h.stats["stage_tokens"]["final"])
    with pytest.raises(vltok.VltokError, match="vision_windows"):
        vltok.patch(md_llava(), "mustdrop", keep=0.5, vision_windows=9)
    with pytest.raises(ValueError, match="window"):
        vltok.api.build_method("mustdrop", 0.5, window=1)
