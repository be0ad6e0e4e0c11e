"""Test videos written by the project (PyAV) and tiny video VLMs with their real processors, shared by the
tests/test_video*.py files."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from vltok.video.synthetic import make_processor, shapes_frame, write_video

N, FPS = 50, 25
VFR_DURATIONS = [40 if i % 10 < 5 else 80 for i in range(N)]   # ms: 25 fps and 12.5 fps stretches


def make_videos(root: Path) -> dict[str, Path]:
    """Good clips (H.264 mp4, VP9 webm, VP8 webm, MPEG-4 avi, a variable-frame-rate mp4) and broken files."""
    root.mkdir(parents=True, exist_ok=True)
    v = {"h264": write_video(root / "h264.mp4", "libx264", N, FPS),
         "vp9": write_video(root / "vp9.webm", "libvpx-vp9", N, FPS),
         "vp8": write_video(root / "vp8.webm", "libvpx", N, FPS),
         "avi": write_video(root / "mpeg4.avi", "mpeg4", N, FPS),
         "vfr": write_video(root / "vfr.mp4", "libx264", N, FPS, durations_ms=VFR_DURATIONS)}
    data = Path(v["vp9"]).read_bytes()
    (root / "truncated.webm").write_bytes(data[: len(data) // 2])
    v["truncated"] = root / "truncated.webm"
    data = Path(v["h264"]).read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])     # moov atom (at the end) lost
    v["truncated_mp4"] = root / "truncated.mp4"
    (root / "zero.mp4").write_bytes(b"")
    v["zero"] = root / "zero.mp4"
    (root / "garbage.mkv").write_bytes(b"\x1a\x45\xdf\xa3 not really matroska " * 20)
    v["garbage"] = root / "garbage.mkv"
    return {k: Path(p) for k, p in v.items()}


def good_folder(root: Path, src: dict, names=("h264", "vp9", "vp8", "vfr")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(src[n], root / Path(src[n]).name)
    return root


def which_frame(img: np.ndarray, n=N) -> int:
    """The moving-shapes frame number an RGB image is closest to (lossy codecs: nearest by mean abs difference)."""
    errs = [np.abs(img.astype(np.int32) - shapes_frame(i, img.shape[0], img.shape[1]).astype(np.int32)).mean()
            for i in range(n)]
    return int(np.argmin(errs))


def tiny_video_model(family: str):
    """(model, processor) of a tiny random config of the family, with its own processor classes."""
    import tiny_families as tf

    m = {"qwen2_vl": lambda: tf.tiny_qwen("2"), "qwen2_5_vl": lambda: tf.tiny_qwen("2.5"),
         "llava_onevision": tf.tiny_onevision, "llava_next_video": tf.tiny_next_video,
         "video_llava": tf.tiny_video_llava}[family]()
    return m, make_processor(m)


def save_tiny(family: str, path: Path) -> Path:
    m, p = tiny_video_model(family)
    m.config.architectures = [type(m).__name__]
    m.save_pretrained(path)
    p.save_pretrained(path)
    return path
