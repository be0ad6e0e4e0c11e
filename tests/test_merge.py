"""Vision-stage merging: CGSM and ToMe against brute-force references, invariants, and the LLaVA integration."""
import math

import pytest
import torch
import torch.nn.functional as F

import vltok
from tiny import CLIPV, IMG, LLAMA, clip_attention_ref, llava_inputs, merge_ref, tiny_llava
from vltok.methods.crossget import cgsm_match, cgsm_merge, importance
from vltok.methods.tome import bipartite_merge, round_sizes, spread_schedule
from vltok.vision import size_bias

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, 11, 12, 13, 14, -1, 15, 16, 17, 18]]


# -- brute-force references (python loops over the definitions) -------------------------------------------------
def brute_cgsm(metric, imp, r, n_prot):
    """One sample: metric [N, d] normalised, imp [N] -> (sources sorted by score, destinations).

    Similarities come from the same fp32 GEMM as the implementation (so exact ties stay ties); all the
    combinatorics (row maxima, ranks, allowed edges, scores, argmax) are python loops."""
    N = metric.shape[0]
    S = (metric @ metric.T).tolist()
    blocked = lambda i, j: i == j or i < n_prot or j < n_prot
    rowmax = [max([S[i][j] for j in range(N) if not blocked(i, j)], default=-math.inf) for i in range(N)]
    order = sorted(range(N), key=lambda i: -rowmax[i])          # python's sort is stable: ties by index
    rank = {i: p for p, i in enumerate(order)}
    score = []
    for i in range(N):
        allowed = [S[i][j] for j in range(N) if not blocked(i, j) and rank[j] > rank[i]]
        masked = max(allowed, default=-math.inf)
        score.append(math.inf if i < n_prot else float(imp[i] - torch.tensor(masked, dtype=torch.float32)))
    src = sorted(range(N), key=lambda i: score[i])[:r]
    dst = []
    for s in src:
        best, arg = -math.inf, None
        for j in range(N):
            if j in src or j < n_prot or j == s:
                continue
            if S[s][j] > best:
                best, arg = S[s][j], j
        dst.append(arg)
    return src, dst


def brute_merge(x, size, imp, src, dst, ensemble):
    """One sample: x [N, C], size [N] -> merged [N - r, C], sizes, kept original indices."""
    u = {i: x[i].double() * float(size[i]) for i in range(x.shape[0])}
    s = {i: float(size[i]) for i in range(x.shape[0])}
    ud = {j: u[j].clone() for j in set(dst)}
    for a, b in zip(src, dst):
        if ensemble == "importance":
            e0, e1 = math.exp(float(imp[a])), math.exp(float(imp[b]))
            w0, w1 = 2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1)
        else:
            w0 = w1 = 1.0
        ud[b] = ud[b] + w0 * u[a] + (w1 - 1) * u[b]
        s[b] += float(size[a])
    keep = [i for i in range(x.shape[0]) if i not in src]
    out = torch.stack([(ud.get(i, u[i]) / s[i]) for i in keep])
    group_min = [min([i] + [a for a, b in zip(src, dst) if b == i]) for i in keep]
    return out, torch.tensor([s[i] for i in keep]), group_min


def random_metric(B, N, d, ties, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, N, d, generator=g)
    if ties:  # exact duplicates give equal similarities, equal row maxima and equal scores
        m[:, 3] = m[:, 5]
        m[:, 7] = m[:, 5]
        m[:, 10] = m[:, 2]
    return F.normalize(m, dim=-1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_prot,ties,imp_kind", [(0, False, "rand"), (1, True, "zero"), (2, True, "rand"),
                                                  (1, False, "rand")])
def test_cgsm_matches_brute_force(seed, n_prot, ties, imp_kind):
    B, N, d, C = 2, 14, 6, 5
    metric = random_metric(B, N, d, ties, seed)
    g = torch.Generator().manual_seed(100 + seed)
    imp = torch.rand(B, N, generator=g) * 0.3 if imp_kind == "rand" else torch.zeros(B, N)
    r = (N - n_prot) // 2 - seed % 3
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1), generator=g).double()
    pos = torch.arange(N).expand(B, N)
    src, dst, is_src = cgsm_match(metric, imp, r, n_prot)
    for ensemble in ("importance", "size"):
        xo, so, po = cgsm_merge(x, size, pos, imp, src, dst, is_src, ensemble)
        for b in range(B):
            bsrc, bdst = brute_cgsm(metric[b], imp[b], r, n_prot)
            assert src[b].tolist() == bsrc and dst[b].tolist() == bdst
            ref_x, ref_s, group_min = brute_merge(x[b], size[b, :, 0], imp[b], bsrc, bdst, ensemble)
            assert torch.allclose(xo[b], ref_x, atol=1e-10)   # destinations in their original (ascending) order
            assert torch.equal(so[b, :, 0], ref_s)
            assert po[b].tolist() == group_min
        # invariants: exact count per sample, sizes sum to the input's, protected tokens untouched and in place
        assert xo.shape == (B, N - r, C)
        assert torch.equal(so.sum(1), size.sum(1))
        assert torch.equal(xo[:, :n_prot], x[:, :n_prot]) and not is_src[:, :n_prot].any()
        assert not (is_src.gather(1, dst)).any()   # sources and destinations are disjoint


def test_cgsm_mutual_pair_merges_once():
    """Two near-duplicates: only one becomes a source, and it merges into the other (the rank mask's point)."""
    m = F.normalize(torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0.99, 0.1, 0], [0, 0, 1], [0.5, 0.5, 0.7]]]), dim=-1)
    src, dst, _ = cgsm_match(m, torch.zeros(1, 5), 1, 0)
    assert sorted([src.item(), dst.item()]) == [0, 2]


def brute_tome(x, size, metric, r, n_prot):
    """One sample of ToMe bipartite matching; returns merged tokens in [unmerged A ascending, B] order."""
    N = x.shape[0]
    A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
    best = []
    for a in A:
        cands = [(float(metric[a] @ metric[b]), -k, b) for k, b in enumerate(Bs) if a >= n_prot and b >= n_prot]
        if cands:
            v, _, b = max(cands)
            best.append((v, a, b))
        else:
            best.append((-math.inf, a, None))
    order = sorted(range(len(A)), key=lambda k: -best[k][0])
    src = {best[k][1]: best[k][2] for k in order[:r]}
    u = {i: x[i].double() * float(size[i]) for i in range(N)}
    s = {i: float(size[i]) for i in range(N)}
    for a, b in src.items():
        u[b] = u[b] + u[a]
        s[b] += s[a]
    keep = [a for a in A if a not in src] + Bs
    return torch.stack([u[i] / s[i] for i in keep]), torch.tensor([s[i] for i in keep])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n_prot", [0, 1])
def test_tome_matches_brute_force_and_raster_order(seed, n_prot):
    B, N, C = 2, 13, 4
    g = torch.Generator().manual_seed(seed)
    metric = F.normalize(torch.randn(B, N, 5, generator=g), dim=-1)
    x = torch.randn(B, N, C, generator=g, dtype=torch.float64)
    size = torch.randint(1, 3, (B, N, 1), generator=g).double()
    pos = torch.arange(N).expand(B, N)
    r = 4
    xo, so, po = bipartite_merge(x, size, pos, metric, r, n_prot)
    for b in range(B):
        rx, rs = brute_tome(x[b], size[b, :, 0], metric[b].double(), r, n_prot)
        assert torch.allclose(xo[b], rx, atol=1e-12) and torch.equal(so[b, :, 0], rs)
    xr, sr, pr = bipartite_merge(x, size, pos, metric, r, n_prot, order="raster")
    assert torch.equal(pr, pr.sort(-1).values) and torch.equal(sr.sum(1), size.sum(1))
    for b in range(B):  # the same groups, re-sorted by their smallest original index
        perm = po[b].argsort()
        assert torch.equal(xr[b], xo[b][perm])
    if n_prot:
        assert torch.equal(xr[:, 0], x[:, 0]) and torch.equal(pr[:, 0], torch.zeros(B, dtype=torch.long))


def test_size_ensemble_of_one_pair_equals_tome_mean():
    x = torch.randn(1, 4, 3, dtype=torch.float64)
    size = torch.tensor([[[1.0], [3.0], [2.0], [1.0]]], dtype=torch.float64)
    m = F.normalize(torch.tensor([[[1.0, 0], [0, 1], [1, 0.01], [-1, 0.2]]]), dim=-1)
    src, dst, is_src = cgsm_match(m, torch.zeros(1, 4), 1, 0)
    xo, so, _ = cgsm_merge(x, size, torch.arange(4)[None], torch.zeros(1, 4), src, dst, is_src, "size")
    a, b = src.item(), dst.item()
    merged = (x[0, a] * size[0, a] + x[0, b] * size[0, b]) / (size[0, a] + size[0, b])
    assert torch.allclose(xo[0, [i for i in range(4) if i != a].index(b)], merged)


def test_schedule_and_rounds():
    # the spec's table (CLIP-L/336, 23 used layers): keep 0.16 -> 92 tokens, 1 x 22 then 22 x 21
    assert spread_schedule(576, 0.16, 23) == [22] + [21] * 22
    assert spread_schedule(576, 0.25, 23) == [19] * 18 + [18] * 5
    assert spread_schedule(576, 1.0, 23) == [0] * 23
    assert round_sizes(65, 1, 48) == [32, 16]
    with pytest.raises(ValueError):
        round_sizes(3, 1, 2)


def test_proportional_bias_with_unit_sizes_is_exact_and_bias_shifts_attention():
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    ones = torch.ones(2, 7, 1)
    a = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(ones, q.dtype)), a)
    size = torch.randint(1, 5, (2, 7, 1)).float()
    # a key of size s counts as s identical keys: repeat each key/value s times and attend without bias
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(size, q.dtype))
    for b in range(2):
        reps = size[b, :, 0].long()
        kr, vr = k[b].repeat_interleave(reps, dim=1), v[b].repeat_interleave(reps, dim=1)
        assert torch.allclose(out[b], F.scaled_dot_product_attention(q[b], kr, vr), atol=1e-6)


def test_cls_attention_importance_is_the_cls_row():
    keys, q = torch.randn(2, 9, 4, 8), torch.randn(2, 4, 8)
    size = torch.ones(2, 9, 1)
    imp = importance("cls_attn", keys, q, size)
    ref = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, keys) / math.sqrt(8), -1).mean(1)
    assert torch.allclose(imp, ref) and torch.allclose(imp.sum(-1), torch.ones(2))


# -- LLaVA integration ------------------------------------------------------------------------------------------
def deep_llava(attn="sdpa", vision=None, seed=0):
    """Tiny LLaVA whose CLIP tower has 4 layers (3 used with vision_feature_layer=-2)."""
    vc = dict(CLIPV, num_hidden_layers=4) if vision is None else vision
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vc, text_config=LLAMA, image_token_index=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=64)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def manual_tower(m, pixel_values, merger, schedule, n_prot):
    """Explicit reference: the CLIP tower written out layer by layer, merging with the method's pure function and
    adding log(size) to the attention logits by hand (eager softmax)."""
    vt = m.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    x = vt.pre_layrnorm(vt.embeddings(pixel_values))
    size = pos = None
    for i, layer in enumerate(vt.encoder.layers[:len(schedule)]):
        x, q, k, _ = clip_attention_ref(layer, x, size)
        if schedule[i]:
            x, size, pos = merge_ref(merger, x, size, pos, k.transpose(1, 2), q.transpose(1, 2)[:, 0], schedule[i],
                                     n_prot)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


VARIANTS = [("tome", {}), ("tome", {"order": "tome"}), ("crossget", {}),
            ("crossget", {"importance": "cls_query_cos", "ensemble": "size"})]


# keep 0.1: R = 58 over 3 layers (20, 19, 19); the last layer exceeds ToMe's cap and merges in two rounds
@pytest.mark.parametrize("attn,method,opts,keep", [(a, m, o, 0.1) for a in ("eager", "sdpa") for m, o in VARIANTS]
                         + [("sdpa", "tome", {}, 0.5), ("sdpa", "crossget", {}, 0.5)])
def test_llava_vision_merge_equals_explicit_reference(attn, method, opts, keep):
    m = deep_llava(attn)
    k = round(keep * 64)
    inp = llava_inputs(m, PROMPTS)
    saved = {a: b.clone() for a, b in inp.items()}
    with vltok.patched(m, method, keep=keep, **opts) as h:
        out = m(**inp).logits
        merger = h.method.vision
    assert all(torch.equal(inp[a], saved[a]) for a in inp)
    sched = spread_schedule(64, keep, 3)
    with torch.no_grad():
        feats = manual_tower(m, inp["pixel_values"], merger, sched, 1)[:, 1:]
        feats = m.model.multi_modal_projector(feats)
    assert feats.shape[1] == k
    red = llava_inputs(m, PROMPTS, n_ph=k)
    ids = red["input_ids"]
    emb = m.get_input_embeddings()(ids.masked_fill(ids == IMG, 0))
    emb[ids == IMG] = feats.reshape(-1, feats.shape[-1])
    ref = m(inputs_embeds=emb, attention_mask=red["attention_mask"]).logits
    valid = red["attention_mask"].bool()
    assert out.shape == ref.shape and torch.allclose(out[valid], ref[valid], atol=1e-5)
    assert h.stats["tokens_out"] == 2 * k and h.stats["tokens_in"] == 128
    assert h.stats["vision_tokens_per_layer"][0] == 65 and h.stats["vision_tokens_per_layer"][3] == 1 + k


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_llava_vision_keep1_identity_remove_generate_and_batch(method):
    m = deep_llava()
    inp = llava_inputs(m, PROMPTS)
    ref = m(**inp).logits
    before = {n: dict(mod.__dict__) for n, mod in m.named_modules()}
    hooks = {n: list(mod._forward_hooks) for n, mod in m.named_modules()}
    with vltok.patched(m, method, keep=1.0):
        assert torch.equal(m(**inp).logits, ref)
    with vltok.patched(m, method, keep=0.16) as h:
        out = m.generate(**inp, max_new_tokens=5, do_sample=False)
        assert h.stats["tokens_out"] == 2 * 10
        for i, p in enumerate(PROMPTS):   # left-padded batch == single calls
            one = llava_inputs(m, [p])
            one["pixel_values"] = inp["pixel_values"][i:i + 1]
            s = m.generate(**one, max_new_tokens=5, do_sample=False)[0, one["input_ids"].shape[1]:]
            L = inp["input_ids"].shape[1]
            assert torch.equal(out[i, L:L + s.shape[0]], s)   # (generation may stop early at EOS)
    assert torch.equal(out[:, :inp["input_ids"].shape[1]], inp["input_ids"])
    after = {n: dict(mod.__dict__) for n, mod in m.named_modules()}
    assert before.keys() == after.keys() and all(before[n].keys() == after[n].keys() for n in before)
    assert hooks == {n: list(mod._forward_hooks) for n, mod in m.named_modules()}
    assert torch.equal(m(**inp).logits, ref)


def test_llava_siglip_and_dinov2_towers():
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=64, patch_size=8)
    dino = dict(model_type="dinov2", hidden_size=32, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=4,
                image_size=64, patch_size=8)
    for vc, n_prefix in ((siglip, 0), (dino, 0)):
        m = deep_llava(vision=vc)
        if vc is siglip:   # no CLS: "default" would drop a patch token; LLaVA checkpoints with SigLIP use "full"
            m.config.vision_feature_select_strategy = "full"
        inp = llava_inputs(m, PROMPTS)
        ref = m(**inp).logits
        for method in ("tome", "crossget"):
            with vltok.patched(m, method, keep=0.25) as h:
                out = m(**inp).logits
                assert h.stats["tokens_out"] == 2 * (n_prefix + 16)
            assert out.shape[1] == ref.shape[1] - 48   # each row loses 48 placeholders
        assert torch.equal(m(**inp).logits, ref)


def test_vision_method_refused_where_unsupported():
    from tiny import tiny_llava_next

    with pytest.raises(vltok.IncompatibleError, match="vision"):
        vltok.patch(tiny_llava_next(), "tome", keep=0.5, schedule="constant")   # "auto" would merge after it
    m = tiny_llava()
    m.config.vision_config._attn_implementation = "flash_attention_2"
    with pytest.raises(vltok.IncompatibleError, match="prop_attn=False"):
        vltok.patch(m, "crossget", keep=0.5)
    assert "forward" not in m.__dict__ and vltok.get_handle(m) is None
    with pytest.raises(ValueError, match="importance"):
        vltok.patch(tiny_llava(), "crossget", keep=0.5, importance="bogus")


def test_schedule_follows_the_actual_image_size():
    """DINOv2 interpolates its position table: a config image_size of 96 px fed 64 px images must still merge to
    round(keep * 64) tokens (the schedule is taken per call from the tokens that reach layer 0)."""
    dino = dict(model_type="dinov2", hidden_size=32, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=4,
                image_size=96, patch_size=8)
    m = deep_llava(vision=dino)
    inp = llava_inputs(m, PROMPTS, n_ph=64)
    inp["pixel_values"] = torch.randn(2, 3, 64, 64)
    with vltok.patched(m, "crossget", keep=0.25) as h:
        out = m(**inp).logits
    assert h.stats["tokens_out"] == 2 * 16 and h.stats["vision_tokens_per_layer"] == [65, 41, 17, 17]   # 2 used layers: r = 24, 24
    assert out.shape[1] == inp["input_ids"].shape[1] - 48
