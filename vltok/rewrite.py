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
    left, right = torch.stack([(attention_mask[:, 0] == 0).any(), (attention_mask[:, -1] == 0).any()]).tolist()
    if left:   # (one host sync for both ends)
        return "left"
    if right:
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
    per_row = is_ph.sum(1).tolist()   # the one host sync for the counts
    total = sum(per_row)
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
    dev = input_ids.device
    # each sample's placeholders must consist of whole images (checked on the host with B numbers)
    bounds, acc = {0}, 0
    for n in native:
        acc += n
        bounds.add(acc)
    acc = 0
    for b, c in enumerate(per_row):
        acc += c
        if acc not in bounds:
            raise IncompatibleError(
                f"sample {b} ends in the middle of an image's placeholders; each image's {native} placeholders "
                "must lie in one sample")
    # vectorised: the global rank of each placeholder gives its image and its offset within that image
    native_t = torch.tensor(native, device=dev)
    new_t = torch.tensor(new, device=dev)
    starts = native_t.cumsum(0) - native_t
    rank = is_ph.flatten().long().cumsum(0).view(B, L) - 1
    img = torch.searchsorted(native_t.cumsum(0), rank.clamp(min=0), right=True).clamp(max=len(native) - 1)
    drop = is_ph & (rank - starts[img] >= new_t[img])
    keep = ~drop
    # drop the caller's padding on the padding side too (re-padded below to the new batch maximum, so a row that
    # shrank less does not leave the others with surplus padding)
    am = tensors.get("attention_mask")
    real = keep & (am != 0) if am is not None else keep
    pos = torch.arange(L, device=dev).expand(B, L)
    has_real = real.any(1, keepdim=True)
    if side == "left":
        first = torch.where(real, pos, L).amin(1, keepdim=True)
        keep = keep & (pos >= first) & has_real
    else:
        last = torch.where(real, pos, -1).amax(1, keepdim=True)
        keep = keep & (pos <= last) & has_real
    n_keep = keep.sum(1, keepdim=True)
    new_len = int(n_keep.max())
    col = keep.long().cumsum(1) - 1
    if side == "left":
        col = col + (new_len - n_keep)
    cols = torch.full((B, new_len + 1), -1, dtype=torch.long, device=dev)   # dropped columns land in the spare
    cols = cols.scatter_(1, torch.where(keep, col, new_len), pos)[:, :new_len]   # last one (no nonzero sync)
    valid = cols >= 0
    gather = cols.clamp(min=0)
    out = {}
    for name, t in {"input_ids": input_ids, **tensors}.items():
        if t is None:
            continue
        g = t[torch.arange(B, device=t.device)[:, None], gather.to(t.device)]
        fill = pad_id if name == "input_ids" else PAD_VALUES.get(name, 0)
        v = valid.to(t.device)
        while v.dim() < g.dim():
            v = v.unsqueeze(-1)
        out[name] = torch.where(v, g, torch.full_like(g, fill))
    return Rewrite(out, cols, L, new_len)


def restore_prompt(sequences: torch.Tensor, original_ids: torch.Tensor, new_len: int) -> torch.Tensor:
    """generate() output starts with the shortened prompt; put the caller's original prompt back in front."""
    return torch.cat([original_ids.to(sequences.device), sequences[:, new_len:]], dim=1)
