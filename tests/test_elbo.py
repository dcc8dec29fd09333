"""TemperedTrace_ELBO: equals Trace_ELBO at kl_weight=1, tempers the right terms."""

from conftest import normal_model
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import replay, seed
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import compute_log_probs
from numpyro.primitives import mutable
import optax
import pytest

from numpyro_ensemble import EnsembleSVI, TemperedTrace_ELBO


def local_model(x, y=None):
    """A global and a local latent inside a subsampled plate, plus a factor."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    state = mutable("calls", {"n": jnp.array(0.0)})
    state["n"] = state["n"] + 1.0
    with numpyro.plate("data", x.shape[0], subsample_size=5) as idx:
        z = numpyro.sample("z", dist.Normal(mu, 1.0))
        numpyro.sample("y", dist.Normal(z + x[idx], 0.5), obs=None if y is None else y[idx])
    numpyro.factor("penalty", -0.1 * mu**2)


@pytest.fixture
def local_setup():
    x = jnp.linspace(0.0, 1.0, 20)
    y = 2.0 * x + 1.0
    guide = AutoNormal(local_model)
    svi = SVI(local_model, guide, optax.adam(0.01), Trace_ELBO())
    state = svi.init(random.key(0), x, y)
    params = svi.get_params(state)
    params.update(state.mutable_state)
    return x, y, guide, params


@pytest.mark.parametrize("num_particles", [1, 4])
def test_kl_weight_one_equals_trace_elbo(local_setup, num_particles):
    x, y, guide, params = local_setup
    for key in random.split(random.key(5), 3):
        ref = Trace_ELBO(num_particles=num_particles).loss_with_mutable_state(key, params, local_model, guide, x, y)
        got = TemperedTrace_ELBO(num_particles=num_particles, kl_weight=1.0).loss_with_mutable_state(
            key, params, local_model, guide, x, y
        )
        assert got["loss"] == ref["loss"]  # exactly
        if num_particles == 1:
            n = params["calls"]["n"] + 1.0  # one more model call
            assert got["mutable_state"]["calls"]["n"] == ref["mutable_state"]["calls"]["n"] == n


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 2.5])
def test_tempered_loss_is_the_formula(local_setup, kl_weight):
    """-(log p(y|z) + beta (log p(z) - log q(z))), each site with its plate scale N/|B|."""
    x, y, guide, params = local_setup
    key = random.key(11)
    got = TemperedTrace_ELBO(kl_weight=kl_weight).loss(key, params, local_model, guide, x, y)

    model_seed, guide_seed = random.split(key)
    guide_lp, guide_trace = compute_log_probs(seed(guide, guide_seed), (x, y), {}, params)
    model_lp, model_trace = compute_log_probs(
        replay(seed(local_model, model_seed), guide_trace), (x, y), {}, params
    )
    observed = [n for n, s in model_trace.items() if s["type"] == "sample" and s["is_observed"]]
    assert set(observed) == {"y", "penalty"}  # the factor counts as likelihood
    assert model_trace["y"]["scale"] == 4.0 and model_trace["z"]["scale"] == 4.0
    log_lik = sum(model_lp[n] for n in observed)
    log_prior = sum(v for n, v in model_lp.items() if n not in observed)
    expected = -(log_lik + kl_weight * (log_prior - sum(guide_lp.values())))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_factor_sites_are_untempered():
    """A likelihood written as a factor gives the same tempered loss as the obs site."""
    y = jnp.array([0.5, 1.0, 2.0])

    def factor_model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        numpyro.factor("lik", dist.Normal(mu, 1.0).log_prob(y).sum())

    guide = AutoNormal(normal_model)
    svi = SVI(normal_model, guide, optax.adam(0.1), Trace_ELBO())
    params = svi.get_params(svi.init(random.key(0), y))
    elbo = TemperedTrace_ELBO(kl_weight=0.25)
    for key in random.split(random.key(1), 3):
        np.testing.assert_allclose(
            elbo.loss(key, params, factor_model, guide, y),
            elbo.loss(key, params, normal_model, guide, y),
            rtol=1e-6,
        )


@pytest.mark.slow
def test_tempered_optimum_is_the_tempered_posterior():
    """For Normal-Normal the optimum of the tempered ELBO over Normal q is
    N(m, s^2) with precision 1/tau^2 + n/(beta sigma^2), m = s^2 sum(y)/(beta sigma^2)."""
    y = jnp.array([0.3, 1.1, 0.8, 1.6, 0.9])
    tau, beta = 2.0, 0.5
    precision = 1 / tau**2 + y.size / beta
    mean, sd = (y.sum() / beta) / precision, precision**-0.5
    optim = optax.adam(optax.exponential_decay(0.05, 500, 0.5))
    svi = EnsembleSVI(
        normal_model, AutoNormal(normal_model), optim,
        TemperedTrace_ELBO(num_particles=32, kl_weight=beta), ensemble_size=8,
    )
    params = svi.run(random.key(0), 4000, y, progress_bar=False).params
    np.testing.assert_allclose(params["mu_auto_loc"].mean(), mean, rtol=0.02)
    np.testing.assert_allclose(params["mu_auto_scale"].mean(), sd, rtol=0.03)
    # beta = 1 would be the ordinary posterior: clearly different numbers.
    assert abs(sd - (1 / tau**2 + y.size) ** -0.5) > 0.05


@pytest.mark.parametrize("bad, exc", [(-0.1, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), ("1", TypeError), (jnp.ones((2, 2)), ValueError), (jnp.array([1.0, -1.0]), ValueError)])
def test_bad_kl_weight(bad, exc):
    with pytest.raises(exc, match="kl_weight"):
        TemperedTrace_ELBO(kl_weight=bad)


def test_per_member_kl_weight_needs_an_ensemble_of_that_size():
    y = jnp.array([0.5, 1.0, 1.5])
    loss = TemperedTrace_ELBO(kl_weight=np.array([1.0, 0.5, 0.2, 0.1]))
    with pytest.raises(ValueError, match=r"kl_weight has 4 values, but ensemble_size=3"):
        EnsembleSVI(normal_model, AutoNormal(normal_model), optax.adam(0.01), loss, ensemble_size=3)
    # A plain SVI has no members to share the weights out: the (E,) array would broadcast
    # over the sites and sum E tempered ELBOs into one loss.
    svi = SVI(normal_model, AutoNormal(normal_model), optax.adam(0.01),
              TemperedTrace_ELBO(kl_weight=[1.0, 0.5]))
    with pytest.raises(ValueError, match=r"kl_weight has 2 values \(one per member\), but this "
                                         r"loss is evaluated on its own.*ensemble_size=2"):
        svi.run(random.key(0), 2, y, progress_bar=False)
