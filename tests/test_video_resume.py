"""Resume after a real kill -9: a `vltok video run` subprocess is killed while it writes shards, then the same
command runs again; the output holds exactly one complete row per (video, question), nothing lost or doubled, and
the killed run's orphaned decode workers exit on their own."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("av", reason="the video tests need PyAV: pip install 'vltok[video]'")

from video_assets import make_videos, save_tiny
from vltok.video.output import read_results

ROOT = Path(__file__).resolve().parents[1]


def _children(pid):
    out = set()
    for t in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.update(int(x) for x in (t / "children").read_text().split())
        except OSError:
            pass
    return out


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_then_rerun_gives_exact_rows(tmp_path):
    src = make_videos(tmp_path / "src")
    vids = tmp_path / "videos"
    vids.mkdir()
    n = 14
    for i in range(n):
        shutil.copy(src["h264" if i % 2 else "vp9"], vids / f"v{i:02d}{'.mp4' if i % 2 else '.webm'}")
    shutil.copy(src["zero"], vids / "zero.mp4")   # an error row is a row too
    model = save_tiny("qwen2_vl", tmp_path / "model")
    out = tmp_path / "out"
    qf = tmp_path / "q.jsonl"
    qf.write_text('{"id": "a", "question": "what color ?"}\n{"id": "b", "question": "how many ?"}\n')
    argv = ["video", "run", str(vids), "--out", str(out), "--model", str(model), "--questions", str(qf),
            "--frames", "4", "--batch-size", "1", "--shard-size", "1", "--num-workers", "1", "--max-new-tokens", "2",
            "--device", "cpu", "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-P", "-m", "vltok.cli", *argv], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shards = out / "shards"
    workers = set()
    deadline = time.time() + 240
    try:
        while time.time() < deadline and p.poll() is None:
            workers |= _children(p.pid)
            if shards.is_dir() and len(list(shards.glob("part-*"))) >= 3:
                break
            time.sleep(0.02)
        assert p.poll() is None, f"the run ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
        workers |= _children(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    before = {f.name: f.read_bytes() for f in shards.glob("part-*")}
    assert 3 <= len(before) < n + 1 and not (out / "results.jsonl").exists()
    assert workers, "the run had no decode worker"
    t = time.time()
    while any(_alive(w) for w in workers) and time.time() - t < 20:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "orphaned decode workers did not exit"
    # what the killed run committed is complete rows only
    done = [json.loads(x) for b in before.values() for x in b.decode().splitlines()]
    assert all(r["error"] is None or r["video"] == "zero.mp4" for r in done)

    from vltok.cli import main

    main(argv)   # the same command again
    rows = read_results(out)
    ids = [r["id"] for r in rows]
    keys = sorted(f.name for f in vids.iterdir())
    assert ids == sorted(f"{k}::{q}" for k in keys for q in ("a", "b"))     # exact set, none twice
    for f, b in before.items():
        assert (shards / f).read_bytes() == b                               # committed shards untouched
    assert not list(out.rglob("*.tmp"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["videos_skipped_already_done"] + summary["videos_done_now"] == n + 1
    assert summary["videos_skipped_already_done"] >= len(before)
    by_id = {r["id"]: r for r in rows}
    assert by_id["zero.mp4::a"]["error"] == "empty file (0 bytes)"
    assert all(by_id[f"v{i:02d}{'.mp4' if i % 2 else '.webm'}::a"]["answer"] is not None for i in range(n))
    final = [json.loads(x)["id"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert final == ids
