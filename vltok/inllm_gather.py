"""Mask and position gathering for the in-LLM engine (vltok/inllm.py): pure functions of tensors.

After a cut, every later layer sees only the kept columns ``keep`` [B, S'] (absolute, ascending per sample). The
loop-level tensors HF hands every decoder layer (``position_embeddings`` cos / sin, ``position_ids``, the 4-D or
FlashAttention-2 mask) are gathered on those columns, so kept tokens keep their ORIGINAL positions; filler columns
of ragged batches (``dead``) are masked as keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import IncompatibleError


def gather_seq(t: torch.Tensor, idx: torch.Tensor, seq_axis: int) -> torch.Tensor:
    """Gather ``t`` on its sequence axis with per-sample indices ``idx`` [B, S'] (batch axis = the axis before).

    Works for hidden [B, S, d], cos/sin [B, S, hd] or [3, B, S, hd], position ids [B, S] or [3, B, S]."""
    seq_axis = seq_axis % t.dim()
    b_axis = seq_axis - 1
    x = t.movedim((b_axis, seq_axis), (0, 1))
    B = idx.shape[0]
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    out = x[torch.arange(B, device=x.device)[:, None], idx.to(x.device)]
    return out.movedim((0, 1), (b_axis, seq_axis))


def gather_mask(mask, rows: torch.Tensor | None, cols: torch.Tensor):
    """4-D mask [B|1, 1|H, Q, K]: gather columns (and rows at prefill) per sample; 2-D mask [B, K]: columns."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return mask
    if mask.dim() == 2:
        return gather_seq(mask, cols, -1)
    B = cols.shape[0]
    m = mask.expand(B, *mask.shape[1:]) if mask.shape[0] != B else mask
    bi = torch.arange(B, device=m.device)[:, None]
    if rows is not None:
        m = m.permute(0, 2, 1, 3)[bi, rows.to(m.device)].permute(0, 2, 1, 3)   # [B, h, Q', K]
    return m.permute(0, 3, 1, 2)[bi, cols.to(m.device)].permute(0, 2, 3, 1)   # [B, h, Q', K']


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, S, ...] gathered on axis 1 with idx [B, S'] (one launch)."""
    if t.dim() == 2:
        return t.gather(1, idx)
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))


def put_rows(hidden: torch.Tensor, keep: torch.Tensor, merged) -> torch.Tensor:
    """The gathered hidden states [B, S', d] with the rows of merged survivors replaced (a new tensor): ``merged``
    is (absolute columns [B, R], rows [B, R, d]) from the batched cut, or per sample None / (columns [R], rows)."""
    if isinstance(merged, tuple):
        cols, rows = merged
        idx = torch.searchsorted(keep.contiguous(), cols.to(keep.device)).to(hidden.device)
        return hidden.scatter(1, idx[..., None].expand(-1, -1, hidden.shape[-1]), rows.to(hidden.dtype))
    hidden = hidden.clone()
    for b, m in enumerate(merged):
        if m is not None:
            hidden[b, torch.searchsorted(keep[b].contiguous(), m[0].to(keep.device)).to(hidden.device)] = \
                m[1].to(hidden.dtype)
    return hidden


@dataclass
class PreGathered:
    """The loop-level rows a cut gathered together with the survivors' hidden rows (:func:`gather_at_cut`), reused by
    :func:`gather_loop_kwargs` at the same layer when its inputs are the very tensors it gathered from."""

    keep: torch.Tensor                  # the new kept columns [B, S']
    pe_src: torch.Tensor | None         # the cos tensor it gathered (None: position embeddings not gathered here)
    pe: tuple | None                    # (cos, sin) at the kept columns
    pid_src: torch.Tensor | None        # the position ids it gathered (None: not gathered here)
    pid: torch.Tensor | None            # position ids at the kept columns


def gather_at_cut(hidden: torch.Tensor, rel: torch.Tensor, keep: torch.Tensor, kw: dict, flash: bool):
    """Hidden rows of the survivors (``rel`` [B, S']: indices into the current sequence) and, in the same launch
    (vltok.kernels.gather), the loop-level cos / sin and position-id rows of the new columns ``keep``, which every
    layer up to the next cut reuses. Returns (hidden [B, S', d], :class:`PreGathered`)."""
    from vltok.kernels.gather import gather_rows

    pe = kw.get("position_embeddings")
    pid = kw.get("position_ids") if isinstance(kw.get("position_ids"), torch.Tensor) else None
    if flash:
        pid = None
    if pid is not None and pid.dim() != 2:
        pid = None
    if pe is not None and not (len(pe) == 2 and pe[0].dim() == 3 and pe[0].shape[0] in (1, keep.shape[0])):
        pe = None                                    # (Qwen's [3, B, S, hd] goes through gather_seq)
    hidden, cos, sin, pid_out = gather_rows(hidden, rel, *(pe or (None, None)), keep, pid)
    return hidden, PreGathered(keep, pe[0] if pe is not None else None, (cos, sin), pid, pid_out)


def gather_loop_kwargs(kw: dict, keep: torch.Tensor, pre: PreGathered | None, flash: bool,
                       dead: torch.Tensor | None, impl: str) -> dict:
    """The loop-level kwargs of a decoder layer at the kept columns ``keep`` [B, S']: position embeddings, position
    ids (None under FlashAttention-2, so gapped ids do not look packed), the mask (rows and columns; ``dead`` [B, S']
    filler columns masked as keys). ``pre``: what the cut already gathered (used where it gathered the same tensors)."""
    out = {}
    if pre is not None and pre.keep is not keep:
        pre = None
    pe = kw.get("position_embeddings")
    if pe is not None:
        if pre is not None and pre.pe_src is pe[0]:
            out["position_embeddings"] = pre.pe
        else:
            out["position_embeddings"] = tuple(gather_seq(t, keep, -2) for t in pe)
    pid = kw.get("position_ids")
    if isinstance(pid, torch.Tensor):
        if flash:
            out["position_ids"] = None
        else:
            out["position_ids"] = pre.pid if pre is not None and pre.pid_src is pid else gather_seq(pid, keep, -1)
    m = kw.get("attention_mask")
    if isinstance(m, torch.Tensor):
        m = gather_mask(m, keep if m.dim() == 4 else None, keep)
    if dead is not None:
        m = mask_dead(m, dead, prefill=True, impl=impl)
    if "attention_mask" in kw or m is not None:
        out["attention_mask"] = m
    return out


def mask_dead(m, dead: torch.Tensor, prefill: bool, impl: str, q: int = 1):
    """Mask the key columns ``dead`` [B, K] (filler columns) in a gathered mask, building one if it is None (causal
    over K columns at prefill, the last ``q`` rows at decode; float for ``impl == "eager"``, else bool)."""
    if isinstance(m, torch.Tensor) and m.dim() == 2:               # FlashAttention-2 padding mask
        return m * (~dead).to(m.dtype)
    if m is None:
        K = dead.shape[1]
        rows = torch.arange(K - q, K, device=dead.device) if not prefill else torch.arange(K, device=dead.device)
        m = (torch.arange(K, device=dead.device)[None, :] <= rows[:, None])[None, None].expand(dead.shape[0], 1, -1, -1)
        if impl == "eager":
            m = torch.zeros(m.shape, device=dead.device).masked_fill(~m, torch.finfo(torch.float32).min)
    if m.dtype == torch.bool:
        return m & ~dead[:, None, None, :]
    return m.masked_fill(dead[:, None, None, :], torch.finfo(m.dtype).min)


def mask_evicted(m, keep: torch.Tensor, prompt: int, seen: torch.Tensor, impl: str, name: str):
    """The mask of a ``generate(use_cache=False)`` step at a layer whose cache the decode stage evicted in the cached
    run: the generated rows (columns >= ``prompt``) see only the prompt columns that run keeps (``seen`` [B, P]),
    the prompt rows what they saw."""
    if isinstance(m, torch.Tensor) and m.dim() == 2:
        raise IncompatibleError(f"{name}: generate(use_cache=False) with its decode stage needs a 4-D "
                                "mask (sdpa / eager attention); use the cache or another attention backend")
    P = prompt
    B, K = keep.shape
    hide = (keep < P) & ~seen.to(keep.device).gather(1, keep.clamp(max=P - 1))       # [B, K] evicted columns
    block = ((keep >= P)[:, :, None] & hide[:, None, :])[:, None]                    # [B, 1, Q, K]
    if m is None:
        m = torch.ones(K, K, dtype=torch.bool, device=keep.device).tril()[None, None].expand(B, 1, K, K)
        if impl == "eager":
            m = torch.zeros(m.shape, device=keep.device).masked_fill(~m, torch.finfo(torch.float32).min)
    if m.dtype == torch.bool:
        return m & ~block
    return m.masked_fill(block, torch.finfo(m.dtype).min)
