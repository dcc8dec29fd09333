"""Posterior draws, predictive, ensemble_predict and the MCMC bridge."""

from conftest import regression_model
import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from numpyro.infer.util import constrain_fn
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    ensemble_predict,
    ensemble_predictive,
    ensemble_summary,
    importance_weights,
    mcmc_init_params,
    sample_posterior,
    stacking_weights,
)

E = 3


def model_with_f(x, y=None):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    f = numpyro.deterministic("f", w[0] + w[1] * x)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(f, sigma), obs=y)


@pytest.fixture(scope="module")
def fitted():
    x = jnp.linspace(-1.0, 1.0, 10)
    y = 0.5 + 2.0 * x + 0.1 * random.normal(random.key(0), (10,))
    svi = EnsembleSVI(model_with_f, AutoNormal(model_with_f), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    svi_params = svi.run(random.key(1), 300, x, y, progress_bar=False).params
    ens = EnsembleMAP(model_with_f, optax.adam(0.02), ensemble_size=E)
    map_params = ens.run(random.key(2), 300, x, y, progress_bar=False).params
    return x, y, svi, svi_params, ens, map_params


def test_sample_posterior_shapes_names_and_keys(fitted):
    x, y, svi, params, *_ = fitted
    draws = sample_posterior(svi, random.key(0), params, x, y, num_samples=7)
    assert {k: v.shape for k, v in draws.items()} == {"w": (E, 7, 2), "sigma": (E, 7)}
    assert jnp.all(draws["sigma"] > 0)  # constrained
    again = sample_posterior(svi, random.key(0), params, x, y, num_samples=7)
    np.testing.assert_array_equal(draws["w"], again["w"])
    # Member e's draws come from member e's guide: their mean is near member e's loc.
    for e in range(E):
        big = sample_posterior(svi, random.key(e), params, x, y, num_samples=4000)
        loc, scale = params["w_auto_loc"][e], params["w_auto_scale"][e]
        np.testing.assert_allclose(big["w"][e].mean(0), loc, atol=4 * float(scale.max()) / np.sqrt(4000) + 1e-4)
        np.testing.assert_allclose(big["w"][e].std(0), scale, rtol=0.1)


def test_map_draws_are_the_points(fitted):
    x, y, _, _, ens, params = fitted
    draws = sample_posterior(ens, random.key(0), params, x, y, num_samples=4)
    points = ens.get_points(params)
    np.testing.assert_array_equal(draws["w"], jnp.repeat(points["w"][:, None], 4, axis=1))


def test_predictive_member_e_uses_member_e(fitted):
    x, y, _, _, ens, params = fitted
    x_new = jnp.array([-2.0, 0.0, 3.0])
    pred = ensemble_predictive(ens, random.key(0), params, x_new, num_samples=2)
    assert pred["f"].shape == (E, 2, 3) and pred["y"].shape == (E, 2, 3)
    w = ens.get_points(params)["w"]
    expected = w[:, 0, None] + w[:, 1, None] * x_new
    np.testing.assert_allclose(pred["f"], jnp.repeat(expected[:, None], 2, axis=1), rtol=1e-5)
    # The same draws through the user's own deterministic function.
    np.testing.assert_allclose(
        ensemble_predict(ens.get_points(params), lambda p, x: p["w"][0] + p["w"][1] * x, x_new), expected, rtol=1e-6
    )
    only = ensemble_predictive(ens, random.key(0), params, x_new, num_samples=2, return_sites=["f"])
    assert set(only) == {"f"}


def test_predictive_under_jit_equals_eager(fitted):
    # Inside a user's jitted loop (params traced) the draws are the eager ones.
    x, y, svi, params, *_ = fitted
    x_new = jnp.array([-1.0, 2.0])

    def f_draws(params, key):
        return ensemble_predictive(svi, key, params, x_new, num_samples=3, return_sites=["f"])["f"]

    eager = f_draws(params, random.key(5))
    np.testing.assert_allclose(jax.jit(f_draws)(params, random.key(5)), eager, rtol=1e-5, atol=1e-6)
    # A diverged member still gives non-finite draws (only its own) when traced.
    broken = jax.tree.map(lambda v: v.at[1].set(jnp.nan), params)
    traced = jax.jit(f_draws)(broken, random.key(5))
    assert not jnp.isfinite(traced[1]).any() and jnp.isfinite(traced[jnp.array([0, 2])]).all()


def test_predictive_of_training_data(fitted):
    x, y, svi, params, *_ = fitted
    kept = ensemble_predictive(svi, random.key(0), params, x, y, num_samples=3)
    np.testing.assert_array_equal(kept["y"], jnp.broadcast_to(y, (E, 3, 10)))  # conditioned
    fresh = ensemble_predictive(svi, random.key(0), params, x, y, num_samples=3, resample_observed=True)
    assert fresh["y"].shape == (E, 3, 10) and not jnp.any(fresh["y"] == y)


def test_predictive_reuses_given_draws(fitted):
    x, y, svi, params, *_ = fitted
    draws = sample_posterior(svi, random.key(3), params, x, y, num_samples=5)
    pred = ensemble_predictive(svi, random.key(4), params, x, posterior_samples=draws)
    np.testing.assert_allclose(pred["f"], draws["w"][..., :1] + draws["w"][..., 1:] * x, rtol=1e-5, atol=1e-6)
    wrong = jax.tree.map(lambda v: v[:2], draws)
    with pytest.raises(ValueError, match="posterior_samples must have shape"):
        ensemble_predictive(svi, random.key(4), params, x, posterior_samples=wrong)


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-2, ValueError), (1.5, TypeError)])
def test_bad_num_samples(fitted, bad, exc):
    x, y, svi, params, *_ = fitted
    with pytest.raises(exc, match="num_samples"):
        sample_posterior(svi, random.key(0), params, x, y, num_samples=bad)


def test_params_of_other_size(fitted):
    x, y, svi, params, *_ = fitted
    other = jax.tree.map(lambda p: p[:2], params)
    with pytest.raises(ValueError, match="ensemble_size=3"):
        sample_posterior(svi, random.key(0), other, x, y)


def test_mcmc_init_params_round_trip_and_nuts_start(fitted):
    x, y, _, _, ens, params = fitted
    init = mcmc_init_params(ens, random.key(0), params, x, y)
    points = ens.get_points(params)
    assert init["sigma"].shape == (E,)
    np.testing.assert_allclose(init["sigma"], jnp.log(points["sigma"]), rtol=1e-5)  # unconstrained
    back = jax.vmap(lambda z: constrain_fn(model_with_f, (x, y), {}, z))(init)
    np.testing.assert_allclose(back["w"], points["w"], rtol=1e-5)
    # NUTS with a tiny fixed step size barely moves from where it starts.
    kernel = NUTS(model_with_f, step_size=1e-7, adapt_step_size=False, max_tree_depth=1)
    mcmc = MCMC(kernel, num_warmup=0, num_samples=1, num_chains=E, chain_method="vectorized", progress_bar=False)
    mcmc.run(random.key(1), x, y, init_params=init)
    first = mcmc.get_samples(group_by_chain=True)
    np.testing.assert_allclose(first["w"][:, 0], points["w"], atol=1e-4)
    np.testing.assert_allclose(first["sigma"][:, 0], points["sigma"], rtol=1e-4)


def test_mcmc_init_params_chain_counts(fitted):
    x, y, svi, params, ens, map_params = fitted
    assert mcmc_init_params(svi, random.key(0), params, x, y, num_chains=2)["w"].shape == (2, 2)
    assert mcmc_init_params(svi, random.key(0), params, x, y, num_chains=1)["w"].shape == (2,)
    more = mcmc_init_params(svi, random.key(0), params, x, y, num_chains=7, resample=True)
    assert more["w"].shape == (7, 2) and len(np.unique(np.asarray(more["w"][:, 0]))) == 7
    with pytest.raises(ValueError, match="num_chains=5 is larger than the 3 usable members"):
        mcmc_init_params(ens, random.key(0), map_params, x, y, num_chains=5)
    with pytest.raises(ValueError, match="num_chains"):
        mcmc_init_params(ens, random.key(0), map_params, x, y, num_chains=0)


def test_autocontinuous_guides_sample_by_site(regression_data):
    x, y = regression_data
    svi = EnsembleSVI(regression_model, AutoDiagonalNormal(regression_model), optax.adam(0.02), Trace_ELBO(), ensemble_size=2)
    params = svi.run(random.key(0), 20, x, y, progress_bar=False).params
    draws = sample_posterior(svi, random.key(1), params, x, y, num_samples=3)
    assert set(draws) == {"w", "sigma"} and draws["w"].shape == (2, 3, 2)


def model_with_param(x, y=None):
    b = numpyro.param("b", 0.0)  # the model's own param (as a flax_module's weights are)
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    f = numpyro.deterministic("f", w * x + b)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(f, 0.1), obs=y)


def test_the_model_runs_with_each_members_own_params():
    # Predictions, pointwise log-likelihoods (stacking, ArviZ) and importance weights
    # use each member's fitted model params, not their initial values.
    x = jnp.linspace(-1.0, 1.0, 12)
    y = 0.5 * x + 3.0
    svi = EnsembleSVI(model_with_param, AutoNormal(model_with_param), optax.adam(0.05),
                      Trace_ELBO(), ensemble_size=2)
    result = svi.run(random.key(0), 1500, x, y, progress_bar=False)
    b = result.params["b"]
    np.testing.assert_allclose(b, 3.0, atol=0.05)
    draws = sample_posterior(svi, random.key(1), result.params, x, y, num_samples=4)
    f = ensemble_predictive(svi, random.key(1), result.params, x, y, posterior_samples=draws)["f"]
    np.testing.assert_allclose(f, draws["w"][..., None] * x + b[:, None, None], rtol=1e-5, atol=1e-5)
    # Weights pick members: member 1 moved far away, so ignoring the weights shows.
    moved = {**result.params, "b": result.params["b"].at[1].set(-10.0)}
    for weights, b_expected in (([1.0, 0.0], 3.0), ([0.0, 1.0], -10.0)):
        weighted = ensemble_predictive(svi, random.key(1), moved, x, y, num_samples=4,
                                       weights=jnp.array(weights), return_sites=["f"])["f"]
        assert weighted.shape == (8, 12)
        np.testing.assert_allclose(weighted.mean(), b_expected + 0.5 * x.mean(), atol=0.1)
    from numpyro_ensemble.trust.stacking import pointwise_log_likelihood

    loglik = pointwise_log_likelihood(svi, result.params, draws, (x, y), {})
    expected = dist.Normal(draws["w"][..., None] * x + b[:, None, None], 0.1).log_prob(y)
    np.testing.assert_allclose(loglik, expected, rtol=1e-4, atol=1e-4)
    iw = importance_weights(svi, random.key(2), result.params, x, y, num_samples=50)
    assert np.isfinite(iw.member_weights).all() and iw.pareto_k < 0.7


def params_only_model(x, y=None):
    a = numpyro.param("a", lambda key: random.normal(key, ()))
    f = numpyro.deterministic("f", a * x)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(f, 0.1), obs=y)


def test_a_params_only_ensemble_predicts_stacks_and_summarises():
    # A deep ensemble by maximum likelihood: no latent sites, an empty guide.
    x = jnp.linspace(-1.0, 1.0, 10)
    y = 0.5 * x
    svi = EnsembleSVI(params_only_model, lambda x, y=None: None, optax.adam(0.05), Trace_ELBO(),
                      ensemble_size=3)
    result = svi.run(random.key(0), 400, x, y, progress_bar=False)
    pred = ensemble_predictive(svi, random.key(1), result.params, x, num_samples=2)
    np.testing.assert_allclose(pred["f"], jnp.broadcast_to(result.params["a"][:, None, None] * x, (3, 2, 10)), rtol=1e-5)
    assert pred["y"].shape == (3, 2, 10)
    # Members 1 and 2 moved off the data (a = 0.5 fits it): stacking and the summary
    # must find that member 0 is the one to trust.
    moved = result._replace(params={"a": result.params["a"].at[1:].set(jnp.array([2.0, -1.0]))})
    stacked = stacking_weights(svi, random.key(2), moved.params, x, y)
    np.testing.assert_allclose(stacked.member_weights.sum(), 1.0, rtol=1e-5)
    assert stacked.member_weights[0] > 0.99 and stacked.elpd_loo > stacked.elpd_loo_equal
    summary = ensemble_summary(svi, random.key(3), moved.params, x, y)
    assert summary.weight_kind == "stacking" and summary.weight[0] > 0.99
    assert summary.num_modes == 3 and len(set(summary.mode.tolist())) == 3
    assert "3 distinct modes" in summary.verdict and "one member carries" in summary.verdict
    # With the (stale) losses: moved members are not at an optimum of their loss, and the
    # Newton step says so (the loss alone would look converged).
    summary = ensemble_summary(svi, random.key(3), moved, x, y)
    np.testing.assert_allclose(summary.final_loss, result.losses[:, -1])
    assert summary.converged.tolist() == [True, False, False]
    assert summary.to_go[0] < 0.05 and (summary.to_go[1:] > 10).all()
    assert "members [1, 2] have not converged" in summary.verdict
    with pytest.raises(ValueError, match="no latent sites"):
        importance_weights(svi, random.key(4), result.params, x, y)
