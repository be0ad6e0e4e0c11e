"""Shrinking placeholder runs in a processor's output (pure tensor functions, inputs never modified).

A pre-LLM method gives image j ``new[j]`` features instead of the processor's ``native[j]``. The model splices
features into placeholder tokens in row-major order (sample 0's placeholders first), so image j owns the next
``native[j]`` placeholder positions. We keep the first ``new[j]`` of them, delete the rest from every per-token
tensor, and re-pad rows to a common length on the caller's padding side.

The index work runs on the host: input_ids and the attention mask are read back once (the one host sync), the
kept columns and the new input_ids / attention_mask are computed there with numpy (B x L ints), and the results go
to the caller's device in one copy. Other per-token tensors (labels, token type ids, ...) take one gather on their
own device with the host-built index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    host_ids: torch.Tensor | None = None   # host copy of tensors["input_ids"] (for host-side layout work)


def padding_side(attention_mask, default: str) -> str:
    """'left' / 'right' from a 2-D mask's padded ends (a host array or tensor), else ``default``."""
    if attention_mask is None or attention_mask.ndim != 2:
        return default
    if bool((attention_mask[:, 0] == 0).any()):
        return "left"
    if bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return default


def _read_back(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """The rewrite's one device-to-host copy: input_ids and the attention mask as host arrays (both in one copy
    when they share a device and the mask is integer / bool). Host tensors are viewed, never copied or written."""
    am = attention_mask
    if am is not None and am.device == input_ids.device != torch.device("cpu") and am.shape == input_ids.shape \
            and not am.is_floating_point() and not am.is_complex():
        both = torch.stack([input_ids, am.to(input_ids.dtype)]).cpu().numpy()
        return both[0], both[1]
    if am is not None:   # (numpy has no bfloat16: such a mask comes back as float32, its 0 / 1 exact)
        am = am.detach().cpu()
        am = (am.float() if am.dtype == torch.bfloat16 else am).numpy()
    return input_ids.cpu().numpy(), am


_read_back._vltok_host = 1   # eval/tools/profile_vltok.py counts one read-back per call


def _upload(arrays: dict[str, tuple[np.ndarray, torch.dtype, torch.device]]) -> dict[str, torch.Tensor]:
    """Host results to their devices: the integer / bool arrays bound for one device go stacked as int64 in one
    copy; each result then takes its dtype. A plain (pageable) copy: it runs right after the read-back, which
    already waited for the stream, so it waits for nothing (pinning a fresh buffer cost ~90 us on the H100 host)."""
    out, stacks = {}, {}
    for name, (a, dtype, dev) in arrays.items():
        if a.dtype.kind in "biu":
            stacks.setdefault(dev, []).append(name)
        else:
            out[name] = torch.from_numpy(np.ascontiguousarray(a)).to(dev).to(dtype)
    for dev, names in stacks.items():
        stacked = np.stack([arrays[n][0] for n in names]).astype(np.int64, copy=False)
        for n, t in zip(names, torch.from_numpy(stacked).to(dev).unbind(0)):
            out[n] = t.to(arrays[n][1])
    return out


def _plan(ids: np.ndarray, am: np.ndarray | None, token_id: int, native: list[int], new: list[int],
          side: str, kind: str = "image", *, placeholder_ids: tuple[int, ...] = ()) -> np.ndarray | None:
    """On host arrays: [B, L_new] original column of each new column (-1: added pad), or None (nothing to do).
    ``placeholder_ids``: every placeholder kind's token id (this one is always included); a kept placeholder is
    never trimmed as padding, even under a zero attention mask (the model fills every placeholder whatever the
    mask says, so dropping one would leave it more features than tokens)."""
    if len(native) != len(new):
        raise ValueError("native and new must list one count per image")
    is_ph = ids == token_id
    per_row = is_ph.sum(1).tolist()
    total = sum(per_row)
    if total == sum(new) and sum(new) != sum(native):
        return None
    if total != sum(native):
        # the model's own phrase first: code that catches the unpatched model's error keeps working
        raise IncompatibleError(
            f"{kind.capitalize()} features and {kind} tokens do not match: the inputs hold {total} {kind} placeholder "
            f"tokens (id {token_id}) for {len(native)} {kind}(s), but the processor would make {sum(native)} for "
            f"these {kind}s ({native}) and vltok reduces them to {sum(new)}; pass the processor's unmodified output "
            f"(input_ids with one full placeholder run per {kind})"
        )
    if sum(new) == sum(native):
        return None
    B, L = ids.shape
    # each sample's placeholders must consist of whole images (B numbers)
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
    # placeholders in row-major order: image j owns the next native[j]; keep the first new[j] of them
    native_a = np.asarray(native, dtype=np.int64)
    offset = np.arange(total) - np.repeat(np.cumsum(native_a) - native_a, native_a)
    keep = np.ones(B * L, dtype=bool)
    keep[np.flatnonzero(is_ph)[offset >= np.repeat(np.asarray(new, dtype=np.int64), native_a)]] = False
    keep = keep.reshape(B, L)
    # drop the caller's padding on the padding side too (re-padded below to the new batch maximum, so a row that
    # shrank less does not leave the others with surplus padding); nothing to drop without padding
    if am is not None and not am.all():
        # (peer suite: transformers' test models mask placeholder columns at random; the unpatched model still
        # splices a feature into each, so the padding ends here are outside the outermost real-or-placeholder token)
        real = keep & ((am != 0) | np.isin(ids, (token_id, *placeholder_ids)))
        has_real = real.any(1)
        pos = np.arange(L)
        if side == "left":
            keep &= pos >= np.where(has_real, real.argmax(1), L)[:, None]
        else:
            keep &= pos <= np.where(has_real, L - 1 - real[:, ::-1].argmax(1), -1)[:, None]
    n_keep = keep.sum(1)
    new_len = int(n_keep.max())
    rows, src = np.nonzero(keep)
    if int(n_keep.min()) == new_len:   # no row needs new padding
        return src.reshape(B, new_len)
    dest = np.arange(rows.size) - np.repeat(np.cumsum(n_keep) - n_keep, n_keep)
    if side == "left":
        dest += np.repeat(new_len - n_keep, n_keep)
    cols = np.full((B, new_len), -1, dtype=np.int64)
    cols[rows, dest] = src
    return cols


def _take(a: np.ndarray, flat: np.ndarray, pads: np.ndarray | None, fill) -> np.ndarray:
    """``a`` [B, L] at the row-major positions ``flat`` [B, L_new]; ``fill`` where ``pads``."""
    g = a.reshape(-1)[flat]
    return g if pads is None else np.where(pads, fill, g)


def shrink_runs(input_ids: torch.Tensor, runs: list[tuple[int, list[int], list[int]]],
                tensors: dict[str, torch.Tensor], pad_id: int, side: str | None = None, default_side: str = "right",
                add_mask: bool = False) -> Rewrite | None:
    """Shrink each placeholder kind of ``runs`` ((token id, native counts, reduced counts) per kind, applied in
    order: a later kind works on the earlier kinds' output) in one pass: one read-back, host index work, one upload.

    ``tensors`` holds every other per-token tensor of shape [B, L, ...] (attention_mask, labels, ...). ``side``
    None reads the padding side from the attention mask (``default_side`` when it shows none). ``add_mask``: a
    batch (B > 1) without an attention_mask gets one (the re-padded rows need it). Returns None when no kind needs
    a rewrite (each already has its reduced length, or keeps all its tokens); raises IncompatibleError when a
    placeholder count matches neither the native nor the reduced counts.
    """
    am_t = tensors.get("attention_mask")
    ids_h, am_h = _read_back(input_ids, am_t)
    B, L = ids_h.shape
    if side is None:
        side = padding_side(am_h, default_side)
    am_dtype, am_dev = (am_t.dtype, am_t.device) if am_t is not None else (input_ids.dtype, input_ids.device)
    if am_h is None and add_mask and B > 1:
        am_h = np.ones((B, L), dtype=np.int64)
    cols, steps = None, 0
    rows = np.arange(B, dtype=np.int64)[:, None]
    all_ids = tuple(r[0] for r in runs)
    for token_id, native, new, *kind in runs:   # (an optional 4th item names the kind: "image", "video")
        step = _plan(ids_h, am_h, token_id, native, new, side, *kind, placeholder_ids=all_ids)
        if step is None:
            continue
        pads = step < 0
        pads = pads if pads.any() else None
        flat = rows * ids_h.shape[1] + np.maximum(step, 0)
        ids_h = _take(ids_h, flat, pads, pad_id)
        am_h = None if am_h is None else _take(am_h, flat, pads, 0)
        cols = step if cols is None else _take(cols, flat, pads, -1)   # compose with the earlier kinds' columns
        steps += 1
    if cols is None:
        return None
    if steps > 1:   # index the caller's tensors through every kind's step
        pads = cols < 0
        pads = pads if pads.any() else None
        flat = rows * L + np.maximum(cols, 0)   # row-major index into [B * L, ...]
    dev = input_ids.device
    new_len = cols.shape[1]
    others = {k: t for k, t in tensors.items() if k != "attention_mask" and t is not None}
    arrays = {"input_ids": (ids_h, input_ids.dtype, dev), "kept": (cols, torch.long, dev)}
    if am_h is not None:
        arrays["attention_mask"] = (am_h, am_dtype, am_dev)
    if others:
        arrays["flat"] = (flat, torch.long, dev)
    up = _upload(arrays)
    out = {"input_ids": up["input_ids"]}
    if "attention_mask" in up:
        out["attention_mask"] = up["attention_mask"]
    added = {}   # per device: [B, L_new] True at added pads
    for name, t in others.items():   # one gather on the tensor's device (and the pad fill where rows got pads)
        same = t.device == dev
        idx = (up["flat"] if same else torch.from_numpy(flat).to(t.device)).view(-1)
        g = t.reshape(B * L, *t.shape[2:]).index_select(0, idx).view(B, new_len, *t.shape[2:])
        if pads is not None:
            if t.device not in added:
                added[t.device] = up["kept"] < 0 if same else torch.from_numpy(pads).to(t.device)
            g = g.masked_fill(added[t.device].view(B, new_len, *[1] * (t.dim() - 2)), PAD_VALUES.get(name, 0))
        out[name] = g
    return Rewrite(out, up["kept"], L, new_len, torch.from_numpy(ids_h))


def shrink_placeholders(input_ids: torch.Tensor, token_id: int, native: list[int], new: list[int],
                        tensors: dict[str, torch.Tensor], pad_id: int, side: str) -> Rewrite | None:
    """One placeholder kind (see shrink_runs): the rewritten tensors, or None when the runs already have the
    reduced length (idempotent). Raises IncompatibleError when the placeholder count matches neither the native
    nor the reduced counts."""
    return shrink_runs(input_ids, [(token_id, native, new)], tensors, pad_id, side=side)


def restore_prompt(sequences: torch.Tensor, original_ids: torch.Tensor, new_len: int) -> torch.Tensor:
    """generate() output starts with the shortened prompt; put the caller's original prompt back in front."""
    return torch.cat([original_ids.to(sequences.device), sequences[:, new_len:]], dim=1)
