"""The ill-conditioned regression tutorial (examples/ill_conditioned_regression.py) runs
quickly and shows what it says: the Adam ensemble is flagged, the Laplace members with
importance weights are the exact posterior, and warm NUTS needs far fewer gradients."""

import math

from conftest import run_tutorial
import numpy as np
import pytest


@pytest.mark.slow
def test_ill_conditioned_tutorial_quick(tmp_path, capsys):
    out = run_tutorial("ill_conditioned_regression", "--out-dir", str(tmp_path))
    printed = capsys.readouterr().out

    exact = out["exact"]  # grid over sigma, (a, b) Gaussian given sigma: float64 NumPy
    assert -0.99 < exact["corr"] < -0.98
    assert abs(exact["mean"]["b"] - 0.6) < 3 * exact["sd"]["b"]  # the simulated slope

    # The Adam ensemble stops far from the posterior and its summary says so.
    adam = out["adam_summary"]
    assert adam.converged is not None and not adam.converged.all()
    assert "not converged" in adam.verdict
    table = out["table"]
    assert abs(table.loc["Adam ensemble", "b mean"] - exact["mean"]["b"]) > exact["sd"]["b"]

    # The importance-weighted Laplace members are the exact posterior: the weighted means
    # (self-normalised, no resampling noise) within 0.15 sd, the resampled sds within 15%.
    laplace = out["laplace_summary"]
    assert laplace.converged is not None and laplace.converged.all()
    assert laplace.num_modes == 1 and "can be trusted" in laplace.verdict
    assert out["weights"].pareto_k < 0.7
    for v in ("a", "b", "sigma"):
        z = (out["weighted_mean"][v] - exact["mean"][v]) / exact["sd"][v]
        assert abs(z) < 0.15, (v, z)
        ratio = table.loc["Laplace, weighted", f"{v} sd"] / exact["sd"][v]
        assert 0.85 < ratio < 1.15, (v, ratio)

    # NUTS warmed up by the Laplace members (metric kept or, with 400 draws' noisy Pareto
    # k above nuts_warm_start's threshold, re-adapted) uses far fewer gradient evaluations
    # than default NUTS and agrees with the exact posterior within 4 Monte Carlo standard errors.
    warm = out["warm"]
    assert warm.num_warmup < 1000 and warm.nuts_kwargs["dense_mass"]
    grads = {name: sum(g.values()) for name, g in out["grads"].items()}
    assert 0 < grads["warm"] < grads["default"] / 3, grads
    row = table.loc["NUTS, warm"]
    for v in ("a", "b"):
        mcse = row[f"{v} sd"] / math.sqrt(row["ess_bulk"])
        assert abs(row[f"{v} mean"] - exact["mean"][v]) < 4 * mcse, (v, row)
    assert all(math.isfinite(s) and s > 0 for s in out["seconds"].values())

    compare = out["compare"]  # az.compare without the Adam ensemble, ArviZ 1.x names
    assert set(compare.index) == {"Laplace members", "Laplace, weighted", "NUTS, default",
                                  "NUTS, warm"}
    for column in ("elpd", "se", "elpd_diff", "k_max"):
        assert compare[column].map(math.isfinite).all(), column
    assert (compare["elpd_diff"] <= 0).all() and compare["k_max"].max() < 0.7

    for name in ("ridge", "forest_a", "forest_b"):
        assert out["paths"][name].parent == tmp_path
        assert out["paths"][name].stat().st_size > 10_000, name
    lines = out["paths"]["table"].read_text().splitlines()
    assert lines[0].startswith("| |") and len(lines) == 2 + 6 and "| exact |" in lines[-1]
    assert out["paths"]["cost"].read_text().count("\n") == 2 + 4
    assert out["paths"]["compare"].read_text().count("\n") == 2 + 4
    assert "verdict:" in printed and "az.compare" in printed
    assert np.isfinite(table.drop(index="exact").to_numpy(float)).all()
