"""Tiny random configs of the real transformers classes (../shared/specs/models.md §8)."""
from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration

IMG = 100
LLAMA = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
CLIPV = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, image_size=64, patch_size=8, projection_dim=32)
PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]


def tiny_llava(attn="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=CLIPV, text_config=LLAMA, image_token_index=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=64, **overrides)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def tiny_llava_next(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=CLIPV, text_config=LLAMA, image_token_index=IMG, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_grid_pinpoints=PINPOINTS)
    m = LlavaNextForConditionalGeneration(cfg).eval()
    m.set_attn_implementation(attn)
    return m


def expand_and_pad(prompts, counts, padding):
    """Token lists with -1 per image -> (input_ids, attention_mask): image j expands to counts[j] placeholders."""
    rows, j = [], 0
    for p in prompts:
        row = []
        for t in p:
            if t == -1:
                row += [IMG] * counts[j]
                j += 1
            else:
                row.append(t)
        rows.append(row)
    return pad_rows(rows, padding)


def pad_rows(rows, padding):
    """Token lists -> (input_ids, attention_mask) padded with 0 on the ``padding`` side."""
    L = max(map(len, rows))
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(L - len(r), L) if padding == "left" else slice(0, len(r))
        ids[i, sl], am[i, sl] = torch.tensor(r), 1
    return ids, am


def llava_inputs(model, prompts: list[list[int]], seed=0, padding="left", n_ph=None):
    """Processor-like batch: each prompt is a token list with -1 marking where an image goes.

    Returns input_ids, attention_mask and pixel_values with the native placeholder count per image.
    """
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n_ph = n_ph or (vc.image_size // vc.patch_size) ** 2
    n_img = sum(p.count(-1) for p in prompts)
    ids, am = expand_and_pad(prompts, [n_ph] * n_img, padding)
    pv = torch.randn(n_img, 3, vc.image_size, vc.image_size, generator=g)
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv)


def next_counts(model, image_sizes):
    """Native packed token count per image, from the model's own pack step (the processor's rule)."""
    from vltok.adapters.llava import llava_next_unpadded

    vc = model.config.vision_config
    t = vc.image_size // vc.patch_size
    out = []
    for s in image_sizes:
        h_u, w_u = llava_next_unpadded(model.config, s)
        out.append(t * t + h_u * (w_u + 1))
    return out


def llava_next_inputs(model, prompts, image_sizes, seed=0, padding="left", counts=None):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    counts = counts or next_counts(model, image_sizes)
    tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, vc.image_size) for s in image_sizes]
    ids, am = expand_and_pad(prompts, counts, padding)
    pv = torch.randn(len(image_sizes), max(tiles), 3, vc.image_size, vc.image_size, generator=g)
    for i, t in enumerate(tiles):
        pv[i, t:] = 0
    return dict(input_ids=ids, attention_mask=am, pixel_values=pv, image_sizes=torch.tensor(image_sizes))


def biased_attention(q, k, v, scale, size=None):
    """Eager multi-head attention written out: q / k / v [B, N, H, d] -> [B, N, H*d]; with ``size`` [B, N, 1] the
    proportional bias log(size_j) is added to every logit of key j."""
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    if size is not None:
        logits = logits + size.log().transpose(1, 2)[:, None]
    return torch.einsum("bhnm,bmhd->bnhd", logits.softmax(-1), v).flatten(2)


def merge_ref(merger, x, size, pos, k, query, r, n_prot):
    """A reference loop's merge of r tokens by the method's pure function; before the first merge (size None) every
    token has size 1 and its raster position. Returns (x, size, pos)."""
    if size is None:
        B, N = x.shape[:2]
        size, pos = torch.ones(B, N, 1), torch.arange(N).expand(B, N)
    return merger.merge(x, size, pos, k, query, r, n_prot)


def clip_attention_ref(layer, x, size=None):
    """One CLIP encoder layer's attention half written out (eager math, proportional bias log(size) when given):
    returns (x after the attention residual, q, k, probs), q / k / probs per head [B, H, N, .]."""
    at = layer.self_attn
    h = layer.layer_norm1(x)
    B, N, C = h.shape
    q, k, v = (p(h).view(B, N, at.num_heads, -1).transpose(1, 2) for p in (at.q_proj, at.k_proj, at.v_proj))
    logits = q @ k.transpose(-1, -2) * at.scale
    if size is not None:
        logits = logits + size.log().transpose(1, 2)[:, None]
    probs = logits.softmax(-1)
    return x + at.out_proj((probs @ v).transpose(1, 2).reshape(B, N, C)), q, k, probs
