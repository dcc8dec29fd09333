"""The examples run end to end (with few steps) so they cannot rot."""

import math
import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
UCI = ROOT.parent / "shared" / "data" / "uci"  # beside the checkout; never committed


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
    assert ("weighted", "mean") in table.columns
    assert table.notna().all().all()


@pytest.mark.slow
def test_multihost_runs_two_processes(capsys):
    namespace = runpy.run_path(str(EXAMPLES / "multihost.py"), run_name="not_main")
    outputs = namespace["main"](["--local", "2", "--members-per-device", "1"])
    printed = "".join(outputs)
    assert "4 members on 4 devices of 2 processes" in printed
    for process in (0, 1):  # each process holds its own members
        assert f"process {process}: members per local device" in printed


@pytest.mark.slow
@pytest.mark.skipif(not UCI.is_dir(), reason="the UCI data sets are not beside this checkout")
def test_uci_benchmark_runs(capsys):
    namespace = runpy.run_path(str(ROOT / "benchmarks" / "uci.py"), run_name="not_main")
    rows = namespace["main"](["--data-dir", str(UCI), "--datasets", "yacht", "--splits", "2",
                              "--epoch-scale", "0.25"])
    (row, _), = rows
    assert row["splits"] == 2 and row["members"] == 10
    assert all(math.isfinite(v) for v in (*row["rmse"], *row["nll"]))
    assert "| yacht | 308 | 2 |" in capsys.readouterr().out
