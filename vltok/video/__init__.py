"""Offline video batch processing: a (patched) video VLM over a folder of videos, resumable, on Ray for scale.

    import vltok.video
    res = vltok.video.run("videos/", "results/", model="path/to/Qwen2-VL-7B-Instruct", method="fourier",
                          keep=0.16, question="What happens?", fps=1, max_frames=32)
    res.rows        # one dict per (video, question); res.summary: where the time went

Same as ``vltok video run``; docs/video.md.
"""
from .decoding import DecodeError, decode, probe
from .output import read_results
from .pipeline import RunResult, run
from .sampling import Sampling, SamplingError, sample_indices, sample_times

__all__ = ["run", "RunResult", "read_results", "decode", "probe", "DecodeError", "Sampling", "SamplingError",
           "sample_indices", "sample_times"]
