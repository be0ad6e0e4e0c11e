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


@pytest.mark.parametrize("argv, said", [
    (["--methods", "nosuch"], "unknown method 'nosuch'"),
    (["--keeps", "1.5"], "keep=1.5 is outside (0, 1]"),
    (["--models", "llava-9b"], "unknown model 'llava-9b'"),
])
def test_bench_refuses_bad_names_and_keeps_before_needing_a_gpu(capsys, argv, said):
    """One `vltok bench: error:` line and exit 2 on any machine (the GPU check comes after these)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vltok bench") and f"vltok bench: error: {said}" in err and "Traceback" not in err


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


def _all_helps(capsys):
    """Every help text of the command line (top level and each subcommand, `video run` included)."""
    top = _help(capsys, ["--help"])
    subcommands = re.search(r"\{([a-z,-]+)\}", top).group(1).split(",")
    out = {"": top}
    for name in subcommands:
        out[name] = _help(capsys, [name, "--help"])
    out["video run"] = _help(capsys, ["video", "run", "--help"])
    return out


def test_help_texts_have_no_internal_jargon_and_show_the_defaults(capsys):
    helps = _all_helps(capsys)
    for name, text in helps.items():
        assert not re.search(r"\bissue\b|\bthe issue's\b", text, re.I), (name, text)
    assert "List vltok's registered" in helps["methods"]
    video = " ".join(helps["video run"].split())
    assert "(default: fourier)" in video and "(default 0.16)" in video and "--method-arg KEY=VALUE, --arg" in video
    ev = " ".join(helps["eval"].split())
    assert "--arg KEY=VALUE, --method-arg" in ev and "none or not given = the full model" in ev


def test_arg_and_dtype_spellings_are_the_same_everywhere(capsys):
    p = cli.build_parser()
    for argv in (["eval", "d"], ["video", "run", "d", "--out", "o"]):
        for flag in ("--arg", "--method-arg"):
            a = p.parse_args(argv + [flag, "K=2", flag, "rope=original"])
            assert (getattr(a, "arg", None) or a.method_arg) == [("K", 2), ("rope", "original")]
        for spelling, name in (("bf16", "bfloat16"), ("float16", "float16"), ("FP32", "float32"),
                               ("bfloat16", "bfloat16")):
            assert p.parse_args(argv + ["--dtype", spelling]).dtype == name
    assert p.parse_args(["demo", "--dtype", "fp16"]).dtype == "float16"
    for argv in (["demo"], ["eval", "d"], ["video", "run", "d", "--out", "o"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(argv + ["--dtype", "float64"])
        assert e.value.code == 2 and "unknown dtype 'float64'" in capsys.readouterr().err


def test_vltok_errors_end_as_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from vltok.demos import app

    assert cli.main(["demo", "--model", str(tmp_path / "nonexistent")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vltok: error: --model") and "no such folder" in err and len(err.splitlines()) == 1
    # vltok.video's own errors, raised below the command: one line (vltok/cli.py main)
    assert cli.main(["video", "run", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vltok: error: ") and len(err.splitlines()) == 1 and "missing" in err
    assert not (tmp_path / "o").exists()

    def bug(args):
        raise RuntimeError("a real bug")
    monkeypatch.setattr(app, "_main", bug)
    with pytest.raises(RuntimeError, match="a real bug"):
        cli.main(["demo"])


def test_python_dash_m_vltok_runs_the_command_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-P", "-m", "vltok", "methods"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fourier" in r.stdout and "tmerge" in r.stdout, r.stderr
