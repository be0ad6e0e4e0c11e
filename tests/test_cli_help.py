"""Help texts of the `vltok` command line say what the commands take."""
import json
import re

import pytest

from vltok import cli
from vltok.eval import speed


def _help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def test_bench_help_lists_the_bench_options(capsys):
    out = _help(capsys, ["bench", "--help"])
    assert out.startswith("usage: vltok bench ")
    for opt in ("--models", "--methods", "--keeps", "--batches", "--summarize", "--decode", "--rounds"):
        assert opt in out


def test_train_help_names_every_learned_method_and_real_commands(capsys):
    from vltok.train import LEARNED

    out = _help(capsys, ["train", "--help"])
    assert len(LEARNED) == 3
    for m in LEARNED:
        assert m in out
    top = _help(capsys, ["--help"])
    assert f"({', '.join(sorted(LEARNED))})" in " ".join(top.split()), top
    assert "(tokenshuffle)" not in top
    # every `vltok X` a help text names is a real subcommand
    subcommands = set(re.search(r"\{([a-z,-]+)\}", top).group(1).split(","))
    named = set(re.findall(r"vltok ([a-z]+)", out.replace("\n", " ")))
    assert named and named <= subcommands, named - subcommands


def test_summarize_without_device_profile_says_not_measured(tmp_path, capsys):
    rows = [dict(model="llava-1.5-7b", batch=8, method="none", keep=1.0, ttft_ms=100.0, vltok_ms=0.0),
            dict(model="llava-1.5-7b", batch=8, method="pool", keep=0.16, ttft_ms=40.0, vltok_ms=0.4,
                 vltok_pct=1.0, speedup=2.5),
            dict(model="llava-1.5-7b", batch=8, method="fourier", keep=0.16, ttft_ms=40.0, vltok_ms=0.4,
                 vltok_pct=1.0, speedup=2.5, vltok_dev_ms=float("nan"), vltok_dev_pct=float("nan")),
            dict(model="llava-1.5-7b", batch=8, method="random", keep=0.16, ttft_ms=40.0, vltok_ms=0.4,
                 vltok_pct=1.0, speedup=2.5, vltok_dev_ms=0.2, vltok_dev_pct=0.5)]
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(rows))   # NaN, as older runs on CPU wrote it
    assert cli.main(["bench", "--summarize", str(p)]) is None
    out = capsys.readouterr().out
    assert "nan" not in out.lower()
    assert out.count("device not measured | < 2%") == 2 and "device 0.50%" in out
    assert "0.4% of unpatched" in out
