"""The examples run end to end (with few steps) so they cannot rot."""

import math
import pathlib
import runpy

from conftest import run_tutorial
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
UCI = ROOT.parent / "shared" / "data" / "uci"  # beside the checkout; never committed


@pytest.mark.slow
def test_sinc_regression_runs(tmp_path, capsys):
    scores = run_tutorial("sinc_regression", "--out-dir", str(tmp_path))
    printed = capsys.readouterr().out
    assert "custom loop" in printed and "EnsembleMAP" in printed and "EnsembleSVI" in printed
    assert (tmp_path / "sinc_regression_fits.png").stat().st_size > 10_000
    table = (tmp_path / "sinc_regression_table.md").read_text()
    assert table.count("\n") == len(scores) + 2  # header, rule, one row per score
    oracle = scores["oracle (true f, known sigma)"]
    assert oracle["rmse_truth"] == 0.0 and abs(oracle["coverage95"] - 0.95) < 0.05
    for name, row in scores.items():
        assert all(math.isfinite(row[k]) for k in ("rmse_truth", "nll", "coverage95", "width95"))
        assert row["nll"] >= oracle["nll"] - 0.1, name  # nothing beats the truth by much
    # Even a quick fit finds the bump: the MAP ensemble's mean is far closer to sinc
    # than the constant 0 (RMSE about 0.3 on this grid).
    assert scores["EnsembleMAP"]["rmse_truth"] < 0.2
    # the linearized predictive's mean is each member's network at its mode (the MAP
    # point refined by L-BFGS): it finds the bump too
    assert scores["Laplace around MAP (GGN, linearized)"]["rmse_truth"] < 0.2


@pytest.mark.slow
def test_eight_schools_runs(tmp_path, capsys):
    results = run_tutorial("eight_schools", "--out-dir", str(tmp_path / "figures"))
    printed = capsys.readouterr().out
    assert "NUTS" in printed and "az.compare" in printed
    table = results["table"]
    assert list(table.index[:2]) == ["mu", "tau"] and len(table) == 10
    assert {"ensemble", "weighted", "NUTS"} == set(table.columns.get_level_values(0))
    assert ("weighted", "mean") in table.columns
    assert table.map(math.isfinite).all().all() and (table.xs("sd", axis=1, level=1) > 0).all().all()
    compare = results["compare"]  # az.compare of the three fits, ArviZ 1.x column names
    assert set(compare.index) == {"ensemble", "weighted", "NUTS"}
    for column in ("elpd", "se", "elpd_diff", "weight", "k_max"):
        assert compare[column].map(math.isfinite).all(), column
    assert sorted(compare["rank"]) == [0, 1, 2] and compare["elpd_diff"].iloc[0] == 0
    assert (compare["elpd_diff"] <= 0).all() and compare["elpd"].is_monotonic_decreasing
    for what in ("members", "forest", "compare"):
        figure = tmp_path / "figures" / f"eight_schools_{what}.png"
        assert figure.stat().st_size > 10_000, figure
    for name in ("table", "compare"):
        lines = (tmp_path / "figures" / f"eight_schools_{name}.md").read_text().splitlines()
        assert lines[0].startswith("| |") and set(lines[1]) <= set("|-:")
        assert len(lines) == 2 + (len(table) if name == "table" else 3)
    assert "| tau |" in (tmp_path / "figures" / "eight_schools_table.md").read_text()


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
                              "--epoch-scale", "0.1", "--select", "--seeds", "2",
                              # one candidate batch size: each one is a program to compile
                              "--batch-sizes", "100"])
    (row,) = rows
    assert row["splits"] == 2 and row["members"] == 2 * 2 * 5
    # Selection: every candidate scored on validation rows, the lowest NLL chosen.
    rates = namespace["LEARNING_RATES"]
    assert set(row["validation"]) == {(100, r) for r in rates}
    assert row["chosen"] == min(row["validation"], key=row["validation"].get)
    assert (row["batch_size"], row["learning_rate"]) == row["chosen"]
    # Validation rows: a fifth of each training split, never a test row.
    for train, test, fit, val in zip(row["train_rows"], row["test_rows"], row["fit_rows"],
                                     row["val_rows"], strict=True):
        assert set(val) <= set(train) and not set(val) & set(test)
        assert sorted([*fit, *val]) == sorted(train) and len(val) == round(0.2 * len(train))
    assert all(math.isfinite(v) for v in (*row["rmse"], *row["nll"], row["nll_sd"]))
    assert len(row["nll_per_seed"]) == 2 and row["nll_is"] in ("comparable", "lower", "higher")
    printed = capsys.readouterr().out
    assert f"| yacht | 2 | {row['batch_size']}, {row['learning_rate']:g} |" in printed
    assert "Validation NLL" in printed
