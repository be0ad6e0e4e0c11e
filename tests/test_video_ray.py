"""The Ray Data path on a local CPU cluster (ray.init(num_cpus=2)) with a tiny Qwen2-VL checkpoint: decode tasks,
a model actor pool, Parquet output, resume by id (a half-written file from a killed job is dropped and redone)."""
import shutil
import time

import pytest

pytest.importorskip("av", reason="the video tests need PyAV: pip install 'vltok[video]'")
ray = pytest.importorskip("ray", reason="the Ray path needs 'vltok[distributed]'")
pytest.importorskip("ray.data")

import vltok.video as vv
from video_assets import good_folder, make_videos, save_tiny


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.mark.slow   # ~45 s on a loaded 2-core machine (Ray start + actor start + two jobs)
def test_ray_path_local_cluster(tmp_path, cluster):
    t0 = time.time()
    src = make_videos(tmp_path / "src")
    root = good_folder(tmp_path / "in", src, ("h264", "vp8", "vfr"))
    shutil.copy(src["zero"], root / "zero.mp4")
    model = save_tiny("qwen2_vl", tmp_path / "model")
    kw = dict(model=str(model), question="what color ?", frames=4, batch_size=2, max_new_tokens=2,
              ray=True, num_gpus_per_worker=0, concurrency=1, progress=False)
    res = vv.run(root, tmp_path / "out", **kw)
    rows = {r["id"]: r for r in res.rows}
    assert sorted(rows) == ["h264.mp4::q0", "vfr.mp4::q0", "vp8.webm::q0", "zero.mp4::q0"]
    assert rows["zero.mp4::q0"]["error"] == "empty file (0 bytes)"
    assert rows["vp8.webm::q0"]["decoder"].startswith("av (fallback: VP8")
    for k in ("h264.mp4::q0", "vfr.mp4::q0", "vp8.webm::q0"):
        assert rows[k]["error"] is None and rows[k]["answer"] is not None and 0 < rows[k]["tokens_out"] < \
            rows[k]["tokens_in"]
    assert rows["h264.mp4::q0"]["frames"]["indices"] == [0, 16, 32, 49]
    assert list((tmp_path / "out" / "ray").glob("*.parquet")) and (tmp_path / "out" / "results.parquet").exists()
    # the same answers as the local pipeline
    local = {r["id"]: r for r in vv.run(root, tmp_path / "local", **dict(kw, ray=False, num_workers=0)).rows}
    for k in rows:
        assert (rows[k]["answer"], rows[k]["tokens_in"], rows[k]["tokens_out"], rows[k]["error"]) == \
            (local[k]["answer"], local[k]["tokens_in"], local[k]["tokens_out"], local[k]["error"])
    # resume: a new video and a half-written file (a killed job's) -> only the new video runs, the junk is dropped
    shutil.copy(src["vp9"], root / "new.webm")
    (tmp_path / "out" / "ray" / "junk-partial.parquet").write_bytes(b"PAR1 half written")
    again = vv.run(root, tmp_path / "out", **kw)
    assert again.summary["videos_skipped_already_done"] == 4 and again.summary["videos_done_now"] == 1
    assert again.summary["partial_files_removed"] == 1
    ids = [r["id"] for r in again.rows]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 5
    print(f"ray test took {time.time() - t0:.1f} s")
