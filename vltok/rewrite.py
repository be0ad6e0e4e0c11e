"""Shrinking placeholder runs in a processor's output (pure tensor functions, inputs never modified).

A pre-LLM method gives image j ``new[j]`` features instead of the processor's ``native[j]``. The model splices
features into placeholder tokens in row-major order (sample 0's placeholders first), so image j owns the next
``native[j]`` placeholder positions. We keep the first ``new[j]`` of them, delete the rest from every per-token
tensor, and re-pad rows to a common length on the caller's padding side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import IncompatibleError

# pad value per per-token tensor name; anything else pads with 0
PAD_VALUES = {"labels": -100, "attention_mask": 0}


@dataclass
class Rewrite:
    tensors: dict[str, torch.Tensor]   # the rewritten per-token tensors (input_ids, attention_mask, ...)
    kept_positions: torch.Tensor       # [B, L_new] original column of each new column, -1 for added pads
    orig_len: int
    new_len: int


def padding_side(attention_mask: torch.Tensor | None, default: str) -> str:
    if attention_mask is None or attention_mask.dim() != 2:
        return default
    if bool((attention_mask[:, 0] == 0).any()):
        return "left"
    if bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return default


def shrink_placeholders(input_ids: torch.Tensor, token_id: int, native: list[int], new: list[int],
                        tensors: dict[str, torch.Tensor], pad_id: int, side: str) -> Rewrite | None:
    """Return the rewritten tensors, or None when the runs already have the reduced length (idempotent).

    ``tensors`` holds every other per-token tensor of shape [B, L, ...] (attention_mask, labels, ...).
    Raises IncompatibleError when the placeholder count matches neither the native nor the reduced counts.
    """
    if len(native) != len(new):
        raise ValueError("native and new must list one count per image")
    is_ph = input_ids == token_id
    total = int(is_ph.sum())
    if total == sum(new) and sum(new) != sum(native):
        return None
    if total != sum(native):
        raise IncompatibleError(
            f"the inputs hold {total} image placeholder tokens (id {token_id}) for {len(native)} image(s), but the "
            f"processor would make {sum(native)} for these images ({native}) and vltok reduces them to {sum(new)}; "
            "pass the processor's unmodified output (input_ids with one full placeholder run per image)"
        )
    if sum(new) == sum(native):
        return None
    B, L = input_ids.shape
    drop = torch.zeros(B, L, dtype=torch.bool)
    ph_cpu = is_ph.cpu()
    j = 0
    for b in range(B):
        pos = ph_cpu[b].nonzero().flatten().tolist()
        used = 0
        while used < len(pos):
            if j >= len(native):
                raise IncompatibleError("more placeholder tokens than images: check that pixel_values has one entry per image")
            run = pos[used:used + native[j]]
            if len(run) != native[j]:
                raise IncompatibleError(
                    f"sample {b} ends in the middle of image {j}'s placeholders ({len(run)} of {native[j]}); "
                    "each image's placeholders must lie in one sample"
                )
            drop[b, run[new[j]:]] = True
            used += native[j]
            j += 1
    # per row: the kept columns, minus the caller's padding on the padding side (re-padded below to the new
    # batch maximum, so a row that shrank less does not leave the others with surplus padding)
    am = tensors.get("attention_mask")
    pad = (am == 0).cpu() if am is not None else torch.zeros(B, L, dtype=torch.bool)
    rows = []
    for b in range(B):
        kept = (~drop[b]).nonzero().flatten()
        real = (~pad[b][kept]).nonzero().flatten()
        if real.numel() == 0:
            rows.append(kept[:0])
        elif side == "left":
            rows.append(kept[int(real[0]):])
        else:
            rows.append(kept[: int(real[-1]) + 1])
    new_len = max(r.numel() for r in rows)
    cols = torch.full((B, new_len), -1, dtype=torch.long)
    for b, kept in enumerate(rows):
        if side == "left":
            cols[b, new_len - kept.numel():] = kept
        else:
            cols[b, :kept.numel()] = kept
    valid = cols >= 0
    gather = cols.clamp(min=0)
    out = {}
    for name, t in {"input_ids": input_ids, **tensors}.items():
        if t is None:
            continue
        dev = t.device
        g = t[torch.arange(B)[:, None].to(dev), gather.to(dev)]
        fill = pad_id if name == "input_ids" else PAD_VALUES.get(name, 0)
        v = valid.to(dev)
        while v.dim() < g.dim():
            v = v.unsqueeze(-1)
        out[name] = torch.where(v, g, torch.full_like(g, fill))
    return Rewrite(out, cols, L, new_len)


def restore_prompt(sequences: torch.Tensor, original_ids: torch.Tensor, new_len: int) -> torch.Tensor:
    """generate() output starts with the shortened prompt; put the caller's original prompt back in front."""
    return torch.cat([original_ids.to(sequences.device), sequences[:, new_len:]], dim=1)
