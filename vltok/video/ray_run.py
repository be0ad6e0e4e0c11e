"""Scale-out on Ray Data: the path list as a dataset, decoding in ``map_batches`` tasks (CPU), the model in an actor
pool (``map_batches`` with a class, ``concurrency`` actors, ``num_gpus`` each), rows written as Parquet under
``OUT/ray/``. Resume: ids already in readable Parquet files of ``OUT`` are skipped; a file a killed job left
half-written (no Parquet footer) is deleted and its rows are redone.

Multi-node: start the head (``ray start --head``) and workers (``ray start --address HEAD:6379``) with the videos and
``--out`` on storage every node mounts at the same path, then ``vltok video run ... --ray --ray-address auto``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import VltokError
from . import output, sources


def _decode_batch(batch, sampling, decoder, num_threads):
    """Ray task: decode each video of the batch; frames travel as raw bytes + shape (any size)."""
    from .pipeline import _decode_one

    out = {k: [] for k in ("key", "path", "qids", "ok", "error", "frames", "shape", "meta")}
    for key, path, qids in zip(batch["key"], batch["path"], batch["qids"]):
        res = _decode_one(str(key), str(path), sampling, decoder, num_threads)
        out["key"].append(str(key))
        out["path"].append(str(path))
        out["qids"].append(str(qids))
        if res[0] == "ok":
            d = res[3]
            out["ok"].append(True)
            out["error"].append("")
            out["frames"].append(np.ascontiguousarray(d.frames).tobytes())
            out["shape"].append(json.dumps(list(d.frames.shape)))
            out["meta"].append(json.dumps({"indices": d.indices, "timestamps": d.timestamps, "decoder": d.decoder,
                                           "fps": d.fps, "n_frames": d.n_frames, "duration": d.duration,
                                           "seconds": d.seconds}))
        else:
            out["ok"].append(False)
            out["error"].append(res[3])
            out["frames"].append(b"")
            out["shape"].append("[]")
            out["meta"].append(json.dumps({"seconds": res[4]}))
    return {k: np.array(v, dtype=object) if k != "ok" else np.array(v, dtype=bool) for k, v in out.items()}


def _decode_remote_args():
    return {"num_cpus": 1}


class ModelActor:
    """One model replica (one GPU with num_gpus=1): answers the (video, question) samples of each batch."""

    def __init__(self, model_spec, questions, method, keep, method_kwargs, max_new_tokens, device, dtype,
                 batch_size):
        from .models import VideoModel, load

        m, p, _ = load(model_spec, device, dtype)
        self.vm = VideoModel(m, p, method, keep, method_kwargs, max_new_tokens)
        self.qs = {q[0]: sources.Question(*q) for q in questions}
        self.bs = int(batch_size)

    def __call__(self, batch):
        import pyarrow as pa

        from .pipeline import error_rows

        rows, samples = [], []
        for key, path, qids, ok, err, fr, shape, meta in zip(batch["key"], batch["path"], batch["qids"],
                                                             batch["ok"], batch["error"], batch["frames"],
                                                             batch["shape"], batch["meta"]):
            v = sources.Video(str(key), str(path))
            qs = [self.qs[q] for q in json.loads(qids)]
            meta = json.loads(meta)
            if not ok:
                rows += error_rows(v, qs, str(err), meta.get("seconds", 0.0))
                continue
            frames = np.frombuffer(fr, dtype=np.uint8).reshape(json.loads(shape))
            for q in qs:
                samples.append((v, q, frames, meta))
        for i in range(0, len(samples), self.bs):
            rows += self._answer(samples[i:i + self.bs])
        return pa.Table.from_pylist([output.normalise(r) for r in rows], schema=output.arrow_schema())

    def _answer(self, chunk):
        inputs = [{"frames": f, "question": q.text, "indices": m["indices"], "fps": m["fps"],
                   "n_frames": m["n_frames"]} for v, q, f, m in chunk]
        try:
            res, tp, tm = self.vm.answer(inputs)
        except Exception as e:
            if len(chunk) > 1:
                return [r for one in chunk for r in self._answer([one])]
            res, tp, tm = [{"error": f"model: {type(e).__name__}: {str(e)[:500]}"}], 0.0, 0.0
        out = []
        for (v, q, f, m), r in zip(chunk, res):
            out.append({"id": sources.row_id(v, q), "video": v.key, "path": v.path, "question_id": q.qid,
                        "question": q.text, "answer": r.get("answer"),
                        "frames": {"indices": m["indices"], "timestamps": m["timestamps"]},
                        "video_frames": m["n_frames"], "video_fps": m["fps"], "video_seconds": m["duration"],
                        "tokens_in": r.get("tokens_in"), "tokens_out": r.get("tokens_out"),
                        "seconds": {"decode": m["seconds"], "model": (tp + tm) / len(chunk)},
                        "decoder": m["decoder"], "error": r.get("error")})
        return out


def _clean_partial(d: Path) -> int:
    """Delete Parquet files a killed job left without a footer; returns how many."""
    import pyarrow.parquet as pq

    n = 0
    for f in sorted(d.glob("*.parquet")) if d.is_dir() else []:
        try:
            pq.read_metadata(f)
        except Exception:
            f.unlink()
            n += 1
    return n


def run_ray(vids, qs, out, model_spec, cfg, sampling, *, method, keep, method_kwargs, batch_size, num_threads,
            decoder, max_new_tokens, device, dtype, address, num_gpus, concurrency, progress):
    try:
        import ray
        import ray.data
    except ImportError:
        raise VltokError("--ray needs Ray Data: pip install 'vltok[distributed]'") from None
    from .pipeline import RunResult

    t0 = time.perf_counter()
    cfg = dict(cfg, format="parquet")
    store = output.Store(out, "parquet", cfg)   # lock + configuration check (shards of local runs count as done)
    try:
        removed = _clean_partial(store.out / "ray")
        done = {r["id"] for r in output.read_results(store.out)}
        tasks = []
        for v in vids:
            need = [q.qid for q in sources.questions_for(v, qs) if sources.row_id(v, q) not in done]
            if need:
                tasks.append({"key": v.key, "path": v.path, "qids": json.dumps(need)})
        skipped = len(vids) - len(tasks)
        if tasks:
            if not ray.is_initialized():
                ray.init(address=address, ignore_reinit_error=True,
                         log_to_driver=bool(progress))
            if num_gpus and ray.cluster_resources().get("GPU", 0) < num_gpus:
                raise VltokError(f"the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs, each model "
                                 f"actor asks for {num_gpus}: add GPU nodes, or pass --num-gpus-per-worker 0 to run "
                                 "the model on CPU")
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = bool(progress)
            ds = ray.data.from_items(tasks, override_num_blocks=max(1, min(len(tasks), 64)))
            # decode stays its own CPU task stage: a ray_remote_args_fn keeps Ray from fusing it into the model actors
            ds = ds.map_batches(_decode_batch, batch_size=1, batch_format="numpy",
                                fn_kwargs=dict(sampling=sampling, decoder=decoder, num_threads=num_threads),
                                ray_remote_args_fn=_decode_remote_args)
            if device is None and num_gpus:
                device = "cuda"
            elif device is None:
                device = "cpu"
            ds = ds.map_batches(ModelActor, batch_size=max(1, int(batch_size)), batch_format="numpy",
                                fn_constructor_kwargs=dict(
                                    model_spec=model_spec, questions=[[q.qid, q.text, q.video] for q in qs],
                                    method=method, keep=keep, method_kwargs=method_kwargs,
                                    max_new_tokens=max_new_tokens, device=device, dtype=dtype,
                                    batch_size=batch_size),
                                                compute=ray.data.ActorPoolStrategy(size=max(1, int(concurrency))),
                                num_gpus=num_gpus or None)
            ds.write_parquet(str(store.out / "ray"))
        rows = output.read_results(store.out)
        results = store.finalize()
    finally:
        store.close()
    mine = [r for r in rows if r["id"] in {f"{t['key']}::{q}" for t in tasks for q in json.loads(t["qids"])}]
    wall = time.perf_counter() - t0
    n_videos = len({r["video"] for r in mine})
    frames = sum(len(r["frames"]["indices"]) for r in {r["video"]: r for r in mine}.values())
    summary = {"wall_seconds": round(wall, 3), "videos_total": len(vids), "videos_done_now": n_videos,
               "videos_skipped_already_done": skipped, "rows_written_now": len(mine),
               "errors_now": len({r["video"] for r in mine if r["error"]}), "frames_now": frames,
               "partial_files_removed": removed,
               "videos_per_s": round(n_videos / wall, 4), "frames_per_s": round(frames / wall, 3),
               "seconds": {"decode_task_sum": round(sum(r["seconds"]["decode"] for r in
                                                        {r["video"]: r for r in mine}.values()), 3),
                           "model_sum": round(sum(r["seconds"]["model"] for r in mine), 3)},
               "note": "Ray path: decode and model seconds are summed over tasks / actors (they overlap)",
               "results": str(results)}
    tmp = store.out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(store.out / "summary.json")
    return RunResult(store.out, summary, results)
