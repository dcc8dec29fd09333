"""The logistic-regression tutorial runs end to end (--quick) and recovers the posterior."""

import math

from conftest import run_tutorial
import numpy as np
import pytest


@pytest.mark.slow
def test_logistic_regression_tutorial_quick(tmp_path, capsys):
    out = run_tutorial("logistic_regression", "--out-dir", str(tmp_path))
    printed = capsys.readouterr().out

    # Every member's first epoch uses every point exactly once.
    assert out["every_point_once"]
    # The mini-batch members agree with the full-batch reference: means within a
    # reference sd, pooled sds within 30%, one mode in the summary.
    assert out["member_offset"].max() < 1.0
    ratio = out["errors"]["svi"]["sd_ratio"]
    assert np.all((ratio > 0.7) & (ratio < 1.3)), ratio
    assert out["summary"].num_modes == 1 and not out["summary"].diverged.any()
    # Both posteriors cover the truth: means within 4 reference sds of the true coefficients.
    assert out["errors"]["ref"]["max_z_truth"] < 4.0
    assert out["errors"]["svi"]["max_z_truth"] < 4.0
    # The ELBO is a lower bound of the log evidence (Laplace, accurate at this N): the
    # estimate is below it up to its standard error, and close to it (a small KL(q || p)).
    se = out["final_elbo_se"]
    assert 0 < se < 10.0, se
    assert out["final_elbo"] < out["log_evidence"] + 3 * se
    assert out["final_elbo"] > out["log_evidence"] - 25.0
    # Predictions as good as the true coefficients'.
    scores = out["scores"]
    assert scores["svi"]["accuracy"] > 0.75
    assert abs(scores["svi"]["log_loss"] - scores["truth"]["log_loss"]) < 0.02
    for value in [*out["seconds"].values(), *(v for s in scores.values() for v in s.values())]:
        assert math.isfinite(value)

    for path in out["figures"].values():
        assert path.stat().st_size > 10_000, path
    table = out["table"].read_text()
    assert table.count("\n") == 5 and "mini-batch EnsembleSVI" in table
    assert "verdict:" in printed
