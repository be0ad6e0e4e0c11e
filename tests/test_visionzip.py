"""VisionZip (vltok/methods/visionzip.py): a hand-computed case, a written-out loop reference of the authors' rule,
the paper's budget split, and the LLaVA-1.5 adapter's cls_attention side input (against eager attention weights)."""
import pytest
import torch
import torch.nn.functional as F

import vltok
from vltok.methods.visionzip import split_budget, visionzip
from tiny import llava_inputs, tiny_llava
from tiny_families import tiny_onevision, tiny_qwen

PROMPTS = [[1, 5, -1, 7, 8, 9], [1, -1, 11, 12]]


def reference(x, cls, d, c, merge="paper"):
    """The authors' steps, one sample at a time with Python lists (indices and rows in the paper's order)."""
    out_idx, out_rows = [], []
    for b in range(x.shape[0]):
        order = sorted(range(x.shape[1]), key=lambda i: (-float(cls[b, i]), i))
        dom = sorted(order[:d])
        rest = [i for i in range(x.shape[1]) if i not in dom]
        step = max(1, len(rest) // c) if c else 1
        targets = [rest[p] for p in range(0, len(rest), step)][:c]
        others = [i for i in rest if i not in targets] if targets else []   # no contextual tokens: dropped
        groups = {t: [] for t in targets}
        for o in others:
            sims = [float(F.cosine_similarity(x[b, o].double(), x[b, t].double(), dim=0)) for t in targets]
            groups[targets[max(range(len(sims)), key=lambda j: (sims[j], -j))]].append(o)
        rows = [x[b, i] for i in dom]
        for t in targets:
            g = groups[t]
            if merge == "paper":
                rows.append(x[b, t] + (torch.stack([x[b, o] for o in g]).mean(0) if g else 0))
            else:
                rows.append(torch.stack([x[b, t]] + [x[b, o] for o in g]).mean(0))
        out_idx.append(dom + targets)
        out_rows.append(torch.stack(rows))
    return torch.tensor(out_idx), torch.stack(out_rows)


def test_hand_computed_case():
    #            0        1        2         3        4         5
    x = torch.tensor([[[1., 0.], [0., 5.], [2., 0.1], [3., 3.], [0., 1.], [0.1, 2.]]])
    cls = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.05, 0.3]])
    idx, rows = visionzip(x, cls, dominant=2, contextual=2)
    # dominant {1, 3}; rest [0, 2, 4, 5], stride 2 -> targets 0 and 4; 2 joins 0, 5 joins 4
    assert idx.tolist() == [[1, 3, 0, 4]]
    torch.testing.assert_close(rows[0], torch.tensor([[0., 5.], [3., 3.], [3., 0.1], [0.1, 3.]]))
    _, rows_mean = visionzip(x, cls, 2, 2, merge="mean")
    torch.testing.assert_close(rows_mean[0, 2:], torch.tensor([[1.5, 0.05], [0.05, 1.5]]))
    idx_r, rows_r = visionzip(x, cls, 2, 2, order="raster")
    assert idx_r.tolist() == [[0, 1, 3, 4]] and torch.equal(rows_r[0, 0], rows[0, 2])


@pytest.mark.parametrize("d,c", [(10, 4), (20, 7), (31, 1), (5, 0)])
@pytest.mark.parametrize("merge", ["paper", "mean"])
def test_matches_the_loop_reference(d, c, merge):
    g = torch.Generator().manual_seed(d * 7 + c)
    x, cls = torch.randn(3, 36, 8, generator=g), torch.rand(3, 36, generator=g)
    cls[1, :6] = 0.5   # ties: the lower index first
    idx, rows = visionzip(x, cls, d, c, merge=merge)
    ridx, rrows = reference(x, cls, d, c, merge)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(rows, rrows.float(), atol=1e-5, rtol=1e-5)


def test_paper_split():
    assert [split_budget(n) for n in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_budget(1) == (1, 0) and split_budget(63) == (53, 10)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


def _spy(handle):
    """Record the side inputs the adapter hands the reducer (and return its own output)."""
    red, seen = handle.method.pre_llm, []
    orig = red.select

    def select(x, plan, **side):
        seen.append(dict(side, x=x))
        return orig(x, plan, **side)

    red.select = select
    return seen


def test_cls_attention_is_the_feature_layers_cls_row(model):
    """The side input equals the eager attention weights of the layer feeding the projector (CLS query row, mean
    over heads, CLS column dropped); the model keeps its SDPA backend."""
    inp = llava_inputs(model, PROMPTS)
    eager = tiny_llava(attn="eager")
    with torch.no_grad():
        out = eager.model.vision_tower(inp["pixel_values"], output_attentions=True)
    layer = len(out.attentions) + model.config.vision_feature_layer   # -2 of 2 layers + 1 embeddings: layer 0
    want = out.attentions[layer][:, :, 0, 1:].mean(1)
    with vltok.patched(model, "visionzip", keep=0.25) as h:
        seen = _spy(h)
        with torch.no_grad():
            model(**inp)
    assert model.config.vision_config._attn_implementation == "sdpa"
    torch.testing.assert_close(seen[0]["cls_attention"], want, atol=1e-5, rtol=1e-5)
    idx, rows = visionzip(seen[0]["x"], want, *split_budget(16))
    assert sorted(h.kept_patches()[0].kept) == sorted(idx[0].tolist())   # the record holds what the rule picks


def test_keep_one_is_bit_identical_batch_and_generate(model):
    inp = llava_inputs(model, PROMPTS)
    with torch.no_grad():
        ref = model(**inp).logits
    with vltok.patched(model, "visionzip", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**inp).logits, ref)
    alone = llava_inputs(model, PROMPTS[1:])
    with vltok.patched(model, "visionzip", keep=0.25) as h:
        with torch.no_grad():
            both = model(**llava_inputs(model, PROMPTS, padding="right")).logits
            one = model(**{**alone, "pixel_values": inp["pixel_values"][1:]}).logits
        assert h.stats["tokens_out"] == 16
        gen = model.generate(**inp, max_new_tokens=3, do_sample=False)
    n = one.shape[1]
    torch.testing.assert_close(both[1, :n], one[0], atol=1e-5, rtol=1e-5)   # batch>1 = each sample alone
    assert gen.shape == (2, inp["input_ids"].shape[1] + 3)


def test_refused_without_cls():
    with pytest.raises(vltok.IncompatibleError, match="cls_attention"):
        vltok.patch(tiny_qwen("2"), "visionzip", keep=0.25)
    with pytest.raises(vltok.IncompatibleError, match="cls_attention"):
        vltok.patch(tiny_onevision(), "visionzip", keep=0.25)
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tiny import IMG, LLAMA
    from tiny_families import SIGLIPV

    siglip = LlavaForConditionalGeneration(LlavaConfig(vision_config=SIGLIPV, text_config=LLAMA, image_token_index=IMG,
                                                       vision_feature_layer=-2,
                                                       vision_feature_select_strategy="full")).eval()
    with pytest.raises(vltok.IncompatibleError, match="no CLS token"):
        vltok.patch(siglip, "visionzip", keep=0.25)
    assert vltok.get_handle(siglip) is None and "forward" not in siglip.__dict__


@pytest.mark.slow   # minutes on 2 shared CPU cores (warm-up, generate, reps)
def test_new_methods_have_speed_rows_with_their_own_time(model):
    """vltok bench (eval/speed.py) runs the new methods; their own cost is in vltok's time (CPU: logic only)."""
    from vltok.eval import speed

    rows = speed.bench_model("tiny-llava", ["visionzip", "dart", "dpp"], [0.25], [2], n_new=2, reps=1, fast=False,
                             model=model, family="llava", device="cpu")
    got = {r["method"]: r for r in rows if r["keep"] == 0.25 and r["method"] != "IDEAL"}
    assert sorted(got) == ["dart", "dpp", "visionzip"]
    for r in got.values():
        assert not r.get("error") and r["visual_tokens"] == 16 and r["vltok_ms"] > 0


def test_no_host_sync_inside_the_reduction(model):
    """The CLS row and the selection / merge run without host syncs (one read-back of input_ids, the rewrite's)."""
    from vltok.eval.tools.profile_vltok import count_syncs

    inp = llava_inputs(model, PROMPTS)
    with vltok.patched(model, "visionzip", keep=0.25) as h, torch.no_grad():
        with count_syncs(h) as c:
            model(**inp)
    assert c.where == {"_read_back readback": 1}, c.where
