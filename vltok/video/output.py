"""Results on disk, written so that a run killed at any moment (``kill -9``) loses nothing and writes nothing twice.

Layout of ``--out DIR``::

    run.json            the job's configuration (a rerun with a different one is refused while the folder holds
                        results; a folder with no results yet, e.g. from a run that failed before its first
                        video, takes the new configuration)
    shards/part-*.jsonl one shard per flush, complete rows only: written to a temporary name, fsynced, renamed
    manifest.json       shards, rows and ids done (rewritten atomically after each shard; the shards are the truth)
    results.jsonl       all rows sorted by id, written when a run completes (or results.parquet)
    summary.json        where the time went, throughput (last run)

The rename is the commit: a shard either exists complete or not at all, leftovers (``*.tmp``) are removed on the
next start, and the rows of one video are always in the same shard. On resume the ids found in the shards are
skipped. A lock file stops two runs from writing to the same folder at once.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from ..errors import VltokError

FORMATS = ("jsonl", "parquet")
# options that change what a row holds: a rerun into the same folder must use the same ones
SEMANTIC = ("model", "method", "keep", "method_kwargs", "sampling", "questions", "max_new_tokens", "format",
            "decoder", "dtype")


class OutputError(VltokError):
    """The output folder cannot be used (another run holds it, another configuration wrote it)."""


def arrow_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("video", pa.string()), ("path", pa.string()), ("question_id", pa.string()),
        ("question", pa.string()), ("answer", pa.string()),
        ("frames", pa.struct([("indices", pa.list_(pa.int64())), ("timestamps", pa.list_(pa.float64()))])),
        ("video_frames", pa.int64()), ("video_fps", pa.float64()), ("video_seconds", pa.float64()),
        ("tokens_in", pa.int64()), ("tokens_out", pa.int64()),
        ("seconds", pa.struct([("decode", pa.float64()), ("model", pa.float64())])),
        ("decoder", pa.string()), ("error", pa.string()),
    ])


COLUMNS = [f for f in ("id", "video", "path", "question_id", "question", "answer", "frames", "video_frames",
                       "video_fps", "video_seconds", "tokens_in", "tokens_out", "seconds", "decoder", "error")]


def normalise(row: dict) -> dict:
    out = {k: row.get(k) for k in COLUMNS}
    fr = out["frames"] or {}
    out["frames"] = {"indices": [int(i) for i in fr.get("indices", [])],
                     "timestamps": [float(t) for t in fr.get("timestamps", [])]}
    sec = out["seconds"] or {}
    out["seconds"] = {"decode": float(sec.get("decode") or 0.0), "model": float(sec.get("model") or 0.0)}
    return out


def write_rows(path, rows, fmt):
    """Write ``rows`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    rows = [normalise(r) for r in rows]
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=arrow_schema())
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d):
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_rows(path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_results(out) -> list[dict]:
    """Every row of an output folder (its shards: complete or not, the job's rows so far), sorted by id; the Ray
    path's Parquet files are included."""
    out = Path(out)
    rows = []
    for f in _shard_files(out):
        rows += read_rows(f)
    for f in _ray_files(out):
        try:
            rows += read_rows(f)
        except Exception:
            continue   # a file a killed Ray job left half-written: its rows are redone on resume
    return sorted(rows, key=lambda r: r["id"])


def _shard_files(out: Path):
    d = out / "shards"
    return sorted(p for p in d.glob("part-*") if p.suffix in (".jsonl", ".parquet")) if d.is_dir() else []


def _ray_files(out: Path):
    d = out / "ray"
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


class Store:
    """The output folder of one job: lock, configuration check, shards, resume ids."""

    def __init__(self, out, fmt: str, config: dict):
        if fmt not in FORMATS:
            raise OutputError(f"unknown format {fmt!r}: use jsonl or parquet")
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise OutputError("--format parquet needs pyarrow: pip install pyarrow (or 'vltok[distributed]')") \
                    from None
        self.out = Path(out)
        self.fmt = fmt
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "shards").mkdir(exist_ok=True)
        self._lock()
        self._check_config(config)
        for t in list((self.out / "shards").glob(".*.tmp")) + list(self.out.glob(".*.tmp")):
            t.unlink(missing_ok=True)   # a write that a killed run never committed
        self.ids: set[str] = set()
        self.n_shards = 0
        for f in _shard_files(self.out):
            self.ids.update(r["id"] for r in read_rows(f))
            self.n_shards += 1

    def _lock(self):
        import fcntl

        self._lock_file = open(self.out / ".lock", "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"another run is writing to {self.out}: wait for it, or use another --out") from None

    def _check_config(self, config):
        path = self.out / "run.json"
        sem = {k: config.get(k) for k in SEMANTIC}
        if path.exists() and not self._has_results():   # nothing done under the old configuration: not kept
            path.unlink()
        if path.exists():
            old = json.loads(path.read_text())
            olds = {k: old.get(k) for k in SEMANTIC}
            if json.loads(json.dumps(sem)) != olds:
                diff = [f"{k}: {olds.get(k)!r} there, {sem.get(k)!r} now" for k in SEMANTIC
                        if json.loads(json.dumps(sem.get(k))) != olds.get(k)]
                raise OutputError(f"{self.out} holds results of another configuration ({'; '.join(diff)}): use "
                                  "another --out, or the same options to resume")
        else:
            tmp = self.out / ".run.json.tmp"
            tmp.write_text(json.dumps(config, indent=1, default=str))
            os.replace(tmp, path)

    def _has_results(self) -> bool:
        return bool(_shard_files(self.out) or _ray_files(self.out)
                    or any((self.out / f"results.{f}").exists() for f in FORMATS))

    def write(self, rows: list[dict]):
        """Commit rows (complete videos) as one new shard."""
        if not rows:
            return
        ids = [r["id"] for r in rows]
        dup = self.ids.intersection(ids)
        if dup or len(set(ids)) != len(ids):
            raise OutputError(f"internal error: rows {sorted(dup)[:3]} would be written twice")
        name = f"part-{self.n_shards:05d}-{uuid.uuid4().hex[:6]}.{self.fmt}"
        write_rows(self.out / "shards" / name, rows, self.fmt)
        self.n_shards += 1
        self.ids.update(ids)
        self._manifest()

    def _manifest(self):
        shards = [p.name for p in _shard_files(self.out)]
        tmp = self.out / ".manifest.json.tmp"
        tmp.write_text(json.dumps({"shards": shards, "rows": len(self.ids), "format": self.fmt}))
        os.replace(tmp, self.out / "manifest.json")

    def finalize(self) -> Path:
        rows = read_results(self.out)
        path = self.out / f"results.{self.fmt}"
        write_rows(path, rows, self.fmt)
        return path

    def close(self):
        try:
            self._lock_file.close()
        except Exception:
            pass
