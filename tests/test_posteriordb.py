"""benchmarks/posteriordb.py: a smoke test on its synthetic Gaussian posterior (no data
needed), and, where posteriordb has been fetched, one translation against its reference.

The synthetic posterior is a correlated linear regression with a known noise scale:
its posterior is Gaussian (slopes correlated -0.99), its reference draws exact, so
the Laplace mixture around converged L-BFGS points is the posterior itself."""

import math
import os
import pathlib
import runpy

import jax
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
# A clone of https://github.com/stan-dev/posteriordb (or its git directory).
POSTERIORDB = os.environ.get("POSTERIORDB")


def script():
    return runpy.run_path(str(BENCHMARKS / "posteriordb.py"), run_name="not_main")


@pytest.mark.slow
def test_posteriordb_synthetic_quick(capsys):
    x64 = bool(jax.config.jax_enable_x64)
    namespace = script()
    rows = namespace["main"](["--synthetic", "--quick"])
    # main runs in float64 and gives the process its float type back
    assert bool(jax.config.jax_enable_x64) == x64
    by_method = {row["method"]: row for row in rows}
    assert sorted(by_method) == sorted(namespace["METHODS"]) and len(rows) == len(by_method)
    for method, row in by_method.items():
        assert math.isfinite(row["mean_err"]), method
        assert row["seconds"] > 0, method
        if method != "lbfgs":  # points have no spread to score
            assert math.isfinite(row["log_sd_err"]), method
    # The L-BFGS points converge to the mode (= the posterior mean here), well before
    # the step limit; the Laplace mixture is the Gaussian posterior (800 draws: the
    # mean's Monte Carlo error is ~0.04 sd), its importance weights flat.
    assert by_method["lbfgs"]["mean_err"] < 0.02
    assert max(by_method["lbfgs"]["iterations"]) < 100
    for method in ("laplace", "laplace IS"):
        assert by_method[method]["mean_err"] < 0.1, method
        assert by_method[method]["log_sd_err"] < 0.1, method
    assert by_method["laplace IS"]["pareto_k"] < 0.7
    assert "trusted" in by_method["laplace"]["verdict"]
    # 200 Adam steps from random starts do not reach this posterior, and the verdict says so
    assert "not converged" in by_method["adam"]["verdict"]
    out = capsys.readouterr().out
    assert "| synthetic-correlated_regression | laplace IS |" in out


def test_scores_and_short_verdicts():
    """The scoring and the verdict shortening, on numbers worked by hand."""
    namespace = script()
    score, short = namespace["score"], namespace["short_verdict"]
    reference = {"a": np.array([-1.0, 1.0]), "b": np.array([0.0, 2.0])}  # sd 1 each
    draws = {"a": np.array([-0.5, 1.5]), "b": np.array([0.0, 4.0])}
    errors = score(draws, reference)
    assert errors["mean"] == pytest.approx(1.0) and errors["worst_mean"] == "b"
    assert errors["sd"] == pytest.approx(math.log(2.0)) and errors["worst_sd"] == "b"
    # weights that keep only the first draws (a = -0.5, b = 0): mean errors 0.5 and 1
    with np.errstate(divide="ignore"):
        weighted = score(draws, reference, np.log([1.0, 0.0]))
    assert weighted["mean"] == pytest.approx(1.0) and weighted["worst_mean"] == "b"
    assert short(
        "members [0, 3] have not converged (their loss still falls ...): do not use ..."
    ) == "not converged 2"
    assert short("2 distinct modes: pooled draws mix them; importance weights are unreliable "
                 "(k 0.93 >= 0.7): ...") == "2 modes, unreliable k=0.93"
    assert short("the members agree (one mode); importance-weighted draws can be trusted "
                 "(k -inf < 0.7).") == "trusted k=-inf"
    assert namespace["stan_names"]({"beta": np.zeros((5, 2, 3))})["beta[2,3]"].shape == (5,)


@pytest.mark.slow
@pytest.mark.skipif(
    POSTERIORDB is None or not pathlib.Path(POSTERIORDB).exists(),
    reason="set POSTERIORDB to a clone of https://github.com/stan-dev/posteriordb",
)
def test_translation_against_reference():
    """eight schools (noncentred; theta a transformed parameter) with a short NUTS run:
    means within 0.15 reference sds and sds within 15% (a looser bound than the docs'
    check, for 1000 draws)."""
    namespace = script()
    x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        name = "eight_schools-eight_schools_noncentered"
        data, reference = namespace["PosteriorDB"](POSTERIORDB).posterior(name)
        sizes = namespace["Sizes"](quick=True)
        sizes.warmup, sizes.samples, sizes.chains = 500, 500, 2
        row = namespace["check"](name, namespace["POSTERIORS"][name], data, reference, sizes)
    finally:
        jax.config.update("jax_enable_x64", x64)
    assert row["mean_err"] < 0.15, row
    assert row["log_sd_err"] < math.log(1.15), row
