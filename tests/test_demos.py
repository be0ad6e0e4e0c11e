"""The demos run end to end: the example on a LLaVA-1.5-shaped model, the budget comparison on the reference VLM."""
import pytest

from test_reference import needs_ref


def test_example_prints_every_budget(capsys):
    from vltok.demos import example

    example.main(["--keeps", "1", "0.25", "--methods", "fourier"])
    out = capsys.readouterr().out
    assert "fourier   1.00         576" in out and "fourier   0.25         144" in out


@needs_ref
def test_compare_on_the_reference_vlm(capsys):
    from vltok.demos import compare

    compare.main(["--n", "2", "--methods", "pool", "feather", "--keeps", "1", "0.25", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "Q0 [" in out and "Q1 [" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("pool@", "feather@"))]
    assert [r[0] for r in rows] == ["pool@1", "pool@0.25", "feather@1", "feather@0.25"]
    assert [r[1] for r in rows][:2] == ["576", "144"] and float(rows[3][2]) == pytest.approx(0.25, abs=0.01)
