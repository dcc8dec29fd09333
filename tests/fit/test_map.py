"""EnsembleMAP: analytic MAP / MLE / tempered MAP, points by site name, errors."""

from conftest import normal_model, regression_model, subsample_model
import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.initialization import init_to_sample
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    TemperedTrace_ELBO,
    ensemble_map,
    ensemble_svi,
)

Y = jnp.array([2.0, 3.0, 4.5, 1.5])


def gamma_poisson(y):
    """lam ~ Gamma(3, 2), y_i ~ Poisson(lam): a positive (constrained) latent."""
    lam = numpyro.sample("lam", dist.Gamma(3.0, 2.0))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Poisson(lam), obs=y)


@pytest.mark.parametrize("prior_weight", [0.0, 0.5, 1.0])
def test_normal_normal_optimum(prior_weight):
    """argmax sum log N(y|mu,1) + w log N(mu|0,2) = sum(y) / (n + w / 4)."""
    ens = EnsembleMAP(normal_model, optax.adam(0.05), ensemble_size=6, prior_weight=prior_weight)
    assert isinstance(ens, EnsembleSVI) and isinstance(ens.loss, TemperedTrace_ELBO)
    result = ens.run(random.key(0), 1500, Y, progress_bar=False)
    points = ens.get_points(result.params)
    expected = Y.sum() / (Y.size + prior_weight / 4.0)
    np.testing.assert_allclose(points["mu"], jnp.full(6, expected), rtol=1e-4)


@pytest.mark.parametrize("prior_weight", [0.0, 0.5, 1.0])
def test_gamma_poisson_optimum_in_constrained_space(prior_weight):
    """Mode in the constrained space: lam = (sum y + w (a - 1)) / (n + w b)."""
    counts = jnp.array([3.0, 1.0, 4.0, 2.0, 5.0])
    ens = EnsembleMAP(gamma_poisson, optax.adam(0.05), ensemble_size=5, prior_weight=prior_weight)
    points = ens.get_points(ens.run(random.key(1), 2000, counts, progress_bar=False).state)
    expected = (counts.sum() + prior_weight * 2.0) / (counts.size + prior_weight * 2.0)
    np.testing.assert_allclose(points["lam"], jnp.full(5, expected), rtol=1e-4)


def test_loss_is_the_tempered_log_joint():
    """The loss a member reports is -(log p(y|mu) + w log p(mu)) at its point."""
    ens = EnsembleMAP(normal_model, optax.adam(0.05), ensemble_size=3, prior_weight=0.3)
    state = ens.init(random.key(0), Y)
    mu = ens.get_points(state)["mu"]
    log_lik = jax.vmap(lambda m: dist.Normal(m, 1.0).log_prob(Y).sum())(mu)
    log_prior = dist.Normal(0.0, 2.0).log_prob(mu)
    np.testing.assert_allclose(ens.evaluate(state, Y), -(log_lik + 0.3 * log_prior), rtol=1e-6)


@pytest.mark.parametrize("init_loc_fn", [None, init_to_sample])
def test_default_and_random_inits_give_distinct_members(init_loc_fn, regression_data):
    kw = {} if init_loc_fn is None else {"init_loc_fn": init_loc_fn}
    ens = EnsembleMAP(regression_model, optax.adam(0.01), ensemble_size=8, **kw)
    points = ens.get_points(ens.init(random.key(0), *regression_data))
    assert set(points) == {"w", "sigma"}
    assert points["w"].shape == (8, 2) and points["sigma"].shape == (8,)
    assert len(np.unique(np.asarray(points["sigma"]))) == 8
    assert jnp.all(points["sigma"] > 0)  # constrained


def test_init_params_by_site_name(regression_data):
    ens = EnsembleMAP(regression_model, optax.adam(0.01), ensemble_size=3)
    sigmas = jnp.array([0.5, 1.0, 2.0])
    points = ens.get_points(ens.init(random.key(0), *regression_data, init_params={"sigma": sigmas}))
    np.testing.assert_allclose(points["sigma"], sigmas, rtol=1e-6)


def test_minibatch_losses_are_unbiased():
    """Each member draws its own batch; the N/|B| scaling makes the mean batch loss
    the full-data loss (many members with one shared point, one evaluate call)."""
    x = jnp.linspace(-2.0, 2.0, 16)
    y = 1.5 * x
    ens = EnsembleMAP(subsample_model, optax.adam(0.01), ensemble_size=4000)
    state = ens.init(random.key(0), x, y, init_params={"w": jnp.array(0.7)})
    batch_losses = ens.evaluate(state, x, y)
    full = EnsembleMAP(subsample_model, optax.adam(0.01), ensemble_size=1)
    full_state = full.init(random.key(0), x, y, batch=16, init_params={"w": jnp.array(0.7)})
    full_loss = full.evaluate(full_state, x, y, batch=16)[0]
    assert len(np.unique(np.asarray(batch_losses))) > 100  # batches differ per member
    stderr = batch_losses.std() / np.sqrt(batch_losses.size)
    assert abs(batch_losses.mean() - full_loss) < 4 * stderr


def test_one_shot_functions():
    points, losses = ensemble_map(normal_model, Y, ensemble_size=3, num_steps=1500, rng_key=random.key(0),
                                  learning_rate=0.05, prior_weight=0.0)
    np.testing.assert_allclose(points["mu"], jnp.full(3, Y.mean()), rtol=1e-4)
    assert losses.shape == (3, 1500)
    from numpyro.infer.autoguide import AutoNormal

    params, losses = ensemble_svi(normal_model, AutoNormal(normal_model), Y, ensemble_size=2, num_steps=10,
                                  rng_key=random.key(0), optim=optax.adam(0.01))
    assert params["mu_auto_loc"].shape == (2,) and losses.shape == (2, 10)
    with pytest.raises(ValueError, match="either optim or learning_rate"):
        ensemble_map(normal_model, Y, ensemble_size=2, num_steps=5, rng_key=random.key(0),
                     optim=optax.adam(0.1), learning_rate=0.1)


class TestErrors:
    def test_no_latent_sites(self):
        def model(y):
            numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

        with pytest.raises(ValueError, match="no latent sample sites"):
            EnsembleMAP(model, optax.adam(0.1), ensemble_size=2).run(random.key(0), 10, Y)

    def test_discrete_latents(self):
        def model(y):
            k = numpyro.sample("k", dist.Bernoulli(0.5))
            mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(mu + k, 1.0), obs=y)

        with pytest.raises(ValueError, match=r"discrete latent sites \['k'\]"):
            EnsembleMAP(model, optax.adam(0.1), ensemble_size=2).init(random.key(0), Y)

    @pytest.mark.parametrize("bad, exc", [(-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), (None, TypeError)])
    def test_prior_weight(self, bad, exc):
        with pytest.raises(exc, match="prior_weight"):
            EnsembleMAP(normal_model, optax.adam(0.1), ensemble_size=2, prior_weight=bad)

    def test_optim_and_size(self):
        with pytest.raises(TypeError, match="optim must be"):
            EnsembleMAP(normal_model, object(), ensemble_size=2)
        with pytest.raises(ValueError, match="ensemble_size"):
            EnsembleMAP(normal_model, optax.adam(0.1), ensemble_size=0)


def test_flat_prior_regression_is_least_squares():
    from numpyro.distributions import constraints

    def flat(X, y):
        beta = numpyro.sample("beta", dist.ImproperUniform(constraints.real, (), (X.shape[1],)))
        numpyro.sample("y", dist.Normal(X @ beta, 0.5), obs=y)

    X = random.normal(random.key(0), (30, 3))
    y = X @ jnp.array([1.0, -2.0, 0.5]) + 0.5 * random.normal(random.key(1), (30,))
    lstsq = np.linalg.lstsq(np.asarray(X), np.asarray(y), rcond=None)[0]
    for prior_weight in (1.0, 0.0):  # MAP under a flat prior, and MLE: both least squares
        ens = EnsembleMAP(flat, optax.adam(0.05), ensemble_size=3, prior_weight=prior_weight)
        result = ens.run(random.key(2), 1500, X, y, progress_bar=False)
        points = ens.get_points(result.params)["beta"]
        assert len(set(np.asarray(result.losses[:, 0]).round(4).tolist())) == 3  # own starts
        np.testing.assert_allclose(points, np.broadcast_to(lstsq, (3, 3)), atol=2e-3)
