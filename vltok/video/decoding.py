"""Reading sampled frames from a video file: decord first (one ``VideoReader`` per call, so never shared across
processes), PyAV per file when decord cannot be trusted, and a probe that turns broken files into clear reasons.

Every file is probed with PyAV's demuxer first (packets only, no decoding): codec, frame count, every frame's
presentation time, declared duration. That gives:

* errors with a reason: empty file, unreadable / not a video, no video stream, no frames, truncated (the container
  declares a longer duration than the packets hold), corrupt packets;
* the variable-frame-rate test (frame durations that differ by more than 10 %): such files are sampled in time and
  decoded with PyAV (decord's index / average-fps model is wrong there);
* VP8 goes to PyAV (decord's known wrong frames on VP8 / webm);
* a check of decord's answer: its frame count and the sampled frames' timestamps must match the container's, else
  the file falls back to PyAV and the row says why.

decord's memory grows after ``get_batch`` on large videos: frames are read in chunks of ``chunk`` with a
``seek(0)`` after each, and the reader is dropped after the file.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import VltokError
from .sampling import Sampling, sample_indices, sample_times

DECORD_CHUNK = 32


class DecodeError(VltokError):
    """This file cannot be decoded; the message is the reason written in its row."""


class _Fallback(Exception):
    pass


def have_decord() -> bool:
    try:
        import decord  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Probe:
    codec: str
    n_frames: int
    timestamps: np.ndarray        # seconds from the first frame, presentation order
    fps: float                     # average over the readable frames
    declared: float | None         # duration the container / stream header declares (s)
    vfr: bool
    width: int
    height: int
    pts: np.ndarray = field(repr=False, default=None)   # sorted packet pts (stream time base)


def probe(path) -> Probe:
    path = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DecodeError(f"cannot read the file: {e.strerror or e}") from None
    if size == 0:
        raise DecodeError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DecodeError("permission denied: the file is not readable")
    import av

    try:
        c = av.open(path)
    except Exception as e:   # av.error.FFmpegError and OSError subclasses
        raise DecodeError(f"not a readable video (corrupt or unknown container): {_short(e)}") from None
    try:
        if not c.streams.video:
            raise DecodeError("no video stream in the file")
        s = c.streams.video[0]
        codec = s.codec_context.name
        tb = float(s.time_base) if s.time_base else None
        width, height = int(s.codec_context.width or 0), int(s.codec_context.height or 0)
        declared = float(s.duration * s.time_base) if s.duration and s.time_base else (
            c.duration / 1e6 if c.duration else None)
        rate = float(s.average_rate) if s.average_rate else None
        pts = []
        try:
            for pk in c.demux(s):
                if pk.pts is not None and pk.size:
                    pts.append(pk.pts)
        except Exception as e:
            raise DecodeError(f"corrupt file: reading packets failed after {len(pts)} frames: {_short(e)}") from None
    finally:
        c.close()
    if not pts:
        raise DecodeError("no video frames in the file")
    if tb is None:
        raise DecodeError("the video stream has no time base")
    pts = np.unique(np.asarray(pts, dtype=np.int64))
    ts = (pts - pts[0]) * tb
    n = len(ts)
    d = np.diff(ts)
    vfr = False
    if n > 2:
        med = float(np.median(d))
        vfr = bool(med > 0 and (d.max() - d.min()) > max(0.1 * med, 2.5 * tb))
    fps = (n - 1) / ts[-1] if n > 1 and ts[-1] > 0 else (rate or 1.0)
    if declared and n > 1:
        readable = ts[-1] + (ts[-1] / (n - 1))
        if readable < 0.9 * declared - 0.05:
            raise DecodeError(f"truncated file: the container declares {declared:.2f} s, only {readable:.2f} s of "
                              f"frames ({n}) are readable")
    return Probe(codec, n, ts, float(fps), declared, vfr, width, height, pts)


def _short(e) -> str:
    s = str(e).strip().replace("\n", " ")
    return s[:300]


@dataclass
class Decoded:
    frames: np.ndarray            # [T, H, W, 3] uint8 RGB
    indices: list
    timestamps: list
    decoder: str
    fps: float
    n_frames: int
    duration: float
    seconds: float
    width: int = 0
    height: int = 0


def choose_indices(p: Probe, sampling: Sampling) -> np.ndarray:
    if p.vfr:
        return sample_times(sampling, p.timestamps)
    return sample_indices(sampling, p.n_frames, p.fps)


def decode(path, sampling: Sampling, decoder: str = "auto", num_threads: int = 1, chunk: int = DECORD_CHUNK) -> Decoded:
    """Sample and decode one file. ``decoder``: "auto" (decord when installed and trusted, else PyAV), "decord"
    (still falls back per file, saying why), "av". Raises :class:`DecodeError` with the reason."""
    t0 = time.perf_counter()
    if decoder not in ("auto", "decord", "av"):
        raise DecodeError(f"unknown decoder {decoder!r}: use auto, decord or av")
    p = probe(path)
    idx = choose_indices(p, sampling)
    used, reason = "av", None
    if decoder != "av":
        if not have_decord():
            if decoder == "decord":
                raise DecodeError("decord is not installed: pip install 'vltok[video]' (or use --decoder av)")
        elif p.codec == "vp8":
            reason = "VP8: decord returns wrong frames on VP8 / webm"
        elif p.vfr:
            reason = "variable frame rate: decord's index / average-fps model is wrong there"
        else:
            used = "decord"
    frames = None
    if used == "decord":
        try:
            frames = _decord_frames(str(path), idx, p, num_threads, chunk)
        except _Fallback as e:
            used, reason = "av", str(e)
    if frames is None:
        frames = _av_frames(str(path), idx, p, num_threads)
    label = used if reason is None else f"av (fallback: {reason})"
    ts = p.timestamps[idx]
    return Decoded(frames, idx.tolist(), [round(float(t), 6) for t in ts], label, round(p.fps, 6), p.n_frames,
                   round(float(p.timestamps[-1] + (p.timestamps[-1] / max(p.n_frames - 1, 1))), 6),
                   time.perf_counter() - t0, int(frames.shape[2]), int(frames.shape[1]))


def _decord_frames(path, idx, p: Probe, num_threads, chunk):
    import decord

    try:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=int(num_threads))
    except Exception as e:
        raise _Fallback(f"decord cannot open the file: {_short(e)}") from None
    try:
        n = len(vr)
        if n != p.n_frames:
            raise _Fallback(f"decord counts {n} frames, the container {p.n_frames}")
        uniq = np.unique(idx)
        try:
            dts = np.asarray(vr.get_frame_timestamp(uniq.tolist()))[:, 0]
            d0 = float(np.asarray(vr.get_frame_timestamp([0]))[0, 0])
        except Exception as e:
            raise _Fallback(f"decord cannot give frame timestamps: {_short(e)}") from None
        half = 0.5 / max(p.fps, 1e-6)
        bad = np.abs((dts - d0) - p.timestamps[uniq]) > half
        if bad.any():
            j = int(np.nonzero(bad)[0][0])
            raise _Fallback(f"decord's frame {int(uniq[j])} is at {dts[j] - d0:.3f} s, the container says "
                            f"{p.timestamps[uniq[j]]:.3f} s")
        parts = []
        try:
            for s in range(0, len(uniq), chunk):
                parts.append(vr.get_batch(uniq[s:s + chunk].tolist()).asnumpy())
                vr.seek(0)      # releases the decoder's buffered frames (decord's memory growth after get_batch)
        except Exception as e:
            raise _Fallback(f"decord failed while decoding: {_short(e)}") from None
    finally:
        del vr
    got = np.concatenate(parts)
    return got[np.searchsorted(uniq, idx)]


def _av_frames(path, idx, p: Probe, num_threads):
    import av

    uniq = np.unique(idx)
    want = set(uniq.tolist())
    last = int(uniq[-1])
    got = {}
    try:
        c = av.open(path)
    except Exception as e:
        raise DecodeError(f"not a readable video: {_short(e)}") from None
    try:
        s = c.streams.video[0]
        if num_threads > 1:
            s.thread_type = "AUTO"
            s.codec_context.thread_count = int(num_threads)
        k = -1
        try:
            for f in c.decode(s):
                k += 1
                i = k
                if f.pts is not None:
                    j = int(np.searchsorted(p.pts, f.pts))
                    if j < len(p.pts) and p.pts[j] == f.pts:
                        i = j
                if i in want and i not in got:
                    got[i] = f.to_ndarray(format="rgb24")
                if i >= last and len(got) == len(want):
                    break
        except Exception as e:
            raise DecodeError(f"corrupt video: decoding failed after {len(got)} of {len(want)} sampled frames: "
                              f"{_short(e)}") from None
    finally:
        c.close()
    missing = sorted(want - set(got))
    if missing:
        raise DecodeError(f"corrupt or truncated video: {len(missing)} of {len(want)} sampled frames could not be "
                          f"decoded (first: frame {missing[0]})")
    frames = np.stack([got[int(i)] for i in idx])
    return frames
