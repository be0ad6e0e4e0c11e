"""Token-Shuffle for understanding models (pre-LLM stage).

Space-to-depth: each s_h x s_w window of the visual grid becomes one token whose channels are the window's tokens
concatenated in raster order inside the window (channel block p = a*s_w + b holds the token at window row a,
column b). The shuffled token is projected back to the model's width.

* Training-free (default): the projection is the fixed mean map (1/(s_h s_w)) [I I ... I], so space-to-depth
  followed by it is exactly s_h x s_w average pooling. Non-divisible grids use ceil-mode windows that average only
  their real tokens.
* Trained: a :class:`ShuffleProjector` (Linear(s_h s_w C -> D), activation, Linear(D -> D)) replaces the model's
  projector. :meth:`ShuffleProjector.from_projector` initialises it from a stock Linear-act-Linear projector with the
  first weight tiled once per window position and divided by s_h s_w: since a linear map commutes with the mean,
  step 0 equals "pool, then the stock projector" exactly. Pass it (or a checkpoint path saved by
  :func:`save_projector`) as ``projector=``.

keep = 1 / (s_h s_w): the window whose product is closest to 1/keep, s_h = s_w or s_h = s_w + 1 (taller windows
pool more along the height), ties to the smaller window. ``window=(s_h, s_w)`` (or a trained projector's window)
fixes the budget instead: keep is then left out, or must pick the same window (:func:`tokenshuffle_budget`).
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import FixedBudget, choice, file_or, int_pair, optional, register
from ..stages import GridPlan, GridReducer, Method
from ._checkpoint import checkpoint_meta

POOLS = ("mean", "max")


def window_for_keep(keep: float) -> tuple[int, int]:
    target = 1.0 / keep
    best = (1, 1)
    s = 1
    while s * s <= 4 * target + 4:
        for cand in ((s, s), (s + 1, s)):
            if abs(cand[0] * cand[1] - target) < abs(best[0] * best[1] - target):
                best = cand
        s += 1
    return best


def space_to_depth(x: torch.Tensor, h: int, w: int, s_h: int, s_w: int) -> torch.Tensor:
    """x [B, h*w, C] (raster) -> [B, (h/s_h)*(w/s_w), s_h*s_w*C], window-major channel blocks (see module doc)."""
    if h % s_h or w % s_w:
        raise ValueError(f"space_to_depth needs a grid divisible by the window: {h}x{w} by {s_h}x{s_w}")
    B, _, C = x.shape
    g = x.view(B, h // s_h, s_h, w // s_w, s_w, C).permute(0, 1, 3, 2, 4, 5)   # [B, H', W', s_h, s_w, C]
    return g.reshape(B, (h // s_h) * (w // s_w), s_h * s_w * C)


def shuffle_pool(x: torch.Tensor, h: int, w: int, s_h: int, s_w: int, pool: str = "mean") -> torch.Tensor:
    """x [B, h*w, C] -> [B, ceil(h/s_h)*ceil(w/s_w), C]: window mean (fp32 accumulation) or max, raster order."""
    if (s_h, s_w) == (1, 1):
        return x
    B, _, C = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)   # fp32 accumulation for half types, fp64 stays fp64
    if h % s_h == 0 and w % s_w == 0:
        g = x.view(B, h // s_h, s_h, w // s_w, s_w, C)
        y = g.to(acc).mean((2, 4)) if pool == "mean" else g.amax((2, 4))
        return y.to(x.dtype).flatten(1, 2)
    g = x.unflatten(1, (h, w)).permute(0, 3, 1, 2).to(acc)
    if pool == "mean":   # ceil mode, no padding: edge windows are clipped and divide by their real size
        y = F.avg_pool2d(g, (s_h, s_w), (s_h, s_w), ceil_mode=True, count_include_pad=False)
    else:
        y = F.max_pool2d(g, (s_h, s_w), (s_h, s_w), ceil_mode=True)
    return y.to(x.dtype).flatten(2).transpose(1, 2)


class ShuffleProjector(nn.Module):
    """Trained shuffle projector: space-to-depth features [B, n, s_h*s_w*C] -> [B, n, D]."""

    def __init__(self, window: tuple[int, int], in_dim: int, width: int, out_dim: int, act: str = "gelu"):
        super().__init__()
        self.window = tuple(window)
        self.act_name = act
        s = window[0] * window[1]
        self.linear_1 = nn.Linear(s * in_dim, width)
        self.act = nn.GELU() if act == "gelu" else nn.GELU(approximate="tanh") if act == "gelu_pytorch_tanh" \
            else nn.SiLU() if act == "silu" else None
        if self.act is None:
            raise ValueError(f"ShuffleProjector: unsupported activation {act!r} (gelu, gelu_pytorch_tanh, silu)")
        self.linear_2 = nn.Linear(width, out_dim)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))

    @classmethod
    def from_projector(cls, linear_1: nn.Linear, linear_2: nn.Linear, act: str, window: tuple[int, int]):
        """Step-0 initialisation from a stock Linear-act-Linear projector: equals pool-then-project exactly."""
        s = window[0] * window[1]
        p = cls(window, linear_1.in_features, linear_1.out_features, linear_2.out_features, act)
        p = p.to(device=linear_1.weight.device, dtype=linear_1.weight.dtype)
        with torch.no_grad():
            p.linear_1.weight.copy_(linear_1.weight.repeat(1, s) / s)
            p.linear_1.bias.copy_(linear_1.bias)
            p.linear_2.weight.copy_(linear_2.weight)
            p.linear_2.bias.copy_(linear_2.bias)
        return p

    def meta(self) -> dict:
        return {"method": "tokenshuffle", "window": list(self.window), "in_dim": self.linear_1.in_features //
                (self.window[0] * self.window[1]), "width": self.linear_1.out_features,
                "out_dim": self.linear_2.out_features, "act": self.act_name}


def save_projector(proj: ShuffleProjector, path: str, encoder: str = "") -> None:
    from safetensors.torch import save_file

    from .. import __version__

    meta = {**proj.meta(), "encoder": encoder, "vltok": __version__}
    save_file({k: v.detach().contiguous().cpu() for k, v in proj.state_dict().items()}, path,
              metadata={"vltok": json.dumps(meta)})


def load_projector(path: str, window: tuple[int, int] | None = None, encoder: str | None = None) -> ShuffleProjector:
    from safetensors.torch import load_file

    meta = checkpoint_meta(path)
    if meta.get("method") != "tokenshuffle":
        raise ValueError(f"{path} is not a vltok tokenshuffle projector checkpoint (no vltok metadata)")
    if window is not None and tuple(meta["window"]) != tuple(window):
        raise ValueError(f"{path} was trained for window {tuple(meta['window'])}, not {tuple(window)}: pass "
                         f"window={tuple(meta['window'])} (keep={1 / math.prod(meta['window']):.4g}) or another checkpoint")
    if encoder and meta.get("encoder") and meta["encoder"] != encoder:
        raise ValueError(f"{path} was trained on the encoder {meta['encoder']!r}, not {encoder!r}")
    p = ShuffleProjector(tuple(meta["window"]), meta["in_dim"], meta["width"], meta["out_dim"], meta["act"])
    p.load_state_dict(load_file(path))
    return p.eval()


class ShuffleReducer(GridReducer):
    def __init__(self, keep: float, window: tuple[int, int], pool: str, projector: ShuffleProjector | None):
        self.keep, self.window, self.pool, self.projector = keep, window, pool, projector

    def plan(self, h: int, w: int) -> GridPlan:
        s_h, s_w = self.window
        r_h, r_w = -(-h // s_h), -(-w // s_w)
        return GridPlan(h, w, r_h * r_w, (r_h, r_w))

    def reduce(self, x: torch.Tensor, plan: GridPlan) -> torch.Tensor:
        """Training-free: the pooled features. With a trained projector: the space-to-depth features that the
        projector (which then replaces the model's) maps to the LLM width; grids must divide by the window."""
        if self.projector is not None:
            return space_to_depth(x, plan.h, plan.w, *self.window)
        return shuffle_pool(x, plan.h, plan.w, *self.window, pool=self.pool)


def as_window(window) -> tuple[int, int]:
    """``window=`` as given (an int or an (s_h, s_w) pair) -> (s_h, s_w)."""
    return (int(window), int(window)) if isinstance(window, int) else tuple(int(s) for s in window)


def projector_window(projector) -> tuple[int, int] | None:
    """The window a projector (a ShuffleProjector or a checkpoint path) was trained for; None when unreadable (the
    factory then says why)."""
    if isinstance(projector, ShuffleProjector):
        return tuple(projector.window)
    try:
        meta = checkpoint_meta(projector)
        return tuple(int(s) for s in meta["window"]) if meta.get("method") == "tokenshuffle" else None
    except Exception:   # not a safetensors file, no metadata: load_projector names the problem
        return None


def tokenshuffle_budget(options: dict) -> FixedBudget | None:
    """``window=`` (or a trained ``projector=``, whose window is fixed) fixes keep = 1/(s_h*s_w); an explicit keep is
    accepted where it picks that same window (window_for_keep) or equals 1/(s_h*s_w)."""
    window, projector = options.get("window"), options.get("projector")
    if window is not None:
        win = as_window(window)
        option, fix = f"window={window!r}", "drop window=... to let keep choose the window"
    elif projector is not None:
        win = projector_window(projector)
        if win is None:
            return None
        name = repr(str(projector)) if not isinstance(projector, ShuffleProjector) else "<ShuffleProjector>"
        option = f"projector={name}"
        fix = ("drop projector=... to pool training-free at that keep, or pass a projector trained for it (vltok "
               "train tokenshuffle --keep K)")
    else:
        return None
    k = 1.0 / (win[0] * win[1])
    return FixedBudget(option, f"the {win[0]}x{win[1]} shuffle window, one token per {win[0] * win[1]}", fix, keep=k,
                       accepts=lambda keep: window_for_keep(keep) == win or abs(keep - k) < 5e-4)


@register("tokenshuffle", "Token-Shuffle: s_h x s_w space-to-depth windows; training-free = window mean pooling "
          "(keep = 1/(s_h*s_w)); trained = shuffle projector (projector=...)", ("pre_llm",), trained_variant=True,
          options=dict(window=optional(int_pair(1)), pool=choice(*POOLS),
                       projector=optional(file_or(lambda: (ShuffleProjector,), "a ShuffleProjector"))),
          budget=tokenshuffle_budget)
def make_tokenshuffle(keep: float, window=None, pool: str = "mean", projector=None) -> Method:
    if window is not None:
        window = as_window(window)
    if projector is not None and not isinstance(projector, ShuffleProjector):   # a checkpoint path
        projector = load_projector(projector, window)
        window = window or projector.window
    elif projector is not None:
        if window is not None and tuple(window) != projector.window:
            raise ValueError(f"tokenshuffle: the projector is for window {projector.window}, not {window}")
        window = projector.window
    window = window or window_for_keep(keep)
    keep_eff = 1.0 / (window[0] * window[1])
    params = dict(window=window, pool=pool, trained=projector is not None, keep_window=keep_eff)
    return Method("tokenshuffle", keep, params, pre_llm=ShuffleReducer(keep, window, pool, projector))
