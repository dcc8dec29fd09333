"""laplace_members(..., sites=[...]): the Laplace approximation over some latent sites,
the others held at each member's point (use/laplace_sites.py)."""

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    laplace_exclusions,
    laplace_members,
    linearized_predictive,
    sample_posterior,
)

SIGMA = 0.5
X = jnp.linspace(0.0, 2.0, 20)  # not centred: a and b are correlated a posteriori
Y = 1.0 + 2.0 * X + SIGMA * random.normal(random.key(1), (20,))


def line(x, y=None):
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x, SIGMA), obs=y)


@pytest.fixture(scope="module")
def fitted_line():
    ens = EnsembleMAP(line, ensemble_size=3)
    return ens, ens.run(random.key(0), 300, X, Y, progress_bar=False).params


def test_one_site_of_a_line_is_its_conditional_posterior(fitted_line):
    ens, params = fitted_line
    laplace, lp = laplace_members(ens, params, X, Y, sites=["b"])
    points = ens.get_points(params)
    # b | a, y is Gaussian with precision sum(x^2) / sigma^2 + 1 / 10^2 (exact here)
    conditional = 1.0 / np.sqrt(float(jnp.sum(X**2)) / SIGMA**2 + 1e-2)
    np.testing.assert_allclose(lp["auto_scale_tril"][:, 0, 0], conditional, rtol=1e-4)
    np.testing.assert_allclose(lp["auto_loc"][:, 0], points["b"], rtol=1e-4)
    np.testing.assert_array_equal(lp["a_held"], points["a"])
    # the marginal of b (both sites) is wider: the test tells them apart
    _, both = laplace_members(ens, params, X, Y)
    cov = both["auto_scale_tril"] @ np.swapaxes(both["auto_scale_tril"], 1, 2)
    assert np.all(np.sqrt(cov[:, 1, 1]) > 1.5 * conditional)
    draws = sample_posterior(laplace, random.key(2), lp, X, Y, num_samples=5)
    assert set(draws) == {"b"} and draws["b"].shape == (3, 5)


def test_bad_sites_are_caught_before_compiling(fitted_line):
    ens, params = fitted_line
    with pytest.raises(ValueError, match=r"sites must name latent sites of the model, got \['c'\]"):
        laplace_members(ens, params, X, Y, sites=["c"])
    with pytest.raises(TypeError, match="sites must be a list of latent site names"):
        laplace_members(ens, params, X, Y, sites="b")


def net(x, y=None):
    w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, 6]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([6]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([6]).to_event(1))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0))
    mean = jnp.tanh(x[:, None] @ w1 + b1) @ w2 + b2
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(mean, 0.1), obs=y)


def test_the_last_layer_of_a_network_is_the_block_of_the_full_ggn():
    x = jnp.linspace(-2.0, 2.0, 30)
    y = jnp.sin(x)
    ens = EnsembleMAP(net, optax.adam(0.02), ensemble_size=2)
    params = ens.run(random.key(3), 500, x, y, progress_bar=False).params
    last = ["w2", "b2"]
    # the diagonal structure: no mode search where every support is real, so both
    # approximations sit at the same points
    laplace, lp = laplace_members(ens, params, x, y, curvature="ggn", structure="diagonal", sites=last)
    full, fp = laplace_members(ens, params, x, y, curvature="ggn", structure="diagonal")
    assert laplace_exclusions(laplace) == {} and laplace_exclusions(full) == {}
    # the GGN of the last layer, the others held, is the full GGN's block of those sites
    index = full.guide._unpack_latent(np.arange(full.guide.latent_dim))
    block = np.concatenate([np.ravel(index[name]) for name in laplace.guide._init_locs])
    np.testing.assert_allclose(lp["auto_scale"], fp["auto_scale"][:, block], rtol=1e-5)
    assert lp["auto_scale"].shape == (2, 7)
    one, op = laplace_members(ens, params, x, y, curvature="ggn", sites=last)  # auto: full
    assert op["auto_scale_tril"].shape == (2, 7, 7) and laplace_exclusions(one) == {}
    predicted = linearized_predictive(one, random.key(4), op, x[:5], num_samples=50)
    assert predicted["y"].shape == (2, 50, 5) and np.isfinite(predicted["y"]).all()
