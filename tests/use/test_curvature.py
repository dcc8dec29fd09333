"""The GGN and its diagonals against the exact Hessian and the dense GGN."""

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import seed
from numpyro.infer.autoguide import AutoDiagonalNormal

from numpyro_ensemble.use.curvature import (
    Potential,
    dense_ggn,
    ggn_likelihood_diagonal,
    hessian_diagonal,
    likelihood_sites,
    linearize_likelihood,
    prior_diagonal,
    site_ranges,
    unsupported_sites,
)


def _potential(model, *args):
    guide = AutoDiagonalNormal(model)
    seed(guide, random.key(0))(*args)
    observed = likelihood_sites(guide.prototype_trace)
    return Potential(model, args, {}, guide._unpack_latent, observed), guide


def linear_gaussian(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 2.0).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(x @ w + b, 0.5), obs=y)


def tanh_net(x, y):
    w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, 8]).to_event(2))
    w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([8, 1]).to_event(2))
    sigma = numpyro.sample("sigma", dist.LogNormal(-1.0, 0.5))
    numpyro.sample("y", dist.Normal((jnp.tanh(x @ w1) @ w2)[:, 0], sigma), obs=y)


def classifier(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1], 3]).to_event(2))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Categorical(logits=jnp.tanh(x @ w)), obs=y)


def _data(n=30, d=3):
    x = random.normal(random.key(1), (n, d))
    return x, x @ jnp.arange(1.0, d + 1) + 0.3 * random.normal(random.key(2), (n,))


def test_ggn_equals_the_hessian_of_a_linear_gaussian_model():
    potential, guide = _potential(linear_gaussian, *_data())
    z = random.normal(random.key(3), (guide.latent_dim,))
    got, want = jax.jit(lambda z: (dense_ggn(potential, z), jax.hessian(potential)(z)))(z)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def test_ggn_is_positive_semi_definite_on_a_tanh_network_where_the_hessian_is_not():
    x = jnp.linspace(-3, 3, 40)[:, None]
    y = jnp.sin(2 * x[:, 0])
    potential, guide = _potential(tanh_net, x, y)
    z = 1.5 * random.normal(random.key(4), (guide.latent_dim,))
    hessian, ggn = jax.jit(
        lambda z: (
            jax.hessian(potential)(z),
            dense_ggn(potential, z) - jax.hessian(potential.prior)(z),
        )
    )(z)
    hessian = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    assert hessian.min() < -1.0  # indefinite there
    assert np.linalg.eigvalsh(np.asarray(ggn, np.float64)).min() > -1e-3 * hessian.max()


def test_ggn_products_and_diagonals_match_the_dense_ggn():
    x = jnp.linspace(-3, 3, 40)[:, None]
    potential, guide = _potential(tanh_net, x, jnp.sin(2 * x[:, 0]))
    z = random.normal(random.key(5), (guide.latent_dim,))
    lin = linearize_likelihood(potential, z)
    dense = dense_ggn(potential, z) - jax.hessian(potential.prior)(z)
    v = random.normal(random.key(6), z.shape)
    np.testing.assert_allclose(lin.matvec(v), dense @ v, rtol=1e-4, atol=1e-3)
    # rows (40 outputs + 40 scales > 17 coordinates: from columns) and the prior's
    np.testing.assert_allclose(ggn_likelihood_diagonal(potential, z), jnp.diag(dense), rtol=1e-4)
    prior, exact = prior_diagonal(potential, z, [])
    assert bool(exact)
    np.testing.assert_allclose(prior, jnp.diag(jax.hessian(potential.prior)(z)), rtol=1e-4)
    np.testing.assert_allclose(
        hessian_diagonal(potential, z), jnp.diag(jax.hessian(potential)(z)), rtol=1e-4, atol=1e-4
    )


def test_diagonal_from_rows_and_categorical_fisher_match_the_dense_ggn():
    # few outputs, many coordinates: the diagonal from J's rows
    x, y = _data(n=4, d=40)
    potential, guide = _potential(linear_gaussian, x, y)
    z = random.normal(random.key(7), (guide.latent_dim,))
    dense = dense_ggn(potential, z) - jax.hessian(potential.prior)(z)
    np.testing.assert_allclose(ggn_likelihood_diagonal(potential, z), jnp.diag(dense), rtol=1e-4)
    # a categorical likelihood: its GGN equals the Hessian when the logits are linear
    x = random.normal(random.key(8), (20, 4))
    labels = random.categorical(random.key(9), jnp.zeros(3), shape=(20,))
    potential, guide = _potential(classifier, x, labels)
    z = 0.3 * random.normal(random.key(10), (guide.latent_dim,))
    lin = linearize_likelihood(potential, z)
    dense = dense_ggn(potential, z)
    v = random.normal(random.key(11), z.shape)
    np.testing.assert_allclose(
        lin.matvec(v) + jax.hessian(potential.prior)(z) @ v, dense @ v, rtol=1e-4, atol=1e-4
    )
    assert np.linalg.eigvalsh(np.asarray(dense, np.float64)).min() > 0
    np.testing.assert_allclose(
        ggn_likelihood_diagonal(potential, z) + 1.0, jnp.diag(dense), rtol=1e-4
    )


def _ranges(guide):
    index = guide._unpack_latent(jnp.arange(guide.latent_dim))
    return [(int(jnp.min(i)), int(jnp.max(i)) + 1) for i in index.values()]


def test_site_ranges_follow_the_guides_layout():
    potential, guide = _potential(tanh_net, jnp.ones((3, 1)), jnp.ones(3))
    assert site_ranges(guide) == _ranges(guide)


def test_prior_diagonal_from_site_blocks_beyond_the_exact_size():
    def wide(y):
        w = numpyro.sample("w", dist.Normal(0.0, 0.5).expand([3000]).to_event(1))
        s = numpyro.sample("s", dist.Normal(0.0, 2.0).expand([10]).to_event(1))
        numpyro.sample("y", dist.Normal(jnp.sum(w) + jnp.sum(s), 1.0), obs=y)

    potential, guide = _potential(wide, jnp.array(1.0))
    z = jnp.zeros(guide.latent_dim)
    ranges = _ranges(guide)
    diagonal, exact = jax.jit(lambda z: prior_diagonal(potential, z, ranges))(z)
    assert bool(exact)
    want = guide._unpack_latent(jnp.arange(guide.latent_dim))
    np.testing.assert_allclose(diagonal[want["w"]], 4.0, rtol=1e-5)
    np.testing.assert_allclose(diagonal[want["s"]], 0.25, rtol=1e-5)

    def walk(y):  # a random walk's precision is tridiagonal within its site
        w = numpyro.sample("w", dist.GaussianRandomWalk(1.0, num_steps=3000))
        numpyro.sample("y", dist.Normal(jnp.sum(w), 1.0), obs=y)

    potential, guide = _potential(walk, jnp.array(1.0))
    ranges = _ranges(guide)
    _, exact = jax.jit(lambda z: prior_diagonal(potential, z, ranges))(jnp.zeros(3000))
    assert not bool(exact)


def test_unsupported_likelihood_sites_are_named():
    def model(y):
        rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
        numpyro.sample("y", dist.Exponential(rate), obs=y)
        numpyro.factor("extra", -rate)

    _, guide = _potential(model, jnp.ones(3))
    assert unsupported_sites(guide.prototype_trace) == {"y": "Exponential", "extra": "Unit"}
