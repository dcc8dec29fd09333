"""Warm NUTS never strands a chain silently (numpyro_ensemble.use.nuts_run), on posteriordb's
``arma-arma11`` (float64) with the keys of the issue that found a stranded chain.

``tests/data/arma.json`` is posteriordb's ``arma`` data (simulated ARMA(1,1) series of
stan-dev/stat_comp_benchmarks, 200 points)."""

import json
import pathlib
import sys
import warnings

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS
from numpyro.infer.hmc_util import euclidean_kinetic_energy
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    importance_weights,
    laplace_members,
    nuts_summary,
    nuts_warm_start,
)
from numpyro_ensemble.use.nuts_run import guarded_kinetic_energy, stranded_chains

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from posteriordb_models import arma11  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "arma.json"
# The start of the chain that was stranded (chain 3 of 4): the old heaviest-member
# start, unconstrained (sigma is log sigma).
STRANDED_START = {"mu": -0.0113316167526283, "phi": 0.9592732010845242,
                  "sigma": -1.7932236489032982, "theta": 0.02809512930521715}
# A momentum where NumPyro's dense kinetic energy is -inf in float64.
OVERFLOW_MATRIX = [
    [1.023513465252875, 1.0469079926721265, 0.6561183368352289, 0.4491691338796019],
    [1.0469079926721265, 2.3455380744455647, 0.6127614106651708, 0.20283826768711793],
    [0.6561183368352289, 0.6127614106651708, 1.1845416821246322, -0.050720967983179495],
    [0.4491691338796019, 0.20283826768711793, -0.050720967983179495, 0.913434354676324],
]
OVERFLOW_MOMENTUM = [1.1605210253208413e154, -5.461356021807181e154, 2.1284609007763828e154,
                     -2.9410234481510355e154]
# Where that chain ended: phi 1.44, theta 4.0, sigma 0.015, the gradient ~1e246.
BAD_POINT = {"mu": 0.0, "phi": 1.44, "sigma": float(np.log(0.015)), "theta": 4.0}


@pytest.fixture(scope="module")
def arma():
    x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        y = jnp.asarray(json.loads(DATA.read_text())["y"], jnp.float64)
        ens = EnsembleMAP(arma11, ensemble_size=8)
        result = ens.run(random.PRNGKey(0), 2000, y, progress_bar=False)
        lap, lap_params = laplace_members(ens, result.params, y)
        weights = importance_weights(lap, random.PRNGKey(7), lap_params, y, num_samples=500)
        warm = nuts_warm_start(lap, random.PRNGKey(10), lap_params, y, weights=weights)
        yield y, weights, warm
    finally:
        jax.config.update("jax_enable_x64", x64)


def chain_means(run) -> np.ndarray:
    samples = run.get_samples(group_by_chain=True)
    return np.stack([np.asarray(samples[k]).mean(axis=1) for k in sorted(samples)], axis=1)


@pytest.mark.slow
def test_the_arma_recipe_gives_four_healthy_chains(arma):
    y, weights, warm = arma
    assert weights.pareto_k < 0.5 and not warm.nuts_kwargs["adapt_mass_matrix"]  # trusted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no restart, no warning
        run = warm.run(arma11, random.PRNGKey(11), y, num_samples=1000,
                       chain_method="vectorized", progress_bar=False)
    assert run.restarted == {} and run.stranded == {}
    summary = nuts_summary(run)
    assert summary.divergences.max() <= 10
    assert summary.step_size.min() > 0.3 * summary.step_size.max()
    assert summary.r_hat < 1.01 and summary.verdict.startswith("the chains agree")
    # the four chains' means agree within 0.2 posterior sds
    samples = run.get_samples()
    sd = np.array([np.asarray(samples[k]).std() for k in sorted(samples)])
    means = chain_means(run)
    assert (np.abs(means - means.mean(axis=0)) < 0.2 * sd).all()


def test_the_guarded_kinetic_energy_is_inf_where_numpyros_overflows():
    """With a dense metric NumPyro's energy (a dot product) overflows to -inf at large
    momenta (a proposal NUTS would accept); the guarded one is +inf there (a
    divergence) and NumPyro's elsewhere."""
    x64 = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        matrix = jnp.array(OVERFLOW_MATRIX)
        r = jnp.array(OVERFLOW_MOMENTUM)  # positive definite, |r| ~ 1e154 (found by search)
        assert not np.isfinite(euclidean_kinetic_energy(matrix, r))
        assert guarded_kinetic_energy(matrix, r) == jnp.inf
        small = r * 1e-154
        assert guarded_kinetic_energy(matrix, small) == euclidean_kinetic_energy(matrix, small)
        assert guarded_kinetic_energy(matrix, small.at[0].set(jnp.nan)) == jnp.inf
    finally:
        jax.config.update("jax_enable_x64", x64)


@pytest.mark.slow
def test_the_guarded_kinetic_energy_keeps_the_stranded_start_healthy(arma):
    """The chain the issue found, from its start with its key and the metric it had:
    healthy with the guard. (Without it, in float64 with XLA's default optimization,
    NumPyro's kinetic energy overflowed to -inf at warm-up iteration 1 and the chain
    ended at step size 1.5e-92, 200 of 200 draws divergent; under this suite's
    ``--xla_backend_optimization_level=0`` the rounding differs and it does not.)"""
    y, _, warm = arma
    key = random.split(random.PRNGKey(11), 4)[3]
    start = {k: jnp.asarray(v) for k, v in STRANDED_START.items()}
    mcmc = MCMC(NUTS(arma11, **warm.nuts_kwargs), num_warmup=warm.num_warmup,
                num_samples=200, progress_bar=False)
    mcmc.run(key, y, init_params=start, extra_fields=("diverging",))
    assert int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum()) < 5
    assert float(mcmc.last_state.adapt_state.step_size) > 0.3


@pytest.mark.slow
def test_a_chain_started_at_a_negligible_point_is_restarted_and_named(arma):
    y, _, warm = arma
    init = {k: np.array(v) for k, v in warm.init_params.items()}
    for k, v in BAD_POINT.items():
        init[k][2] = v  # chain 2: log density ~ -1e243
    bad = warm._replace(init_params=init)
    with pytest.warns(RuntimeWarning, match=r"chain 2 was stranded after warm-up \(100% of the "
                                            r"last 75 warm-up transitions diverged, step size"):
        run = bad.run(arma11, random.PRNGKey(11), y, num_samples=300,
                      chain_method="vectorized", progress_bar=False)
    assert list(run.restarted) == [2] and run.stranded == {}
    summary = nuts_summary(run)
    assert summary.divergences.max() <= 5 and summary.r_hat < 1.01
    assert summary.verdict.startswith("chains [2] were stranded after warm-up and restarted")
    means = chain_means(run)
    samples = run.get_samples()
    sd = np.array([np.asarray(samples[k]).std() for k in sorted(samples)])
    assert (np.abs(means[2] - np.delete(means, 2, axis=0).mean(axis=0)) < 0.3 * sd).all()

    # spares no better than the start: still stranded, said in a warning and the verdict
    spares = {k: np.full_like(np.asarray(v), BAD_POINT[k]) for k, v in warm.spare_params.items()}
    hopeless = bad._replace(spare_params=spares)
    with pytest.warns(RuntimeWarning, match=r"chain 2 was stranded .* and it is still stranded"):
        run = hopeless.run(arma11, random.PRNGKey(11), y, num_samples=50,
                           chain_method="vectorized", progress_bar=False)
    assert list(run.stranded) == [2]
    summary = nuts_summary(run)
    assert summary.verdict.startswith("chains [2] are stranded (2: ")
    assert "do not use their draws" in summary.verdict


def test_stranded_chains_reads_divergences_step_sizes_and_energies():
    W = 100
    diverging = np.zeros((4, W), bool)
    diverging[1, 60:] = True  # 80% of the last half
    energy = np.zeros((4, W))
    energy[3] = 1e3
    step = np.array([0.5, 0.6, 1e-6, 0.55])
    found = stranded_chains(diverging, step, energy, reference_energy=2.0, dim=4)
    assert sorted(found) == [1, 2, 3]
    assert found[1].startswith("80% of the last 50 warm-up transitions diverged")
    assert found[2].startswith("step size 1e-06 < 0.001 x the chains' median 0.525")
    assert found[3].startswith("potential energy 1000, above")
    # an energy within the margin is not stranded: 5 sqrt(D / 2) + 5 above max(ref, lowest)
    energy[3] = 2.0 + 5 * np.sqrt(2) + 4.9
    assert 3 not in stranded_chains(diverging, step, energy, 2.0, 4)
    energy[3, -1] = np.inf
    assert "not finite" in stranded_chains(diverging, step, energy, 2.0, 4)[3]
