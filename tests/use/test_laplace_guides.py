"""LowRankPrecisionNormal, N(loc, (diag(d) + W W^T)^-1), against the dense formulas;
AutoLowRankPrecisionNormal fitted by SVI on a model whose posterior is known."""

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoContinuous
import optax
import pytest

from numpyro_ensemble import EnsembleSVI, sample_posterior
from numpyro_ensemble.use.laplace_guides import (
    AutoLowRankPrecisionNormal,
    LowRankPrecisionAffine,
    LowRankPrecisionNormal,
)

E, D, K = 3, 6, 2


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def make_params(key, batch=(E,), dim=D, rank=K):
    k1, k2, k3 = random.split(key, 3)
    loc = random.normal(k1, batch + (dim,))
    prec_factor = random.normal(k2, batch + (dim, rank))
    prec_diag = jnp.exp(random.normal(k3, batch + (dim,)))
    return loc, prec_factor, prec_diag


def dense_precision(prec_factor, prec_diag):
    W, d = np.asarray(prec_factor, np.float64), np.asarray(prec_diag, np.float64)
    return W @ np.swapaxes(W, -1, -2) + d[..., None] * np.eye(d.shape[-1])


def test_log_prob_equals_the_dense_multivariate_normal(x64):
    loc, W, d = make_params(random.key(0))
    q = LowRankPrecisionNormal(loc, W, d, validate_args=True)
    assert q.batch_shape == (E,) and q.event_shape == (D,)
    P = dense_precision(W, d)
    ref = dist.MultivariateNormal(loc, precision_matrix=jnp.asarray(P))
    x = 2.0 * random.normal(random.key(1), (4, E, D))
    assert q.log_prob(x).shape == (4, E)
    np.testing.assert_allclose(q.log_prob(x), ref.log_prob(x), rtol=1e-12, atol=1e-12)
    # one member's point against all three members' params: broadcasting
    np.testing.assert_allclose(q.log_prob(x[0, 0]), ref.log_prob(x[0, 0]), rtol=1e-12)
    np.testing.assert_allclose(q.precision_matrix, P, rtol=1e-12)
    np.testing.assert_allclose(q.covariance_matrix, np.linalg.inv(P), rtol=1e-9, atol=1e-12)


def test_variance_entropy_and_mean_equal_the_dense_formulas(x64):
    loc, W, d = make_params(random.key(2))
    q = LowRankPrecisionNormal(loc, W, d)
    cov = np.linalg.inv(dense_precision(W, d))
    np.testing.assert_allclose(q.variance, np.diagonal(cov, axis1=-2, axis2=-1), rtol=1e-10)
    _, logdet = np.linalg.slogdet(cov)
    np.testing.assert_allclose(q.entropy(), 0.5 * (D * (1 + np.log(2 * np.pi)) + logdet),
                               rtol=1e-12)
    # loc shared by the members, factors per member: mean and variance broadcast
    shared = LowRankPrecisionNormal(loc[0], W, d)
    assert shared.batch_shape == (E,)
    assert shared.mean.shape == shared.variance.shape == (E, D)
    np.testing.assert_allclose(shared.mean, np.broadcast_to(loc[0], (E, D)))
    assert LowRankPrecisionNormal.infer_shapes((D,), (E, D, K), (1, D)) == ((E,), (D,))


def test_draws_have_the_mean_and_covariance_of_the_distribution(x64):
    loc, W, d = make_params(random.key(3))
    q = LowRankPrecisionNormal(loc, W, d)
    n = 200_000
    x = np.asarray(q.sample(random.key(4), (n,)))
    assert x.shape == (n, E, D)
    assert q.sample(random.key(4)).shape == (E, D)
    assert q.sample(random.key(4), (2, 5)).shape == (2, 5, E, D)
    cov = np.linalg.inv(dense_precision(W, d))
    var = np.diagonal(cov, axis1=-2, axis2=-1)
    assert np.all(np.abs(x.mean(0) - loc) < 5 * np.sqrt(var / n))
    r = x - np.asarray(loc)
    emp = np.einsum("nei,nej->eij", r, r) / n
    se = np.sqrt((var[..., :, None] * var[..., None, :] + cov**2) / n)
    assert np.all(np.abs(emp - cov) < 5 * se)


def test_draws_are_reparametrized(x64):
    loc, W, d = make_params(random.key(5), batch=())
    key = random.key(6)

    def mean_draw(loc_):
        return LowRankPrecisionNormal(loc_, W, d).sample(key, (50,)).mean(0)

    np.testing.assert_allclose(jax.jacobian(mean_draw)(loc), np.eye(D), atol=1e-12)

    # E|x|^2 = |loc|^2 + tr(P^-1): its gradient in W is -2 P^-2 W, in d -diag(P^-2)
    def second_moment(W_, d_, key_):
        return jnp.square(LowRankPrecisionNormal(loc, W_, d_).sample(key_, (10_000,))).sum(-1).mean()

    keys = random.split(random.key(7), 20)
    gW, gd = jax.vmap(jax.grad(second_moment, argnums=(0, 1)), (None, None, 0))(W, d, keys)
    cov = np.linalg.inv(dense_precision(W, d))
    for g, exact in ((gW, -2 * cov @ cov @ np.asarray(W)), (gd, -np.diagonal(cov @ cov))):
        se = np.asarray(g).std(0) / np.sqrt(len(keys))
        assert np.all(np.abs(np.asarray(g).mean(0) - exact) < 5 * se + 1e-9)
    # the pathwise derivative itself, against central differences at the same draws
    h = 1e-6
    dW = jnp.zeros_like(W).at[1, 0].set(h)
    fd = (second_moment(W + dW, d, keys[0]) - second_moment(W - dW, d, keys[0])) / (2 * h)
    np.testing.assert_allclose(gW[0, 1, 0], fd, rtol=1e-6)


def test_jit_and_vmap_like_numpyro_distributions(x64):
    loc, W, d = make_params(random.key(8))
    x = random.normal(random.key(9), (E, D))
    q = LowRankPrecisionNormal(loc, W, d)
    built = jax.jit(LowRankPrecisionNormal)(loc, W, d)  # returned through jit: a pytree
    assert isinstance(built, LowRankPrecisionNormal) and built.batch_shape == (E,)
    np.testing.assert_allclose(built.log_prob(x), q.log_prob(x), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda q_, x_: q_.log_prob(x_))(q, x), q.log_prob(x),
                               rtol=1e-12)
    per_member = jax.vmap(lambda l_, W_, d_, x_: LowRankPrecisionNormal(l_, W_, d_).log_prob(x_))
    np.testing.assert_allclose(per_member(loc, W, d, x), q.log_prob(x), rtol=1e-12)
    draws = jax.vmap(lambda k: q.sample(k))(random.split(random.key(10), 4))
    assert draws.shape == (4, E, D)
    with pytest.raises(ValueError):
        LowRankPrecisionNormal(loc, W, -d, validate_args=True)
    with pytest.raises(ValueError):
        LowRankPrecisionNormal(loc, W[..., :-1, :], d)


def test_the_affine_transform_is_exact(x64):
    loc, W, d = make_params(random.key(11))
    T = LowRankPrecisionAffine(loc, W, d)
    eps = random.normal(random.key(12), (5, E, D))
    np.testing.assert_allclose(T.inv(T(eps)), eps, atol=1e-12)
    pushed = dist.TransformedDistribution(dist.Normal(jnp.zeros(D), 1.0).to_event(1), T)
    x = random.normal(random.key(13), (5, E, D))
    np.testing.assert_allclose(pushed.log_prob(x), LowRankPrecisionNormal(loc, W, d).log_prob(x),
                               rtol=1e-11)
    at_zero = LowRankPrecisionAffine(loc, jnp.zeros_like(W), d)  # repeated eigenvalues
    np.testing.assert_allclose(at_zero(eps), loc + eps / jnp.sqrt(d), rtol=1e-12)


N = 10
Y = 0.7 + random.normal(random.key(1), (N,))


def sum_model(y):
    """a, b ~ N(0, 1), y_i ~ N(a + b, 1), s ~ LogNormal(0, 0.5): the posterior precision
    of (a, b, log s) is diag(1, 1, 4) + N (1, 1, 0)(1, 1, 0)^T, diagonal plus rank one."""
    a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.sample("s", dist.LogNormal(0.0, 0.5))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(a + b, 1.0), obs=y)


def test_the_guide_fits_a_conjugate_model():
    guide = AutoLowRankPrecisionNormal(sum_model, rank=1)
    svi = SVI(sum_model, guide, numpyro.optim.Adam(0.05), Trace_ELBO())
    params = svi.run(random.key(2), 600, Y, progress_bar=False).params
    assert params["auto_prec_factor"].shape == (3, 1) and params["auto_prec_diag"].shape == (3,)
    u = np.array([1.0, 1.0, 0.0])
    P = np.diag([1.0, 1.0, 4.0]) + N * np.outer(u, u)
    cov = np.linalg.inv(P)
    mean = cov @ (float(Y.sum()) * u)
    posterior = guide.get_posterior(params)
    assert isinstance(posterior, LowRankPrecisionNormal)
    # SVI's last iterate wanders ~0.5 posterior sd (0 would be 3.5 away, the prior mean)
    whitened = np.linalg.cholesky(P).T @ (np.asarray(params["auto_loc"]) - mean)
    assert np.linalg.norm(whitened) < 1.5
    fitted = np.asarray(posterior.covariance_matrix)
    assert np.all(np.abs(np.sqrt(np.diag(fitted) / np.diag(cov)) - 1) < 0.3)
    assert fitted[0, 1] / np.sqrt(fitted[0, 0] * fitted[1, 1]) < -0.8  # truth -0.91

    draws = guide.sample_posterior(random.key(3), params, sample_shape=(100,))
    assert {k: v.shape for k, v in draws.items()} == {"a": (100,), "b": (100,), "s": (100,)}
    assert np.all(np.asarray(draws["s"]) > 0)
    median = guide.median(params)
    np.testing.assert_allclose(median["s"], np.exp(params["auto_loc"][2]), rtol=1e-6)
    q = guide.quantiles(params, [0.1, 0.5, 0.9])
    for name in ("a", "b", "s"):
        np.testing.assert_allclose(q[name][1], median[name], rtol=1e-6)
    sd = np.sqrt(np.asarray(posterior.variance))
    np.testing.assert_allclose(q["a"][2], params["auto_loc"][0] + 1.2815516 * sd[0], rtol=1e-5)
    # NumPyro's own route: base distribution pushed through get_transform
    pushed = AutoContinuous.get_posterior(guide, params)
    z = random.normal(random.key(4), (7, 3))
    np.testing.assert_allclose(pushed.log_prob(z), posterior.log_prob(z), rtol=1e-4)


def test_the_guide_starts_from_its_documented_params():
    guide = AutoLowRankPrecisionNormal(sum_model, init_scale=0.5)
    svi = SVI(sum_model, guide, numpyro.optim.Adam(0.05), Trace_ELBO())
    posterior = guide.get_posterior(svi.get_params(svi.init(random.key(0), Y)))
    assert posterior.prec_factor.shape == (3, 2)  # round(sqrt(3))
    np.testing.assert_allclose(posterior.prec_factor, 0.0)
    np.testing.assert_allclose(posterior.variance, 0.25, rtol=1e-6)
    with pytest.raises(ValueError):
        AutoLowRankPrecisionNormal(sum_model, init_scale=0.0)


def test_the_guide_runs_as_an_ensemble_with_per_member_params():
    guide = AutoLowRankPrecisionNormal(sum_model, rank=1)
    svi = EnsembleSVI(sum_model, guide, optax.adam(0.05), Trace_ELBO(), ensemble_size=E)
    params = svi.run(random.key(0), 200, Y, progress_bar=False).params
    assert params["auto_prec_factor"].shape == (E, 3, 1)
    posterior = guide.get_posterior(params)
    assert posterior.batch_shape == (E,)
    P = dense_precision(params["auto_prec_factor"], params["auto_prec_diag"])
    z = random.normal(random.key(1), (E, 3))
    ref = dist.MultivariateNormal(params["auto_loc"], precision_matrix=jnp.asarray(P))
    np.testing.assert_allclose(posterior.log_prob(z), ref.log_prob(z), rtol=1e-4)
    draws = sample_posterior(svi, random.key(2), params, Y, num_samples=10)
    assert {k: v.shape for k, v in draws.items()} == {"a": (E, 10), "b": (E, 10), "s": (E, 10)}
    # every member near the posterior mean of a + b, 2 sum(y) / (1 + 2N), sd 0.31
    a_plus_b = np.asarray(params["auto_loc"])[:, :2].sum(1)
    assert np.all(np.abs(a_plus_b - 2 * float(Y.sum()) / (1 + 2 * N)) < 0.4)


def big_dims(jaxpr, dim):
    """Shapes of the variables in ``jaxpr`` and its sub-jaxprs with two dims >= dim."""
    found = []
    for eqn in jaxpr.eqns:
        for var in [*eqn.invars, *eqn.outvars]:
            shape = getattr(getattr(var, "aval", None), "shape", ())
            if sum(s >= dim for s in shape) >= 2:
                found.append(shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += big_dims(sub, dim)
    return found


def test_no_dense_array_at_a_million_parameters_scale():
    dim = 100_000
    loc, W, d = make_params(random.key(0), batch=(), dim=dim, rank=3)
    x = jnp.zeros(dim)

    def log_prob(loc, W, d, x):
        return LowRankPrecisionNormal(loc, W, d).log_prob(x)

    def sample(loc, W, d):
        return LowRankPrecisionNormal(loc, W, d).sample(random.key(1), (2,))

    def variance(loc, W, d):
        return LowRankPrecisionNormal(loc, W, d).variance

    def transform(loc, W, d, x):
        T = LowRankPrecisionAffine(loc, W, d)
        return T.inv(T(x)), T.log_abs_det_jacobian(x, x)

    programs = [jax.make_jaxpr(log_prob)(loc, W, d, x), jax.make_jaxpr(sample)(loc, W, d),
                jax.make_jaxpr(variance)(loc, W, d), jax.make_jaxpr(transform)(loc, W, d, x),
                jax.make_jaxpr(jax.grad(lambda *a: sample(*a).sum(), (0, 1, 2)))(loc, W, d)]
    for program in programs:
        assert big_dims(program.jaxpr, dim) == []
    # the check itself finds a dense array, also inside a sub-jaxpr (here jit's)
    dense = jax.make_jaxpr(lambda W: jax.jit(lambda W: jnp.exp(W @ W.T).sum())(W))(W)
    assert all(len(e.outvars) == 1 and e.outvars[0].aval.shape != (dim, dim)
               for e in dense.jaxpr.eqns)
    assert (dim, dim) in big_dims(dense.jaxpr, dim)
