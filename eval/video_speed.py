"""Video pipeline speed on one GPU: full-size Qwen2-VL-7B and LLaVA-OneVision-7B with random bf16 weights (built from
config, no hub), videos written with PyAV, decoded and answered by vltok.video's own code.

    python -m vltok.eval.video_speed --out eval/results/video-speed-h100      # < 6 min on an H100
    python -m vltok.eval.video_speed --tiny --out /tmp/vs                     # CPU smoke test (tiny configs)

Measures, per model x keep (1.0 = unpatched, 0.5, 0.16; method fourier) x frames (32, 128), batch 1:
videos/s and frames/s of the model side (processor + generate of ``--new-tokens`` tokens), decode seconds per video
(PyAV, or decord when installed; the pipeline overlaps it with the model in worker processes), visual tokens in /
out, peak GPU memory. Then the longest video (frames at 2 fps, at the benchmark's frame size) whose LLM side fits in
``--budget-gb`` (24) of KV cache + activations: bytes per visual token measured on the language model (prefill with a
KV cache at two lengths, in one pass and in 8k-token chunks), divided into the budget, times tokens per frame
patched and unpatched; the one-pass figure for keep 0.16 is then checked by running that prefill when it takes
< ``--verify-max-s`` seconds. The vision tower is reported separately (its peak per frame): Hugging Face's towers
encode all frames of a video at once, so 10,000-frame videos need the tower run in frame chunks, which neither
transformers nor vltok.video does today.
Needs neither ray nor decord; PyAV is optional (without it, decoded frames are synthesised and decode time is n/a).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

QWEN2_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1e6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False)
OV_PINPOINTS = [[384, 384], [384, 768], [384, 1152], [768, 384], [768, 768], [768, 1152], [1152, 384], [1152, 768],
                [1152, 1152]]


def onevision_7b_config(tiny=False):
    """llava-hf/llava-onevision-qwen2-7b-ov-hf's values (SigLIP-so400m/14 at 384 px, 26 layers; Qwen2-7B)."""
    from transformers import LlavaOnevisionConfig

    if tiny:
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, image_size=56, patch_size=14)
        text = dict(model_type="qwen2", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0)
        ids = dict(image_token_index=100, video_token_index=101)
    else:
        vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                      num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                      layer_norm_eps=1e-6)
        text = dict(model_type="qwen2", **{k: v for k, v in QWEN2_7B_TEXT.items() if k != "vocab_size"},
                    vocab_size=152128)
        ids = dict(image_token_index=151646, video_token_index=151647)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                                vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                image_grid_pinpoints=OV_PINPOINTS if not tiny else [[56, 56], [56, 112], [112, 56]],
                                projector_hidden_act="gelu", multimodal_projector_bias=True,
                                tie_word_embeddings=False, **ids)


def qwen_tiny_config():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=dict(model_type="qwen2_vl_text", vocab_size=256, hidden_size=32,
                                          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=65536,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                           "mrope_section": [1, 1, 2]},
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0),
                         vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                                            in_channels=3),
                         image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103)


def build(name, device, dtype, tiny):
    from transformers import LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration

    from vltok.eval.configs import build_random, build_random_from

    if name == "qwen2-vl-7b":
        if tiny:
            return build_random_from(Qwen2VLForConditionalGeneration, qwen_tiny_config(), device, dtype)
        return build_random("qwen2-vl-7b", device=device, dtype=dtype)
    return build_random_from(LlavaOnevisionForConditionalGeneration, onevision_7b_config(tiny), device, dtype)


def frame_size(model):
    """Frames written at the model's native size: 336 x 336 for Qwen2-VL (12 x 12 merged tokens per 2 frames),
    384 x 384 for OneVision (27 x 27 patches pooled to 14 x 14 per frame)."""
    vc = model.config.vision_config
    if type(model).__name__.startswith("Qwen2"):
        f = vc.patch_size * vc.spatial_merge_size
        return (12 * f, 12 * f) if vc.patch_size >= 14 and vc.embed_dim > 64 else (4 * f, 4 * f)
    return vc.image_size, vc.image_size


def make_video(path, n, size):
    try:
        from vltok.video.synthetic import write_video

        return write_video(path, "libx264", frames=n, fps=2, height=size[0], width=size[1])
    except ImportError:
        return None


def decoded(path, n_frames, size, n_video_frames):
    """(frames, indices, fps, total, seconds) from the pipeline's decoder, or synthetic frames without PyAV."""
    from vltok.video.sampling import Sampling

    if path is not None:
        from vltok.video.decoding import decode

        d = decode(path, Sampling(fps=None, frames=n_frames))
        return d.frames, d.indices, d.fps, d.n_frames, d.seconds, d.decoder
    from vltok.video.synthetic import shapes_frame

    idx = np.linspace(0, n_video_frames - 1, n_frames, dtype=np.int64)
    frames = np.stack([shapes_frame(int(i), *size) for i in idx])
    return frames, idx.tolist(), 2.0, n_video_frames, None, "synthetic (no PyAV)"


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_reset(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gb(dev):
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None


def bench_pipeline(model, processor, name, keeps, frame_counts, reps, new_tokens, dev, video_path, size, n_video):
    from vltok.video.models import VideoModel

    rows = []
    for nf in frame_counts:
        frames, idx, fps, total, dsec, dname = decoded(video_path, nf, size, n_video)
        dec_times = [dsec] if dsec is not None else []
        for _ in range(max(0, reps - 1)) if dsec is not None else []:
            dec_times.append(decoded(video_path, nf, size, n_video)[4])
        sample = {"frames": frames, "question": "describe this video in detail", "indices": idx, "fps": fps,
                  "n_frames": total}
        for keep in keeps:
            vm = VideoModel(model, processor, "none" if keep == 1.0 else "fourier", keep,
                            max_new_tokens=new_tokens)
            try:
                vm.answer([sample])   # warm-up
                peak_reset(dev)
                pre, mod = [], []
                for _ in range(reps):
                    res, tp, tm = vm.answer([sample])
                    pre.append(tp)
                    mod.append(tm)
                r = res[0]
                t_model = float(np.median(np.array(pre) + np.array(mod)))
                dec = float(np.median(dec_times)) if dec_times else None
                rows.append({"model": name, "frames": nf, "keep": keep, "tokens_in": r["tokens_in"],
                             "tokens_out": r["tokens_out"], "preprocess_s": round(float(np.median(pre)), 4),
                             "model_s": round(float(np.median(mod)), 4), "decode_s": None if dec is None else
                             round(dec, 4), "decoder": dname,
                             "videos_per_s": round(1 / t_model, 3), "frames_per_s": round(nf / t_model, 2),
                             "videos_per_s_serial_with_decode": None if dec is None else round(1 / (t_model + dec), 3),
                             "peak_gb": None if peak_gb(dev) is None else round(peak_gb(dev), 2)})
                print(json.dumps(rows[-1]), flush=True)
            finally:
                vm.close()
    return rows


def language_model(model):
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", None) or inner.get_decoder()


@torch.no_grad()
def llm_bytes_per_token(model, dev, n_small, n_large, chunk):
    """Peak memory above the weights for a prefill of n visual-token embeddings with a KV cache: one pass and
    chunked. Returns dict with bytes/token slopes and intercepts."""
    from vltok import compat

    DynamicCache = compat.cache_classes()[0]

    lm = language_model(model)
    d = model.config.get_text_config().hidden_size
    dt = next(model.parameters()).dtype
    out = {}
    for mode in ("one_pass", "chunked"):
        peaks = []
        for n in (n_small, n_large):
            peak_reset(dev)
            base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            x = torch.randn(1, n, d, device=dev, dtype=dt)
            cache = DynamicCache()
            step = n if mode == "one_pass" else chunk
            for s in range(0, n, step):
                lm(inputs_embeds=x[:, s:s + step], **{compat.cache_kwarg(lm.forward): cache}, use_cache=True)
            sync(dev)
            peaks.append((peak_gb(dev) or 0) * 2 ** 30 - base)
            del x, cache
        slope = (peaks[1] - peaks[0]) / (n_large - n_small)
        out[mode] = {"bytes_per_token": slope, "intercept_bytes": peaks[0] - slope * n_small,
                     "measured": {str(n_small): peaks[0], str(n_large): peaks[1]}}
    tc = model.config.get_text_config()
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    out["kv_bytes_per_token_exact"] = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * \
        torch.finfo(dt).bits // 8
    return out


@torch.no_grad()
def tower_bytes_per_frame(model, processor, dev, size):
    """Peak memory of the vision tower (get_video_features) per frame, from 8 and 16 frames."""
    peaks = []
    for nf in (8, 16):
        frames = np.zeros((nf, *size, 3), np.uint8)
        kw = {}
        if type(model).__name__.startswith("Qwen2"):
            kw["video_metadata"] = [{"total_num_frames": nf, "fps": 2.0, "frames_indices": list(range(nf))}]
        inp = processor.video_processor(videos=[frames], return_tensors="pt", do_sample_frames=False, **kw)
        pv = inp["pixel_values_videos"].to(dev, next(model.parameters()).dtype)
        peak_reset(dev)
        base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
        if "video_grid_thw" in inp:
            model.model.get_video_features(pv, inp["video_grid_thw"].to(dev))
        else:
            model.model.get_video_features(pv)
        sync(dev)
        peaks.append((peak_gb(dev) or 0) * 2 ** 30 - base)
    return (peaks[1] - peaks[0]) / 8


def tokens_per_frame(model, keep):
    """Visual tokens per frame the LLM holds at ``keep`` (fourier: round(side * sqrt(keep)) per axis, per slice)."""
    vc = model.config.vision_config
    if type(model).__name__.startswith("Qwen2"):
        side = 12   # 336 px / 28
        r = side if keep == 1.0 else round(side * keep ** 0.5)
        return r * r / vc.temporal_patch_size
    import math

    side = math.ceil((vc.image_size // vc.patch_size) / 2)   # OneVision's 2x pooling
    r = side if keep == 1.0 else round(side * keep ** 0.5)
    return float(r * r)


def longest_video(model, mem, keeps, budget_gb):
    budget = budget_gb * 2 ** 30
    rows = []
    for mode in ("one_pass", "chunked"):
        b = mem[mode]["bytes_per_token"]
        c = max(mem[mode]["intercept_bytes"], 0)
        max_tokens = int((budget - c) / b) if b > 0 else None
        for keep in keeps:
            tpf = tokens_per_frame(model, keep)
            rows.append({"prefill": mode, "keep": keep, "tokens_per_frame": tpf, "bytes_per_token": round(b),
                         "max_llm_tokens": max_tokens,
                         "max_frames": int(max_tokens / tpf) if max_tokens else None,
                         "minutes_at_2fps": round(max_tokens / tpf / 2 / 60, 1) if max_tokens else None})
    return rows


@torch.no_grad()
def verify(model, dev, n_tokens, limit_s, rate_tokens_per_s):
    """Run the one-pass prefill at n_tokens when its estimated time is below limit_s; returns the peak above the
    weights (GB) or the reason it was skipped."""
    from vltok import compat

    DynamicCache = compat.cache_classes()[0]

    est = n_tokens / rate_tokens_per_s * (n_tokens / 16384)   # attention grows ~quadratically
    if est > limit_s:
        return {"skipped": f"estimated {est:.0f} s > {limit_s} s"}
    lm = language_model(model)
    d = model.config.get_text_config().hidden_size
    peak_reset(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    t = time.perf_counter()
    try:
        lm(inputs_embeds=torch.randn(1, n_tokens, d, device=dev, dtype=next(model.parameters()).dtype),
           **{compat.cache_kwarg(lm.forward): DynamicCache()}, use_cache=True)
        sync(dev)
    except torch.OutOfMemoryError as e:
        return {"tokens": n_tokens, "error": f"OOM: {str(e)[:200]}"}
    return {"tokens": n_tokens, "seconds": round(time.perf_counter() - t, 2),
            "peak_above_weights_gb": round(((peak_gb(dev) or 0) * 2 ** 30 - base) / 2 ** 30, 2)}


def markdown(res):
    lines = [f"# Video pipeline speed ({res['device']})", "", f"`{res['command']}`", "",
             f"torch {res['versions']['torch']}, transformers {res['versions']['transformers']}; batch 1, "
             f"{res['new_tokens']} new tokens, fourier; medians of {res['reps']} runs after a warm-up.", "",
             "| model | frames | keep | visual tokens in / out | decode s | preprocess s | model s | videos/s | "
             "frames/s | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["pipeline"]:
        lines.append(f"| {r['model']} | {r['frames']} | {r['keep']} | {r['tokens_in']} / {r['tokens_out']} | "
                     f"{r['decode_s']} | {r['preprocess_s']} | {r['model_s']} | {r['videos_per_s']} | "
                     f"{r['frames_per_s']} | {r['peak_gb']} |")
    for name, lv in res["longest"].items():
        mem = lv["memory"]
        lines += ["", f"## {name}: longest video in {res['budget_gb']} GB of KV cache + activations (LLM side)", "",
                  f"KV cache exactly {mem['kv_bytes_per_token_exact']} B/token; measured one-pass prefill "
                  f"{mem['one_pass']['bytes_per_token']:.0f} B/token, 8k-chunked "
                  f"{mem['chunked']['bytes_per_token']:.0f} B/token; vision tower peak "
                  f"{lv['tower_bytes_per_frame'] / 2 ** 20:.1f} MiB/frame (all frames at once).", "",
                  "| prefill | keep | tokens / frame | max LLM tokens | max frames | minutes at 2 fps |",
                  "|---|---|---|---|---|---|"]
        for r in lv["rows"]:
            lines.append(f"| {r['prefill']} | {r['keep']} | {r['tokens_per_frame']} | {r['max_llm_tokens']} | "
                         f"{r['max_frames']} | {r['minutes_at_2fps']} |")
        lines += ["", f"check (one pass, keep 0.16): {json.dumps(lv['verify'])}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for video-speed.json / video-speed.md")
    ap.add_argument("--models", nargs="+", default=["qwen2-vl-7b", "llava-onevision-7b"])
    ap.add_argument("--keeps", nargs="+", type=float, default=[1.0, 0.5, 0.16])
    ap.add_argument("--frames", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--verify-max-s", type=float, default=30.0)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    import transformers

    import vltok  # noqa: F401
    from vltok.video.synthetic import make_processor

    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    res = {"command": "python -m vltok.eval.video_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "new_tokens": a.new_tokens, "reps": a.reps, "budget_gb": a.budget_gb, "pipeline": [], "longest": {}}
    n_video = max(a.frames) * 2   # a clip of 2x the largest frame count at 2 fps
    tmp = tempfile.mkdtemp(prefix="vltok-video-speed-")
    for name in a.models:
        t = time.perf_counter()
        model = build(name, dev, dtype, a.tiny)
        processor = make_processor(model)
        size = frame_size(model)
        path = make_video(os.path.join(tmp, f"{name}.mp4"), n_video, size)
        print(f"{name}: built in {time.perf_counter() - t:.1f} s; frames {size}; video {path}", flush=True)
        res["pipeline"] += bench_pipeline(model, processor, name, a.keeps, a.frames, a.reps, a.new_tokens, dev,
                                          path, size, n_video)
        n_small, n_large = (4096, 16384) if not a.tiny else (256, 1024)
        t = time.perf_counter()
        mem = llm_bytes_per_token(model, dev, n_small, n_large, 8192 if not a.tiny else 256)
        rate = n_large / max(time.perf_counter() - t, 1e-6)
        rows = longest_video(model, mem, a.keeps, a.budget_gb)
        target = next(r for r in rows if r["prefill"] == "one_pass" and r["keep"] == min(a.keeps))
        check = verify(model, dev, target["max_llm_tokens"], a.verify_max_s, rate) \
            if dev.type == "cuda" and target["max_llm_tokens"] else {"skipped": "no CUDA device"}
        res["longest"][name] = {"memory": mem, "rows": rows, "tower_bytes_per_frame": tower_bytes_per_frame(
            model, processor, dev, size), "verify": check}
        print(json.dumps(res["longest"][name]["rows"]), flush=True)
        del model, processor
        import gc

        gc.collect()
        peak_reset(dev)
        (out / "video-speed.json").write_text(json.dumps(res, indent=1))
    res["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "video-speed.json").write_text(json.dumps(res, indent=1))
    (out / "video-speed.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
