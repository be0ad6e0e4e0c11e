"""eval/video_speed.py at tiny size on CPU (the GPU run uses the full-size configs): it runs end to end through
vltok.video's decoder and model code and writes its JSON / Markdown."""
import json

import pytest

pytest.importorskip("av", reason="the video tests need PyAV: pip install 'vltok[video]'")


def test_video_speed_tiny_cpu(tmp_path):
    from vltok.eval import video_speed

    video_speed.main(["--tiny", "--device", "cpu", "--models", "llava-onevision-7b", "--frames", "4", "8",
                      "--keeps", "1.0", "0.16", "--reps", "1", "--new-tokens", "2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "video-speed.json").read_text())
    rows = {(r["frames"], r["keep"]): r for r in res["pipeline"]}
    # tiny OneVision: 56 px / 14 = 4x4 patches, pooled to 2x2 per frame, + 1 newline per video
    assert rows[(4, 1.0)]["tokens_in"] == rows[(4, 1.0)]["tokens_out"] == 4 * 4 + 1
    assert rows[(8, 1.0)]["tokens_in"] == 8 * 4 + 1
    assert rows[(8, 0.16)]["tokens_out"] == 8 * 1 + 1          # round(2 * 0.4) = 1 per axis
    assert all(r["decoder"] in ("decord", "av") and r["decode_s"] > 0 and r["videos_per_s"] > 0
               for r in res["pipeline"])
    lv = res["longest"]["llava-onevision-7b"]
    assert [r["tokens_per_frame"] for r in lv["rows"] if r["prefill"] == "one_pass"] == [4.0, 1.0]
    assert lv["memory"]["kv_bytes_per_token_exact"] == 2 * 2 * 2 * 8 * 4   # layers x K,V x kv heads x dim x fp32
    assert "| llava-onevision-7b | 8 | 0.16 | 33 / 9 |" in (tmp_path / "video-speed.md").read_text()
