"""Frame sampling the way the video models' own pipelines sample (no decoding here: pure index arithmetic).

* ``fps`` mode, Qwen2-VL / qwen-vl-utils ``smart_nframes``: n = duration x fps (default 2 fps), clamped to
  [min_frames (4), max_frames (768)] and to the frames available, rounded down to an even count (the 2-frame
  temporal patch); indices = ``linspace(first, last, n)`` rounded to the nearest frame.
* ``frames`` mode, LLaVA-NeXT-Video / LLaVA-OneVision / lmms-eval: N frames spread uniformly,
  ``np.linspace(first, last, N, dtype=int)`` (truncation, as lmms-eval's ``load_video``).
* ``start`` / ``end`` (seconds) restrict both to a window: first = ceil(start x fps), last = min(floor(end x fps),
  total - 1) (qwen-vl-utils' ``video_start`` / ``video_end``).

Variable-frame-rate files are sampled in time instead of index: the same counts, targets spread uniformly between
the window's first and last timestamps, each mapped to the frame shown at that time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import VltokError

FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
FRAME_FACTOR = 2


class SamplingError(VltokError):
    """The sampling request cannot be met for this video (too few frames, empty window)."""


@dataclass(frozen=True)
class Sampling:
    """How to pick frames: ``fps`` (Qwen2-VL style) or ``frames`` (uniform N); optional window in seconds."""
    fps: float | None = FPS
    frames: int | None = None
    max_frames: int | None = None
    min_frames: int = FPS_MIN_FRAMES
    start: float | None = None
    end: float | None = None

    def __post_init__(self):
        if (self.fps is None) == (self.frames is None):
            raise SamplingError("give exactly one of fps= (frames per second, Qwen2-VL style) or frames= (a uniform "
                                "count, LLaVA-NeXT-Video style)")
        if self.fps is not None and not self.fps > 0:
            raise SamplingError(f"fps must be > 0, got {self.fps}")
        if self.frames is not None and (int(self.frames) != self.frames or self.frames < 1):
            raise SamplingError(f"frames must be a positive integer, got {self.frames}")
        if self.max_frames is not None and self.max_frames < 1:
            raise SamplingError(f"max_frames must be >= 1, got {self.max_frames}")
        if self.start is not None and self.start < 0:
            raise SamplingError(f"start must be >= 0 seconds, got {self.start}")
        if self.end is not None and self.start is not None and self.end <= self.start:
            raise SamplingError(f"end ({self.end}) must be after start ({self.start})")

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def _floor_by(x, f=FRAME_FACTOR):
    return int(math.floor(x / f) * f)


def _ceil_by(x, f=FRAME_FACTOR):
    return int(math.ceil(x / f) * f)


def _round_by(x, f=FRAME_FACTOR):
    return int(round(x / f) * f)


def window(total: int, fps: float, start=None, end=None) -> tuple[int, int]:
    """First and last frame index (inclusive) of the [start, end] window of a constant-rate video."""
    if total < 1:
        raise SamplingError("the video has no frames")
    first = math.ceil(start * fps) if start else 0
    last = min(math.floor(end * fps), total - 1) if end is not None else total - 1
    if first > last:
        raise SamplingError(f"the window start={start} end={end} s holds no frame of this video "
                            f"({total} frames at {fps:g} fps = {total / fps:.2f} s)")
    return first, last


def qwen_nframes(total: int, video_fps: float, fps: float = FPS, min_frames: int = FPS_MIN_FRAMES,
                 max_frames: int | None = None) -> int:
    """qwen-vl-utils ``smart_nframes`` for ``total`` frames at ``video_fps`` sampled at ``fps``."""
    min_f = _ceil_by(min_frames)
    max_f = _floor_by(min(max_frames if max_frames is not None else FPS_MAX_FRAMES, total))
    n = total / video_fps * fps
    n = min(min(max(n, min_f), max_f), total)
    n = _floor_by(n)
    if not FRAME_FACTOR <= n <= total:
        raise SamplingError(f"fps sampling needs at least {FRAME_FACTOR} frames (Qwen2-VL's temporal patch); this "
                            f"window has {total}")
    return n


def count(s: Sampling, total: int, video_fps: float) -> int:
    if s.fps is not None:
        return qwen_nframes(total, video_fps, s.fps, s.min_frames, s.max_frames)
    n = int(s.frames)
    return min(n, s.max_frames) if s.max_frames else n


def sample_indices(s: Sampling, total: int, video_fps: float) -> np.ndarray:
    """Frame indices (int64, non-decreasing) of a constant-rate video of ``total`` frames at ``video_fps``."""
    first, last = window(total, video_fps, s.start, s.end)
    n = count(s, last - first + 1, video_fps)
    if s.fps is not None:
        return np.linspace(first, last, n).round().astype(np.int64)
    return np.linspace(first, last, n, dtype=np.int64)


def sample_times(s: Sampling, timestamps: np.ndarray) -> np.ndarray:
    """Variable frame rate: the same counts as :func:`sample_indices` (average rate over the window), targets spread
    uniformly in time, each mapped to the frame on screen at that time (the last frame whose timestamp <= target)."""
    ts = np.asarray(timestamps, dtype=np.float64)
    total = len(ts)
    if total < 1:
        raise SamplingError("the video has no frames")
    lo = s.start or 0.0
    hi = s.end if s.end is not None else math.inf
    inside = np.nonzero((ts >= lo - 1e-9) & (ts <= hi + 1e-9))[0]
    if not len(inside):
        raise SamplingError(f"the window start={s.start} end={s.end} s holds no frame of this video "
                            f"({total} frames, {ts[-1]:.2f} s)")
    first, last = int(inside[0]), int(inside[-1])
    span = ts[last] - ts[first]
    k = last - first + 1
    avg_fps = (k - 1) / span if span > 0 else 1.0
    n = count(s, k, avg_fps)
    targets = np.linspace(ts[first], ts[last], n)
    idx = np.searchsorted(ts, targets + 1e-9, side="right") - 1
    return np.clip(idx, first, last).astype(np.int64)
