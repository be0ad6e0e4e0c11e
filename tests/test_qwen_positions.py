"""Qwen2-VL / Qwen2.5-VL with caller-supplied M-RoPE position_ids ([3, B, S], or [4, B, S] with the text row first):
selection methods keep the caller's positions on the kept columns; resampling methods recompute them on the
compressed grid copy when they are the model's own, and refuse custom ones with the fix named."""
import pytest
import torch

import vltok
from tiny import IMG
from tiny_families import VID, qwen_inputs, tiny_qwen
from vltok.methods.baselines import random_indices

PROMPTS = [[1, 5, -1, 7, 8], [1, -2, 9, -1, 3, 4, 5, 6]]
IMAGES = [(1, 8, 8), (1, 4, 8)]
VIDEOS = [(2, 8, 8)]


def own_positions(m, inp, rows):
    with torch.no_grad():
        pos, _ = m.model.get_rope_index(inp["input_ids"], inp["mm_token_type_ids"], inp["image_grid_thw"],
                                        inp["video_grid_thw"], attention_mask=inp["attention_mask"])
    if rows == 4:
        am = inp["attention_mask"]
        pos = torch.cat([((am.cumsum(-1) - 1).masked_fill(am == 0, 1))[None], pos])
    return pos


def custom(pos):
    """Not the model's own: the temporal row of every token doubled past a point (as time-scaled videos do)."""
    out = pos.clone()
    out[-3] = out[-3] * 2
    return out


def dropped_masked_reference(m, inp, pos, keep):
    """The full sequence with the visual tokens that 'random' drops masked out of attention, positions ``pos``."""
    ids, keep_mask = inp["input_ids"], inp["attention_mask"].bool().clone()
    for tok, grids in ((IMG, IMAGES), (VID, VIDEOS)):
        cols, start = (ids == tok).nonzero().tolist(), 0
        for t, h, w in grids:
            n = (h // 2) * (w // 2)
            sel = set(random_indices(n, round(keep * n), 0).tolist())
            for i in range(t * n):
                if i % n not in sel:
                    b, c = cols[start + i]
                    keep_mask[b, c] = False
            start += t * n
    with torch.no_grad():
        return m(**dict(inp, attention_mask=keep_mask.long(), position_ids=pos)).logits


@pytest.mark.parametrize("rows", [3, 4])
@pytest.mark.parametrize("version", ["2", "2.5"])
def test_selection_keeps_caller_positions_on_kept_columns(version, rows):
    m = tiny_qwen(version)
    keep = 0.4
    inp = qwen_inputs(m, PROMPTS, IMAGES, VIDEOS, padding="left")
    pos = own_positions(m, inp, rows)
    for p in (pos, custom(pos)):
        saved = p.clone()
        ref = dropped_masked_reference(m, inp, p, keep)
        with vltok.patched(m, "random", keep=keep) as h:
            out = m(**inp, position_ids=p).logits
            own = m(**inp).logits        # vltok's own positions: the same as passing the model's own
            kp = h.kept_positions
        assert torch.equal(p, saved)
        if p is pos:
            assert torch.allclose(out, own, atol=1e-6)
        else:
            assert not torch.allclose(out, own, atol=1e-5)   # the custom positions reached the LLM
        new_ids = inp["input_ids"].gather(1, kp.clamp(min=0))
        text = (kp >= 0) & (new_ids != IMG) & (new_ids != VID)
        ref_cols = ref.gather(1, kp.clamp(min=0)[..., None].expand(-1, -1, ref.shape[-1]))
        assert torch.allclose(out[text], ref_cols[text], atol=1e-5)


@pytest.mark.parametrize("rows", [3, 4])
@pytest.mark.parametrize("version", ["2", "2.5"])
def test_resampling_recomputes_own_positions_and_refuses_custom_ones(version, rows):
    m = tiny_qwen(version)
    inp = qwen_inputs(m, PROMPTS, IMAGES, VIDEOS, padding="left")
    pos = own_positions(m, inp, rows)
    ref = m(**inp, position_ids=pos).logits
    with vltok.patched(m, "fourier", keep=1.0):
        assert torch.equal(m(**inp, position_ids=pos).logits, ref)
    with vltok.patched(m, "fourier", keep=0.3):
        own = m(**inp).logits
        assert torch.equal(m(**inp, position_ids=pos).logits, own)
        with pytest.raises(vltok.IncompatibleError, match="pass no position_ids"):
            m(**inp, position_ids=custom(pos))
        with pytest.raises(vltok.IncompatibleError, match=r"\[3, B, S\]"):
            m(**inp, position_ids=pos[:2])
