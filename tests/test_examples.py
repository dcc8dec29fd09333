"""The examples run end to end (with few steps) so they cannot rot."""

import math
import pathlib
import runpy
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_sinc_regression_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sinc.png"
    monkeypatch.setattr(sys, "argv", ["sinc_regression.py", "--steps", "30", "--ensemble-size", "3", "--out", str(out)])
    namespace = runpy.run_path(str(EXAMPLES / "sinc_regression.py"), run_name="not_main")
    scores = namespace["main"]()
    printed = capsys.readouterr().out
    assert "EnsembleMAP" in printed and "EnsembleSVI" in printed
    assert out.stat().st_size > 10_000
    for row in scores.values():
        assert all(math.isfinite(row[k]) for k in ("rmse_truth", "nll", "coverage95", "width95"))
