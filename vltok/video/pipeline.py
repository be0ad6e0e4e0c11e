"""The local job: decode workers ahead of one model process, batches to the model, atomic shards, resume.

    worker processes (num_workers)            main process
    probe + sample + decode (decord / PyAV) -> bounded queue -> group into batches -> processor -> generate
                                                                 -> rows of finished videos -> shard (atomic)

The result queue holds at most ``prefetch`` decoded videos, so memory stays bounded whatever the job size; the
workers keep decoding while the model runs. Workers exit on their own if the main process dies (kill -9).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import VltokError
from . import output, sources
from .decoding import decode
from .sampling import Sampling

DEFAULT_MODEL = "reference-video"


@dataclass
class RunResult:
    out: Path
    summary: dict
    results_file: Path | None = None

    @property
    def rows(self) -> list[dict]:
        return output.read_results(self.out)


# -- decode workers ------------------------------------------------------------------------------------------------
def _decode_one(key, path, sampling, decoder, num_threads):
    t = time.perf_counter()
    try:
        d = decode(path, sampling, decoder=decoder, num_threads=num_threads)
        return ("ok", key, path, d)
    except VltokError as e:
        return ("err", key, path, str(e), time.perf_counter() - t)
    except Exception as e:   # anything a broken file can raise inside a decoder
        return ("err", key, path, f"{type(e).__name__}: {e}", time.perf_counter() - t)


def _worker(task_q, result_q, sampling, decoder, num_threads, parent_pid):
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process handles Ctrl-C
    while True:
        try:
            t = task_q.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                result_q.cancel_join_thread()
                return
            continue
        if t is None:
            return
        res = _decode_one(*t, sampling, decoder, num_threads)
        while True:
            try:
                result_q.put(res, timeout=1.0)
                break
            except queue.Full:
                if os.getppid() != parent_pid:   # orphaned (the main process was killed): stop quietly
                    result_q.cancel_join_thread()
                    return


class _Decoders:
    """Decoded videos in arrival order from ``num_workers`` processes (0: decoded inline, in this process)."""

    def __init__(self, tasks, sampling, decoder, num_threads, num_workers, prefetch):
        self.n = len(tasks)
        self.inline = num_workers <= 0
        self.args = (sampling, decoder, num_threads)
        self.procs = []
        if self.inline:
            self.tasks = iter(tasks)
            return
        ctx = mp.get_context("spawn")   # never fork a process holding a model / CUDA / decoder threads
        self.task_q = ctx.Queue()
        self.result_q = ctx.Queue(maxsize=max(1, prefetch))
        for t in tasks:
            self.task_q.put(t)
        for _ in range(num_workers):
            self.task_q.put(None)
        for _ in range(min(num_workers, max(1, self.n))):
            p = ctx.Process(target=_worker, args=(self.task_q, self.result_q, sampling, decoder, num_threads,
                                                   os.getpid()), daemon=True)
            p.start()
            self.procs.append(p)

    def __iter__(self):
        if self.inline:
            for t in self.tasks:
                yield _decode_one(*t, *self.args)
            return
        for _ in range(self.n):
            while True:
                try:
                    yield self.result_q.get(timeout=5.0)
                    break
                except queue.Empty:
                    if not any(p.is_alive() for p in self.procs):
                        raise RuntimeError("every decode worker died (see the messages above)") from None

    def close(self):
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)


# -- progress ------------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, total, enabled=True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.videos = self.frames = self.errors = 0
        self._last = 0.0

    def update(self, videos=0, frames=0, errors=0, force=False):
        self.videos += videos
        self.frames += frames
        self.errors += errors
        now = time.perf_counter()
        if self.enabled and (force or now - self._last >= (0.5 if self.tty else 10.0)):
            self._last = now
            self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
            self.stream.flush()

    def line(self):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        vps, fps = self.videos / dt, self.frames / dt
        left = self.total - self.videos
        eta = _fmt_s(left / vps) if vps > 0 and left > 0 else ("0s" if left <= 0 else "?")
        pct = 100.0 * self.videos / self.total if self.total else 100.0
        return (f"videos {self.videos}/{self.total} ({pct:.0f}%) {vps:.2f}/s | frames {self.frames} {fps:.1f}/s | "
                f"errors {self.errors} | ETA {eta}")

    def close(self):
        if self.enabled:
            self.update(force=True)
            if self.tty:
                self.stream.write("\n")


def _fmt_s(s):
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -- the job -------------------------------------------------------------------------------------------------------
def make_sampling(fps=None, frames=None, max_frames=None, min_frames=4, start=None, end=None) -> Sampling:
    if fps is None and frames is None:
        fps = 2.0
    return Sampling(fps=fps, frames=frames, max_frames=max_frames, min_frames=min_frames, start=start, end=end)


def job_config(model_name, method, keep, method_kwargs, sampling, qs, max_new_tokens, fmt, decoder, dtype, **extra):
    return {"model": str(model_name), "method": method, "keep": None if keep is None else float(keep),
            "method_kwargs": method_kwargs or {},
            "sampling": sampling.describe(), "questions": [[q.qid, q.text, q.video] for q in qs],
            "max_new_tokens": int(max_new_tokens), "format": fmt, "decoder": decoder,
            "dtype": None if dtype is None else str(dtype), **extra}


def _config_keep(method, keep, method_kwargs):
    """The keep a job's config records: the given one, else the one vltok.patch will use (its default, or what a
    budget-fixing option implies; None where that depends on the input). The model still gets keep=None. The
    method and its options have passed ``check_method`` (run() checks them first)."""
    if keep is not None or method == "none":
        return keep
    from ..api import resolve_keep

    return resolve_keep(method, None, **(method_kwargs or {}))[0]


def error_rows(video, qs, reason, decode_s=0.0, decoder=None):
    return [{"id": sources.row_id(video, q), "video": video.key, "path": video.path, "question_id": q.qid,
             "question": q.text, "answer": None, "frames": {"indices": [], "timestamps": []}, "video_frames": None,
             "video_fps": None, "video_seconds": None, "tokens_in": None, "tokens_out": None,
             "seconds": {"decode": decode_s, "model": 0.0}, "decoder": decoder, "error": reason} for q in qs]


def run(videos, out, model=DEFAULT_MODEL, method: str = "fourier", keep: float | None = None, *, task=None,
        question=None, questions=None, fps=None, frames=None, max_frames=None, min_frames=4, start=None, end=None,
        batch_size: int = 4, num_workers: int | None = None, num_threads: int = 1, decoder: str = "auto",
        format: str = "jsonl", max_new_tokens: int = 64, device=None, dtype=None, method_kwargs=None,
        shard_size: int = 16, shard_seconds: float = 60.0, prefetch: int | None = None, progress: bool = True,
        ray: bool = False, ray_address=None, num_gpus_per_worker: float = 1, concurrency: int = 1) -> RunResult:
    """Answer every (video, question) with a (patched) video VLM and write one row each to ``out``.

    ``videos``: folder / glob / list file / list of those. ``model``: "reference-video", a local checkpoint
    folder, or a (model, processor) pair. Exactly one of ``task="caption"``, ``question``, ``questions`` (JSONL).
    ``fps`` (default 2, Qwen2-VL style) or ``frames`` (uniform N). Rerunning the same call resumes.
    ``keep`` None: not given (vltok.patch's default 0.16, or what a budget-fixing method option implies).
    Returns a :class:`RunResult` (``.rows`` reads every row of ``out``, ``.summary`` is where the time went)."""
    if task is None and question is None and questions is None:
        task = "caption"
    qs = sources.questions(task, question, questions)
    if fps is None and frames is None and isinstance(model, str) and model == "reference-video":
        from .models import REFERENCE_VIDEO_FRAMES

        frames = REFERENCE_VIDEO_FRAMES   # the video reference VLM's own sampling
    sampling = make_sampling(fps, frames, max_frames, min_frames, start, end)
    if int(batch_size) < 1:
        raise VltokError(f"batch_size must be >= 1, got {batch_size}")
    if decoder not in ("auto", "decord", "av"):
        raise VltokError(f"unknown decoder {decoder!r}: use auto, decord or av")
    if method != "none":   # name, keep and options as vltok.patch checks them, before anything is written
        from ..cli_args import check_method, model_class
        from .models import VIDEO_CLASSES

        cls = model_class(model)
        method = check_method(method, keep, method_kwargs, cls if cls in VIDEO_CLASSES else None)
    vids = sources.discover(videos)
    model_name = model if isinstance(model, (str, os.PathLike)) else type(model[0]).__name__
    cfg = job_config(model_name, method, _config_keep(method, keep, method_kwargs), method_kwargs, sampling, qs,
                     max_new_tokens, format, decoder, dtype)
    if ray:
        from .ray_run import run_ray

        return run_ray(vids, qs, out, model, cfg, sampling, method=method, keep=keep, method_kwargs=method_kwargs,
                       batch_size=batch_size, num_threads=num_threads, decoder=decoder,
                       max_new_tokens=max_new_tokens, device=device, dtype=dtype, address=ray_address,
                       num_gpus=num_gpus_per_worker, concurrency=concurrency, progress=progress)
    store = output.Store(out, format, cfg)
    try:
        return _run_local(vids, qs, store, model, sampling, method, keep, method_kwargs, batch_size, num_workers,
                          num_threads, decoder, max_new_tokens, device, dtype, shard_size, shard_seconds, prefetch,
                          progress)
    finally:
        store.close()


def _run_local(vids, qs, store, model_spec, sampling, method, keep, method_kwargs, batch_size, num_workers,
               num_threads, decoder, max_new_tokens, device, dtype, shard_size, shard_seconds, prefetch, progress):
    from .models import VideoModel, load

    t_start = time.perf_counter()
    todo = {}
    for v in vids:
        need = [q for q in sources.questions_for(v, qs) if sources.row_id(v, q) not in store.ids]
        if need:
            todo[v.key] = (v, need)
    skipped = sum(1 for v in vids if v.key not in todo)
    if num_workers is None:
        num_workers = max(1, min(4, (os.cpu_count() or 2) - 1))
    prefetch = prefetch or max(2, 2 * int(batch_size))
    prog = Progress(len(todo), enabled=progress)
    timing = {"load": 0.0, "decode": 0.0, "decode_wait": 0.0, "preprocess": 0.0, "model": 0.0, "write": 0.0}
    counts = {"videos": 0, "rows": 0, "errors": 0, "frames": 0, "decoders": {}}
    vm = None
    decoders = _Decoders([(v.key, v.path) for v, _ in todo.values()], sampling, decoder, num_threads, num_workers,
                         prefetch) if todo else None
    try:
        if todo:
            t = time.perf_counter()
            m, p, _ = load(model_spec, device, dtype)
            vm = VideoModel(m, p, method, keep, method_kwargs, max_new_tokens)
            timing["load"] = time.perf_counter() - t
        state = _Batcher(vm, store, batch_size, shard_size, shard_seconds, timing, counts, prog)
        if todo:
            it = iter(decoders)
            while True:
                t = time.perf_counter()
                try:
                    res = next(it)
                except StopIteration:
                    break
                timing["decode_wait"] += time.perf_counter() - t
                v, need = todo[res[1]]
                if res[0] == "err":
                    timing["decode"] += res[4]
                    state.finish_error(v, need, res[3], res[4])
                    continue
                d = res[3]
                timing["decode"] += d.seconds
                counts["decoders"][d.decoder] = counts["decoders"].get(d.decoder, 0) + 1
                state.add(v, need, d)
            state.drain()
        state.flush(force=True)
    finally:
        if decoders is not None:
            decoders.close()
        prog.close()
    t = time.perf_counter()
    results = store.finalize()
    timing["write"] += time.perf_counter() - t
    wall = time.perf_counter() - t_start
    summary = _summary(wall, timing, counts, skipped, len(vids), vm, results)
    tmp = store.out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, store.out / "summary.json")
    if vm is not None:
        vm.close()
    return RunResult(store.out, summary, results)


def _summary(wall, timing, counts, skipped, total, vm, results):
    import torch

    s = {"wall_seconds": round(wall, 3), "videos_total": total, "videos_done_now": counts["videos"],
         "videos_skipped_already_done": skipped, "rows_written_now": counts["rows"], "errors_now": counts["errors"],
         "frames_now": counts["frames"], "decoders": counts["decoders"],
         "videos_per_s": round(counts["videos"] / wall, 4) if wall > 0 else None,
         "frames_per_s": round(counts["frames"] / wall, 3) if wall > 0 else None,
         "seconds": {k: round(v, 3) for k, v in timing.items()},
         "note": ("decode = worker seconds summed over workers (runs in parallel with the model); decode_wait = time "
                  "the model process waited for decoded frames; preprocess = the processor; model = generate"),
         "results": str(results) if results else None}
    if torch.cuda.is_available():
        s["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return s


class _Batcher:
    """Groups decoded samples into model batches, completes videos, commits shards."""

    def __init__(self, vm, store, batch_size, shard_size, shard_seconds, timing, counts, prog):
        self.vm, self.store, self.bs = vm, store, int(batch_size)
        self.shard_size, self.shard_seconds = int(shard_size), float(shard_seconds)
        self.timing, self.counts, self.prog = timing, counts, prog
        self.buckets: dict = {}
        self.pending: dict = {}      # video key -> [rows so far, rows expected, frames]
        self.ready: list = []        # rows of complete videos, not yet in a shard
        self.ready_videos = 0
        self.last_flush = time.perf_counter()

    def finish_error(self, v, need, reason, decode_s):
        rows = error_rows(v, need, reason, decode_s)
        self._complete(v, rows, 0, error=True)

    def add(self, v, need, d):
        self.pending[v.key] = [[], len(need), len(d.indices)]
        key = self.vm.group_key(d.frames)
        for q in need:
            self.buckets.setdefault(key, []).append((v, q, d))
        b = self.buckets[key]
        while len(b) >= self.bs:
            self._run(b[:self.bs])
            del b[:self.bs]
        if sum(len(x) for x in self.buckets.values()) > 2 * self.bs:   # bound memory: run the largest bucket
            k = max(self.buckets, key=lambda k: len(self.buckets[k]))
            self._run(self.buckets.pop(k))

    def drain(self):
        for k in list(self.buckets):
            b = self.buckets.pop(k)
            for i in range(0, len(b), self.bs):
                self._run(b[i:i + self.bs])

    def _run(self, batch):
        if not batch:
            return
        samples = [{"frames": d.frames, "question": q.text, "indices": d.indices, "fps": d.fps,
                    "n_frames": d.n_frames} for v, q, d in batch]
        try:
            res, tp, tm = self.vm.answer(samples)
        except Exception as e:
            _free_cuda()
            if len(batch) > 1:   # find the sample that fails; the others still get answers
                for one in batch:
                    self._run([one])
                return
            res, tp, tm = [{"error": f"model: {type(e).__name__}: {str(e)[:500]}"}], 0.0, 0.0
        self.timing["preprocess"] += tp
        self.timing["model"] += tm
        share = tm / len(batch)
        for (v, q, d), r in zip(batch, res):
            row = {"id": sources.row_id(v, q), "video": v.key, "path": v.path, "question_id": q.qid,
                   "question": q.text, "answer": r.get("answer"),
                   "frames": {"indices": d.indices, "timestamps": d.timestamps}, "video_frames": d.n_frames,
                   "video_fps": d.fps, "video_seconds": d.duration, "tokens_in": r.get("tokens_in"),
                   "tokens_out": r.get("tokens_out"), "seconds": {"decode": round(d.seconds, 6),
                                                                   "model": round(share, 6)},
                   "decoder": d.decoder, "error": r.get("error")}
            st = self.pending[v.key]
            st[0].append(row)
            if len(st[0]) == st[1]:
                del self.pending[v.key]
                self._complete(v, st[0], st[2], error=any(x["error"] for x in st[0]))

    def _complete(self, v, rows, n_frames, error=False):
        self.ready += rows
        self.ready_videos += 1
        self.counts["videos"] += 1
        self.counts["rows"] += len(rows)
        self.counts["errors"] += int(error)
        self.counts["frames"] += n_frames
        self.prog.update(videos=1, frames=n_frames, errors=int(error))
        self.flush()

    def flush(self, force=False):
        if not self.ready:
            return
        if force or self.ready_videos >= self.shard_size or \
                time.perf_counter() - self.last_flush >= self.shard_seconds:
            t = time.perf_counter()
            self.store.write(self.ready)
            self.timing["write"] += time.perf_counter() - t
            self.ready, self.ready_videos = [], 0
            self.last_flush = time.perf_counter()


def _free_cuda():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
