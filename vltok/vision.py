"""Vision-encoder stage: merge tokens inside the encoder's layers, between the attention residual and the MLP.

A method's ``vision`` object (ToMe, CrossGET, MustDrop's stage 1) is a :class:`vltok.stages.VisionMerger`: its
docstring and declared attributes are the protocol (schedule / merge, the optional data-dependent ``decide`` that an
adapter probes with :func:`probe_vision`, trailing learned tokens that an adapter must strip, ``trailing_ok=True``).

An adapter describes one encoder family with a :class:`LayerSplit` per layer: the attention half (with residual)
called with an additive bias, the MLP half (with residual), the q/k projections to hook and the head count. This
module wraps each layer's ``forward`` on the instance (restorable); nothing is installed when the schedule is all
zeros, and layers before the first merge run their original forward, so r = 0 is bit-identical.

Proportional attention: after a merge, every later layer adds log(size_j) to the logit of key j, passed to the
model's own attention function as an additive mask [B, 1, 1, N] (eager and SDPA add it; FlashAttention cannot, so
it is refused with a clear error while ``prop_attn`` is on).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import IncompatibleError


@dataclass
class LayerSplit:
    attn: Callable      # (x, bias or None) -> x after the attention residual
    mlp: Callable       # x -> x after the MLP residual
    q_proj: torch.nn.Module | None
    k_proj: torch.nn.Module
    n_heads: int
    qk_fused: bool = False   # k_proj is a fused qkv Linear (timm / open_clip): output [.., 3*H*d]


class VisionRun:
    """Per-call state of one patched encoder (reset at layer 0)."""

    def __init__(self):
        self.probing = False
        self.decide = False
        self.track = False   # carry the group tracer through the merges (set per call by the adapter: handle.record_kept)
        self.reset(None)

    def groups(self) -> torch.Tensor | None:
        """After a tracked call: [B, N_in] the index of the output token each input token (CLS included) ended in;
        None when the call was not tracked or nothing merged."""
        if self.members is None:
            return None
        return self.members.argmax(1)

    def reset(self, x):
        self.size = None
        self.pos = None
        self.q = self.k = None
        self.capture = False
        self.counts = [] if x is None else [x.shape[1]]
        self.batch = 0 if x is None else x.shape[0]
        self.seconds = 0.0
        self.appended = 0   # trailing tokens appended in this call (stripped by the adapter before the projector)
        # group tracer (``track``): [B, N_cur, N_in] > 0 where input token j belongs to current token i
        self.members = None


class _Probed(Exception):
    def __init__(self, r):
        self.r = r


def probe_vision(run: VisionRun, call_encoder: Callable) -> int:
    """Run the patched encoder (``call_encoder()``) only up to a data-dependent merger's ``merge_layer`` and return
    the r its ``decide`` picks there (nothing is merged, the rest of the encoder does not run)."""
    run.probing = True
    try:
        call_encoder()
    except _Probed as p:
        return p.r
    finally:
        run.probing = False
    raise RuntimeError("vltok: the vision encoder never reached the merging layer while probing the merge count")


def size_bias(size: torch.Tensor, dtype) -> torch.Tensor:
    """[B, N, 1] token sizes -> the additive attention bias [B, 1, 1, N] = log(size)."""
    return size.transpose(1, 2)[:, None].log().to(dtype)


def layer_bias(run: VisionRun, merger, x: torch.Tensor):
    """The additive attention bias [B, 1, 1, N] for a layer's input x: log(size) under proportional attention,
    -inf on the keys of trailing tokens that only read (``visible=False``); None when neither applies."""
    prop = run.size is not None and merger.prop_attn
    if not run.appended or merger.visible:
        return size_bias(run.size, x.dtype) if prop else None
    B, N = x.shape[:2]
    t = run.appended
    bias = size_bias(run.size, x.dtype) if prop else torch.zeros(B, 1, 1, N, dtype=x.dtype, device=x.device)
    return torch.cat([bias[..., :N - t], torch.full_like(bias[..., N - t:], float("-inf"))], -1)


def install_vision(layers: list, split: Callable, merger, schedule, n_protected: int, undo: list,
                   attn_impl: str | None = None, on_done: Callable | None = None, nominal: int | None = None,
                   trailing_ok: bool = False, track: Callable[[], bool] | None = None) -> VisionRun:
    """Wrap ``layers[i].forward`` to merge ``schedule[i]`` tokens after its attention.

    ``split(layer) -> LayerSplit``; ``schedule`` has one r per layer (trailing layers may be 0 or missing), or is
    a callable ``n_patches -> list`` evaluated per call on the tokens that reach layer 0 (images of another size
    than the config's), with ``nominal`` patches deciding whether anything is installed at all;
    ``on_done(run)`` is called after the last layer with the run's state (token counts per layer, seconds).
    ``track()`` (read at layer 0 of each call; e.g. ``handle.record_kept``): carry a one-hot group tracer through
    the merges (mergers whose ``merge`` takes ``extra``), so ``run.groups()`` gives every input token's group.
    """
    from .hooks import set_instance_attr

    pad = lambda sch: list(sch) + [0] * (len(layers) - len(sch))
    schedule_fn = schedule if callable(schedule) else None
    data_dependent = merger.decide is not None
    schedule = schedule_fn(nominal) if schedule_fn else schedule
    schedule = pad(schedule or [])
    run = VisionRun()
    if not any(schedule) and not data_dependent:
        return run
    trailing = merger.trailing
    if trailing and not trailing_ok:
        raise IncompatibleError("this method appends a learned token to the vision encoder (CrossGET's cross_tokens), "
                                "which this family's adapter cannot strip before the projector (LLaVA-1.5 only); "
                                "use the training-free mode (no cross_tokens=)")
    if merger.prop_attn and attn_impl is not None and "flash" in attn_impl:
        raise IncompatibleError(
            f"proportional attention adds a log-size bias to the vision encoder's attention, which {attn_impl} "
            "cannot take; load the model with attn_implementation='sdpa' (or 'eager'), or pass prop_attn=False")
    first = 0 if (schedule_fn or trailing) else next(i for i, r in enumerate(schedule) if r)
    after_mlp = merger.after_mlp
    can_track = track is not None and "extra" in inspect.signature(merger.merge).parameters
    decide_at = merger.merge_layer

    for i, layer in enumerate(layers):
        parts = split(layer)
        orig = layer.forward

        def make_hook(which):
            def hook(module, args, out):
                if run.capture:
                    setattr(run, which, out)
            return hook

        if i >= first:   # (hooks store only while a merging layer runs its attention)
            if parts.q_proj is not None and merger.needs_query:
                h = parts.q_proj.register_forward_hook(make_hook("q"))
                undo.append(h.remove)
            h = parts.k_proj.register_forward_hook(make_hook("k"))
            undo.append(h.remove)

        def forward(hidden_states, *args, _i=i, _orig=orig, _parts=parts, **kwargs):
            if _i == 0:
                run.reset(hidden_states)
                run.track = bool(can_track and track() and not run.probing)
                if schedule_fn is not None:
                    sch = None if run.probing else schedule_fn(hidden_states.shape[1] - n_protected)
                    run.decide = sch is None   # data-dependent count: decided at the merge layer
                    schedule[:] = pad(sch or [])
            deciding = run.decide and _i == decide_at
            r = schedule[_i]
            if trailing:   # the cross token: appended before layer 0, refreshed before every later layer
                hidden_states = merger.enter(_i, hidden_states, _i > 0)
                run.appended = trailing
            if _i < first or (not r and not deciding and run.size is None and not trailing):   # nothing merged yet: original layer
                out = _orig(hidden_states, *args, **kwargs)
                run.counts.append(out.shape[1] - run.appended)
                if _i == len(layers) - 1 and on_done is not None:
                    on_done(run)
                return out
            bias = layer_bias(run, merger, hidden_states)
            run.capture = bool(r) or deciding
            try:
                x = _parts.attn(hidden_states, bias)
            finally:
                run.capture = False
            if after_mlp:
                x = _parts.mlp(x)
            if r or deciding:
                t0 = time.perf_counter()
                B, N, _ = x.shape
                H = _parts.n_heads
                k = run.k
                if _parts.qk_fused:
                    qkv = k.view(B, N, 3, H, -1)
                    q, k = qkv[:, :, 0], qkv[:, :, 1]
                else:
                    k = k.view(B, N, H, -1)
                    q = run.q.view(B, N, H, -1) if run.q is not None else None
                qi = merger.query_index
                query = q[:, qi] if (q is not None and (n_protected > 0 or trailing) and merger.needs_query) else None
                if deciding:
                    r = schedule[_i] = merger.decide(x, run.size, k, query, n_protected)
                    if run.probing:
                        raise _Probed(r)
                if r:
                    if run.size is None:
                        run.size = torch.ones(B, N, 1, device=x.device, dtype=torch.float32)
                        run.pos = torch.arange(N, device=x.device).expand(B, N)
                    if run.track:   # a one-hot tracer rides along as extra channels: its nonzeros are the groups
                        if run.members is None:
                            run.members = torch.eye(N, device=x.device).expand(B, N, N)
                        x, run.size, run.pos, run.members = merger.merge(x, run.size, run.pos, k, query, r,
                                                                         n_protected, extra=run.members)
                    else:
                        x, run.size, run.pos = merger.merge(x, run.size, run.pos, k, query, r, n_protected)
                run.q = run.k = None
                run.seconds += time.perf_counter() - t0
            out = x if after_mlp else _parts.mlp(x)
            run.counts.append(out.shape[1] - run.appended)
            if _i == len(layers) - 1 and on_done is not None:
                on_done(run)
            return out

        set_instance_attr(layer, "forward", forward, undo)
    return run
