"""Shared budget rules for grid methods."""
from __future__ import annotations

import math

ROUNDINGS = ("nearest", "floor")


def side_for_keep(n: int, keep: float, rounding: str) -> int:
    """Output side length for an axis of n tokens at area-keep ``keep`` (per-axis ratio sqrt(keep)).

    ``floor`` is the Fourier-VLM official rule with a 0.01 tolerance (keep=0.111 on 24 gives 8, not 7);
    ``nearest`` rounds to the closest integer. Both are clamped to [1, n].
    """
    rho = math.sqrt(keep)
    if rounding == "floor":
        r = math.floor(n * rho + 0.01)
    elif rounding == "nearest":
        r = math.floor(n * rho + 0.5)
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return max(1, min(n, r))


def grid_for_keep(h: int, w: int, keep: float, rounding: str = "nearest") -> tuple[int, int]:
    return side_for_keep(h, keep, rounding), side_for_keep(w, keep, rounding)
