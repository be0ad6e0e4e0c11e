"""Continuing generate() from a KV cache that vltok filled from a shortened prompt.

A pre-LLM method shortens the prompt's placeholder runs before generate() runs, then puts the caller's prompt
back in front of the returned sequences. The returned cache (``past_key_values``) holds the shortened prompt, so
the usual way to continue (``generate(input_ids=out.sequences, past_key_values=out.past_key_values, ...)``, e.g.
a second chat turn reusing the cache) hands transformers a sequence longer than the cache by the tokens vltok
removed: it would feed the wrong columns (the tail of the caller's prompt again) and silently generate from a
corrupted cache. Found by transformers' ``test_generate_continue_from_past_key_values`` (docs/peer-suite.md).

``PromptCaches`` remembers, per cache object (weakly: nothing is kept alive), the caller's prompt and the
shortened prompt it stands for; a later generate() given that cache and input_ids that start with the caller's
prompt gets the shortened prompt in its place (and the mask likewise), and its output gets the caller's prompt
back. input_ids that do not start with that prompt are refused: the cache cannot belong to them.
"""
from __future__ import annotations

import threading
import weakref

import torch

from .errors import IncompatibleError


class PromptCaches:
    def __init__(self):
        self._map = weakref.WeakKeyDictionary()   # cache -> (caller's prompt [B, L0], shortened [B, L1], mask [B, L1])
        self._lock = threading.Lock()

    def remember(self, cache, caller_ids: torch.Tensor, short_ids: torch.Tensor, short_mask) -> None:
        """``cache`` now starts with ``short_ids`` (what the model saw) standing for ``caller_ids``."""
        if cache is None or caller_ids is None:
            return
        try:
            with self._lock:
                self._map[cache] = (caller_ids, short_ids, short_mask)
        except TypeError:   # a cache type that cannot be weakly referenced: nothing to remember it by
            pass

    def resume(self, call: dict, cache) -> tuple[dict, int]:
        """The call with the caller's prompt swapped for the shortened one when ``cache`` is one vltok filled, and
        how many columns shorter its input_ids became (0: not such a cache, call unchanged)."""
        if cache is None:
            return call, 0
        try:
            with self._lock:
                entry = self._map.get(cache)
        except TypeError:
            return call, 0
        ids = call.get("input_ids")
        if entry is None or ids is None:
            return call, 0
        caller, short, short_mask = entry
        L0, L1 = caller.shape[1], short.shape[1]
        if ids.shape[0] != caller.shape[0] or ids.shape[1] < L0 or not torch.equal(
                ids[:, :L0], caller.to(ids.device)):
            raise IncompatibleError(
                f"this KV cache was filled by a vltok-patched generate() from a prompt whose image placeholders vltok "
                f"shortened ({L0} -> {L1} columns); continue with input_ids that start with the sequences that call "
                f"returned ({tuple(caller.shape)} prompt), or pass the images again without the cache")
        call = dict(call)
        call["input_ids"] = torch.cat([short.to(ids.device), ids[:, L0:]], dim=1)
        am = call.get("attention_mask")
        if isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[1] == ids.shape[1]:
            fill = short_mask if short_mask is not None else torch.ones_like(short)
            call["attention_mask"] = torch.cat([fill.to(am.device, am.dtype), am[:, L0:]], dim=1)
        return call, L0 - L1
