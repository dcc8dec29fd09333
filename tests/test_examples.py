"""The examples run end to end (with few steps) so they cannot rot."""

import math
import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_sinc_regression_runs(tmp_path, capsys):
    out = tmp_path / "sinc.png"
    namespace = runpy.run_path(str(EXAMPLES / "sinc_regression.py"), run_name="not_main")
    scores = namespace["main"](["--steps", "30", "--ensemble-size", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "EnsembleMAP" in printed and "EnsembleSVI" in printed
    assert out.stat().st_size > 10_000
    for row in scores.values():
        assert all(math.isfinite(row[k]) for k in ("rmse_truth", "nll", "coverage95", "width95"))


@pytest.mark.slow
def test_eight_schools_runs(tmp_path, capsys):
    out = tmp_path / "forest.png"
    namespace = runpy.run_path(str(EXAMPLES / "eight_schools.py"), run_name="not_main")
    table = namespace["main"](
        ["--steps", "300", "--ensemble-size", "4", "--num-chains", "2", "--num-warmup", "50",
         "--num-samples", "50", "--out", str(out)]
    )
    assert "NUTS" in capsys.readouterr().out
    assert out.stat().st_size > 10_000
    assert list(table.index[:2]) == ["mu", "tau"] and len(table) == 10
    assert table.notna().all().all()
