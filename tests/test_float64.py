"""float64 (``numpyro.enable_x64()``) is a supported configuration.

JAX fixes the default float type per process, so the cases below run in a pytest
subprocess started with ``JAX_ENABLE_X64=1`` (the driver test at the bottom); in
the suite's own processes (float32) they are skipped. Each case checks float64
dtypes and a number that could be wrong, to a float64 tolerance where float32 could
not meet it.
"""

import os
import pathlib
import re
import subprocess
import sys

from conftest import subsample_model, tree_allclose
import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import (
    EarlyStopping,
    EnsembleMAP,
    EnsembleSVI,
    ensemble_summary,
    importance_weights,
    laplace_members,
    load_checkpoint,
    sample_posterior,
    stacking_weights,
    to_arviz,
)

X64 = bool(jax.config.jax_enable_x64)
cases = cases_mark = pytest.mark.skipif(not X64,
                                        reason="runs in the float64 subprocess (test_float64_suite)")


def normal_mean(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def data():
    y = random.normal(random.key(0), (30,)) + 1.0
    prec = y.shape[0] + 1e-2  # the posterior of mu: Normal(sum(y) / prec, prec ** -0.5)
    return y, float(y.sum() / prec), float(prec**-0.5)


@cases
def test_member_equals_plain_svi_in_float64():
    y, _, _ = data()
    svi = EnsembleSVI(normal_mean, AutoNormal(normal_mean), optax.adam(0.05), Trace_ELBO(),
                      ensemble_size=3)
    result = svi.run(random.key(0), 200, y, progress_bar=True)
    assert result.losses.dtype == jnp.float64 and result.params["mu_auto_loc"].dtype == jnp.float64
    for e, key in enumerate(svi.member_keys(random.key(0))):
        plain = SVI(normal_mean, AutoNormal(normal_mean), optax.adam(0.05), Trace_ELBO()).run(
            key, 200, y, progress_bar=False)
        for name, value in plain.params.items():
            np.testing.assert_allclose(result.params[name][e], value, rtol=1e-12)
        np.testing.assert_allclose(result.losses[e], plain.losses, rtol=1e-12)


@cases
def test_early_stopping_and_checkpoints_in_float64(tmp_path):
    x = jnp.linspace(-1.0, 1.0, 12)
    y = 0.3 + 1.5 * x
    ens = EnsembleSVI(subsample_model, AutoNormal(subsample_model), optax.adam(0.05),
                      Trace_ELBO(), ensemble_size=3)
    rule = EarlyStopping(patience=5, min_delta=0.5)
    stopped = ens.run(random.key(0), 300, x, y, progress_bar=False, early_stopping=rule)
    stopped_at = np.asarray(ens.get_extra_fields()["stopped_at"])
    assert stopped.losses.dtype == jnp.float64 and (stopped_at < 300).all()
    e, s = 0, int(stopped_at[0])
    short = ens.run(random.key(0), s, x, y, progress_bar=False)
    np.testing.assert_allclose(stopped.params["w_auto_loc"][e], short.params["w_auto_loc"][e],
                               rtol=1e-12)

    path = tmp_path / "state.ckpt"
    whole = ens.run(random.key(0), 20, x, y, progress_bar=False, checkpoint_path=path,
                    checkpoint_every=7)
    saved = load_checkpoint(path, like=whole.state)
    assert saved.optim_state[1][0]["w_auto_loc"].dtype == jnp.float64
    tree_allclose(saved, whole.state, rtol=0, atol=0)
    first = ens.run(random.key(0), 14, x, y, progress_bar=False)
    rest = ens.run(random.key(0), 6, x, y, progress_bar=False, init_state=first.state)
    np.testing.assert_allclose(rest.params["w_auto_loc"], whole.params["w_auto_loc"], rtol=1e-12)


@cases
def test_tempered_map_points_are_analytic_in_float64():
    y, _, _ = data()
    weights = np.array([0.0, 0.5, 1.0])
    ens = EnsembleMAP(normal_mean, optax.adam(0.05), ensemble_size=3, prior_weight=weights)
    result = ens.run(random.key(0), 3000, y, progress_bar=False)
    points = ens.get_points(result.params)["mu"]
    assert points.dtype == jnp.float64
    # argmax of sum log N(y | mu, 1) + w log N(mu | 0, 10): sum(y) / (n + w / 100)
    expected = float(y.sum()) / (y.shape[0] + weights / 100)
    np.testing.assert_allclose(points, expected, rtol=1e-9)


@cases
def test_weights_draws_and_export_in_float64():
    y, post_mean, post_sd = data()
    svi = EnsembleSVI(normal_mean, AutoNormal(normal_mean), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=3)
    locs = post_mean + post_sd * jnp.array([-0.5, 0.7, 0.2])
    state = svi.init(random.key(0), y, init_params={"mu_auto_loc": locs,
                                                    "mu_auto_scale": jnp.full(3, 1.5 * post_sd)})
    params = svi.get_params(state)
    w = importance_weights(svi, random.key(1), params, y, num_samples=3000)
    assert w.log_weights.dtype == jnp.float64 and w.pareto_k < 0.7
    draws = sample_posterior(svi, random.key(2), params, y, weights=w)
    assert draws["mu"].dtype == jnp.float64
    assert float(draws["mu"].mean()) == pytest.approx(post_mean, abs=0.05 * post_sd)
    assert float(draws["mu"].std()) == pytest.approx(post_sd, rel=0.05)
    s = stacking_weights(svi, random.key(3), params, y, num_samples=100)
    assert float(s.member_weights.sum()) == pytest.approx(1.0, abs=1e-9)
    idata = to_arviz(svi, random.key(4), params, y, weights=w)  # the weighted draws
    assert idata["posterior"]["mu"].dtype == np.float64
    assert idata["posterior"]["mu"].shape == (3, 3000)
    np.testing.assert_allclose(idata["sample_stats"]["member_weight"].values[:, 0],
                               np.asarray(w.member_weights))


@cases
def test_a_member_with_log_densities_beyond_float32s_range_gets_weight_zero():
    # MA(1) (posteriordb's arma11 without the AR part): a member at theta = 3 is not
    # invertible, err_t = y_t - theta * err_{t-1} grows like 3^t, and log p ~ -1e47 at its
    # draws: finite in float64, beyond float32's range. PSIS's float32 dither was +-inf
    # there and every weight came out NaN ("weights must be finite" from ensemble_summary).
    def ma1(y):
        theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))

        def step(err, y_t):
            err = y_t - theta * err
            return err, err

        _, err = jax.lax.scan(step, 0.0, y)
        numpyro.sample("err", dist.Normal(0.0, 1.0), obs=err)

    y = random.normal(random.key(0), (50,))
    svi = EnsembleSVI(ma1, AutoNormal(ma1), optax.adam(0.01), Trace_ELBO(), ensemble_size=4)
    init = {"theta_auto_loc": jnp.array([0.0, 0.05, -0.05, 3.0]),
            "theta_auto_scale": jnp.full(4, 0.14)}
    params = svi.get_params(svi.init(random.key(0), y, init_params=init))
    w = importance_weights(svi, random.key(1), params, y, num_samples=100)
    member = np.asarray(w.member_weights)
    assert np.isfinite(member).all() and member[3] == 0 and (member[:3] > 0.05).all()
    assert np.isfinite(np.asarray(w.log_weights)[:3]).all() and w.pareto_k < 0.7
    summary = ensemble_summary(svi, random.key(2), params, y, num_samples=100)
    assert summary.weight[3] == 0 and "can be trusted" in summary.verdict


@cases
def test_lbfgs_finds_the_mode_of_an_ill_conditioned_regression():
    # An unscaled predictor: the posterior correlation of intercept and slope is -0.99999,
    # where Adam crawls along the ridge. The default EnsembleMAP optimizer is L-BFGS.
    x = jnp.linspace(1000.0, 1010.0, 50)
    y = 2.0 + 0.3 * (x - 1005.0) + 0.5 * random.normal(random.key(0), (50,))

    def regression(x, y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 100.0))
        b = numpyro.sample("b", dist.Normal(0.0, 100.0))
        with numpyro.plate("n", x.shape[0]):
            numpyro.sample("y", dist.Normal(a + b * x, 0.5), obs=y)

    design = jnp.stack([jnp.ones_like(x), x], axis=1)
    covariance = jnp.linalg.inv(design.T @ design / 0.25 + jnp.eye(2) / 100.0**2)
    mode = covariance @ (design.T @ y / 0.25)
    assert covariance[0, 1] / jnp.sqrt(covariance[0, 0] * covariance[1, 1]) < -0.9999
    ens = EnsembleMAP(regression, ensemble_size=4)
    result = ens.run(random.key(1), 1000, x, y, progress_bar=False)
    assert (np.asarray(ens.get_extra_fields()["stopped_at"]) <= 200).all()
    points = ens.get_points(result.params)
    np.testing.assert_allclose(points["a"], mode[0], rtol=1e-4)
    np.testing.assert_allclose(points["b"], mode[1], rtol=1e-4)
    # the posterior is Gaussian, so the Laplace members are the posterior itself
    _, laplace_params = laplace_members(ens, result.params, x, y)
    for e in range(4):
        np.testing.assert_allclose(laplace_params["auto_loc"][e], mode, rtol=1e-4)
        L = laplace_params["auto_scale_tril"][e]
        np.testing.assert_allclose(L @ L.T, covariance, rtol=1e-4)


# The cases in two subprocesses (about a minute each), so that pytest-xdist's workers
# can run them side by side; together the two groups are every case above.
GROUPS = {
    "lbfgs-map-svi": (
        "test_lbfgs_finds_the_mode_of_an_ill_conditioned_regression",
        "test_tempered_map_points_are_analytic_in_float64",
        "test_member_equals_plain_svi_in_float64",
        "test_a_member_with_log_densities_beyond_float32s_range_gets_weight_zero",
    ),
    "weights-stopping": (
        "test_weights_draws_and_export_in_float64",
        "test_early_stopping_and_checkpoints_in_float64",
    ),
}


@pytest.mark.slow
@pytest.mark.skipif(X64, reason="this is the float64 run itself")
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_float64_suite(group):
    """The cases above, in a process with float64 enabled (JAX_ENABLE_X64=1)."""
    env = {**os.environ, "JAX_ENABLE_X64": "1"}
    here = pathlib.Path(__file__)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(here), "-n", "0", "-q",
         "-k", " or ".join(GROUPS[group])],
        cwd=here.parents[1], env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    # the group's cases ran and passed (none skipped: the driver is deselected)
    summary = out.stdout.strip().splitlines()[-1]
    assert re.match(rf"{len(GROUPS[group])} passed, \d+ deselected in ", summary), summary


def test_the_float64_groups_hold_every_case_once():
    names = [name for group in GROUPS.values() for name in group]
    cases = [name for name, value in globals().items()
             if cases_mark.mark in getattr(value, "pytestmark", [])]
    assert len(cases) == 6 and sorted(names) == sorted(cases)
