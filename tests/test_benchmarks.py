"""The benchmarks in benchmarks/ run at tiny sizes (E = 2, few steps) so they cannot rot.

They check numbers, never speed: the suite compiles at -O0 (tests/conftest.py).
benchmarks/uci.py is tested in test_examples.py."""

import math
import os
import pathlib
import runpy

import jax.numpy as jnp
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def script(name):
    return runpy.run_path(str(BENCHMARKS / f"{name}.py"), run_name="not_main")


def positive(*times):
    return all(math.isfinite(t) and t > 0 for t in times)


def test_bench_run_member_check_fails_on_copied_members():
    """The check every bench_run method passes would catch one fit copied E times
    (the old hand-vmapped AutoDelta baseline) or a leaf without the member axis."""
    check_members = script("bench_run")["check_members"]
    assert check_members({"a": jnp.arange(6.0).reshape(2, 3)}, 2, "ok") == 2
    with pytest.raises(AssertionError, match="distinct"):
        check_members({"a": jnp.ones((2, 3)), "b": jnp.zeros(2)}, 2, "copied")
    with pytest.raises(AssertionError, match="member axis"):
        check_members({"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}, 2, "no axis")


@pytest.mark.slow
def test_bench_run(capsys):
    # AutoDelta: the guide whose hand-vmapped baseline used to fit one member only.
    rows = script("bench_run")["main"](
        ["--sizes", "2", "--steps", "3", "--guides", "delta", "--loop-max", "2"]
    )
    (row,) = rows
    assert row["guide"] == "delta" and row["E"] == 2
    # Every method's params had the member axis and two distinct members.
    assert row["distinct"] == dict.fromkeys(("starts", "loop", "vmap", "floor", "ens", "bar"), 2)
    assert positive(*(row[k] for k in ("loop", "vmap", "vmap_first", "floor", "floor_first",
                                        "ens", "ens_first", "bar", "bar_first")))
    assert row["vmap_vs_ens"] < 1e-4  # member e of the ensemble is plain SVI on its start
    assert "AutoDelta       2" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_minibatch(capsys):
    rows = script("bench_minibatch")["main"](
        ["--sizes", "2", "--steps", "4", "--n", "40", "--batch", "8", "--repeats", "1"]
    )
    (row,) = rows
    # The floors drew the indices run draws (asserted in the script) and so fit the same
    # points; every way returned two distinct members.
    assert row["distinct"] == {k: 2 for k in ("epoch", "floor_epoch", "iid", "floor_iid",
                                              "numpyro")}
    assert max(row["diff"].values()) < 1e-4
    assert positive(*(row[k] for k in ("epoch", "floor_epoch", "iid", "floor_iid", "numpyro")))
    assert "member-steps/s" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_weights(capsys):
    (row,) = script("bench_weights")["main"](
        ["--sizes", "2", "--steps", "3", "--num-samples", "4"]
    )
    assert row["E"] == 2
    assert positive(*(row[k] for k in ("run", "iw_first", "iw_again", "stack_first",
                                        "stack_again")))
    assert 0.99 <= row["ess"] <= 2 * 4 + 0.01  # an effective number of the E * S draws
    assert "pareto k" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_first_call(tmp_path, capsys):
    # --shared-cache only saves time here: the processes load programs that this test
    # session compiled already (tests/conftest.py's cache), e.g. NumPyro's guide set-up.
    shared = os.environ.get("NUMPYRO_ENSEMBLE_TEST_JAX_CACHE", "off")
    rows = script("bench_first_call")["main"](
        ["--size", "2", "--steps", "3", "--repeats", "1", "--no-cache",
         "--shared-cache", str(tmp_path) if shared == "off" else shared]
    )
    assert set(rows) == {"plain", "ensemble"}
    assert rows["plain"]["shape"] == [3] and rows["ensemble"]["shape"] == [2, 3]
    for row in rows.values():
        assert positive(row["import"], row["init"], row["run"])
        assert row["total"] == pytest.approx(row["init"] + row["run"])
    # The steady runs' split is a difference of timings: finite, of either sign at 3 steps.
    assert math.isfinite(rows["ensemble"]["steps"]) and math.isfinite(rows["ensemble"]["again"])
    assert "time to first result" in capsys.readouterr().out


@pytest.mark.slow
def test_nuts_warmstart_synthetic_quick(capsys):
    import jax

    x64 = bool(jax.config.jax_enable_x64)
    rows = script("nuts_warmstart")["main"](["--synthetic", "--quick"])
    assert bool(jax.config.jax_enable_x64) == x64  # the process's setting restored
    default, warm, sequential = rows  # one key in quick mode, both chain methods
    assert (default["method"], warm["method"]) == ("default", "warm")
    assert (warm["chain_method"], sequential["chain_method"]) == ("vectorized", "sequential")
    # the same key and starts, whichever way the chains run (batched rounding differs)
    assert sequential["key"] == warm["key"] == 0
    assert sequential["grads"] == pytest.approx(warm["grads"], rel=0.3)
    assert all(row["stranded"] == 0 for row in rows)
    assert warm["restarted"] == 0 and warm["left_stranded"] == 0
    for row in rows:
        counts = [row[k] for k in ("warmup_grads", "sampling_grads", "grads")]
        assert all(isinstance(c, int) and c > 0 for c in counts), row
        assert row["grads"] == row["warmup_grads"] + row["sampling_grads"]
        assert math.isfinite(row["max_rhat"]) and math.isfinite(row["mean_err"])
        assert math.isfinite(row["log_sd_err"]) and row["min_ess"] > 0
        assert positive(row["nuts_seconds"])
    # The Laplace members of a Gaussian posterior are exact: the weights are trusted,
    # the metric kept, and NUTS's trajectories are short (the default NUTS adapts a
    # diagonal metric, which cannot undo the slopes' correlation of -0.99). Over seeds
    # 0-4 the warm start's total was 1.7-2.9x smaller and its sampling 3-7x smaller,
    # though its warm-up (150) is three times the default's here (50).
    assert warm["pareto_k"] < 0.7 and "metric kept" in warm["note"]
    assert warm["sampling_grads"] < default["sampling_grads"]
    assert warm["grads"] < default["grads"]
    assert warm["ratio"] == pytest.approx(default["grads"] / warm["grads"])
    assert positive(warm["fit_seconds"])
    # the fit's evaluations: 4 members' L-BFGS (>= 2 a step), their Hessians (D = 3)
    # and 4 x 50 importance-weight densities
    assert warm["fit_grads"] > 4 * (3 + 50) and default["fit_grads"] == 0
    assert warm["ratio_with_fit"] == pytest.approx(
        default["grads"] / (warm["grads"] + warm["fit_grads"]))
    assert warm["ratio_per_ess"] == pytest.approx(
        default["grads_per_ess"] / warm["grads_per_ess"])
    out = capsys.readouterr().out
    assert "the fit included:" in out and "per min ESS" in out
    assert "| synthetic-correlated_regression | 2 | 0 | 0 | 0 | 0 |" in out  # stranded table


def test_bench_latency(capsys):
    # one small model, few steps: every step of the recipe is timed and its compiles counted
    table = script("bench_latency")["main"](
        ["--models", "eight_schools", "--steps", "20", "--nuts-draws", "20"])
    rows = table["eight_schools"]
    recipe = [r for r in rows["recipe"] if "wall" in r]
    assert [r["step"] for r in recipe[:5]] == [
        "EnsembleMAP.run", "laplace_members", "importance_weights", "ensemble_summary",
        "sample_posterior"]
    assert all(positive(r["wall"]) and r["compiles"] >= 0 for r in recipe)
    assert recipe[-1]["compiles"] == 0  # an equal optimizer built again compiles nothing
    assert positive(rows["svi"][0]["wall"], rows["nuts"][0]["wall"])
    assert "verdict" in rows["recipe"][-1]["step"]
    assert [r["step"] for r in rows["warm"]] == [
        "EnsembleMAP.run", "laplace_members", "importance_weights", "nuts_warm_start",
        "NUTSWarmStart.run"]
    assert all(positive(r["wall"]) for r in rows["warm"])
    out = capsys.readouterr().out
    assert "the recipe, in all" in out and "(fit + warm start + NUTS) / default NUTS" in out


def test_laplace_sinc(capsys):
    rows = script("laplace_sinc")["main"](
        ["--ensemble-size", "2", "--steps", "5", "--num-samples", "4", "--rank", "3",
         "--structures", "diagonal", "lowrank", "last_layer"]
    )
    names = [r["method"] for r in rows]
    assert names[:2] == ["oracle (true f, known sigma)", "deep ensemble (MAP points)"]
    assert len(rows) == 2 + 3 * 2 * 2  # structures x priors x predictives
    assert "Laplace last_layer, model prior, linearized" in names
    assert all(math.isfinite(r["nll"]) and 0 <= r["coverage95"] <= 1 for r in rows)
    assert rows[0]["rmse_truth"] == 0.0  # the oracle's mean is the true function
    assert "Laplace lowrank, evidence prior, linearized" in capsys.readouterr().out


@pytest.mark.slow
def test_laplace_memory(capsys):
    rows = script("laplace_memory")["main"](
        ["--widths", "8", "--ensemble-size", "2", "--steps", "3", "--rank", "3"]
    )
    assert [r["structure"] for r in rows] == ["lowrank", "diagonal"]
    assert all(r["weights"] == 8 + 8 + 64 + 8 + 8 + 1 and r["excluded"] == 0 for r in rows)
    assert all(r["peak_mb"] > 0 and positive(r["fit_s"], r["laplace_s"]) for r in rows)
    assert "peak/fit" in capsys.readouterr().out
