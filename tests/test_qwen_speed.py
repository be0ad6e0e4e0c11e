"""eval/qwen_speed.py (the GPU command of issue 21) at tiny size on the CPU: every row of both models, images and
videos, batch 1 and 2, with its ViT / LLM split and its ratio to IDEAL."""
from __future__ import annotations

import json
import math

import pytest


@pytest.mark.slow
def test_tiny_run_writes_every_row(tmp_path):
    from vltok.eval import qwen_speed

    rows = qwen_speed.main(["--tiny", "--out", str(tmp_path), "--batches", "1", "2", "--reps", "1", "--warmup", "0"])
    data = json.loads((tmp_path / "qwen-speed.json").read_text())
    md = (tmp_path / "qwen-speed.md").read_text()
    labels = ["unpatched", "IDEAL", "resize", *qwen_speed.METHODS]
    for model in qwen_speed.MODELS:
        for kind in ("image", "video"):
            for batch in (1, 2):
                got = {r["row"]: r for r in data["rows"] if (r["model"], r["input"], r["batch"]) == (model, kind, batch)}
                assert sorted(got) == sorted(labels)
                for r in got.values():
                    assert "error" not in r, r
                    assert r["ms"] > 0 and 0 <= r["vit_ms"] <= r["ms"] and math.isfinite(r["speedup"])
                assert got["IDEAL"]["vs_ideal"] == pytest.approx(1.0)
                assert got["tome"]["visual_tokens"] == got["IDEAL"]["visual_tokens"] == got["crossget"]["visual_tokens"]
                assert got["unpatched"]["visual_tokens"] > got["IDEAL"]["visual_tokens"]
                assert f"### {model}, {kind}, batch {batch}" in md
    assert len(rows) == len(data["rows"])


def test_grids():
    from vltok.eval.qwen_speed import IMAGE_GRID, VIDEO_GRID, ideal_grid, resize_grid
    from vltok.stages import kept_count

    for grid in (IMAGE_GRID, VIDEO_GRID, (1, 8, 12)):
        t, h, w = ideal_grid(grid, 0.16, 2)
        assert t == grid[0] and (h // 2) * (w // 2) == kept_count(grid[1] // 2 * (grid[2] // 2), 0.16)
        t, h, w = resize_grid(grid, 0.16, 2, 14)
        assert (h // 2, w // 2) == (max(1, round(grid[1] // 2 * 0.4)), max(1, round(grid[2] // 2 * 0.4)))
    assert IMAGE_GRID[1] * IMAGE_GRID[2] // 4 == 1312 and VIDEO_GRID[0] * 2 == 32
