"""The evidence-optimal prior precision of a conjugate linear model against the
maximizer of its exact marginal likelihood, and of the Laplace evidence written out."""

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import multivariate_normal

from numpyro_ensemble import EnsembleMAP, laplace_members, laplace_prior_precision
from numpyro_ensemble.use.evidence import optimal_prior_scale

N, D, NOISE = 3, 4, 0.5
X = np.asarray(random.normal(random.key(0), (N, D)), np.float64)
Y = X @ np.array([1.0, -2.0, 0.5, 3.0]) + NOISE * np.asarray(random.normal(random.key(1), (N,)))


def linear(precision):
    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, precision**-0.5).expand([D]).to_event(1))
        numpyro.sample("y", dist.Normal(x @ w, NOISE).to_event(1), obs=y)

    return model


def log_marginal(precision):
    cov = NOISE**2 * np.eye(N) + X @ X.T / precision
    return multivariate_normal(np.zeros(N), cov).logpdf(Y)


def map_point(precision):
    return np.linalg.solve(X.T @ X / NOISE**2 + precision * np.eye(D), X.T @ Y / NOISE**2)


def laplace_log_evidence(precision, w):
    """log p(y | w) + log p(w) + D/2 log 2 pi - 1/2 log det(posterior precision)."""
    log_lik = multivariate_normal(X @ w, NOISE**2 * np.eye(N)).logpdf(Y)
    log_prior = multivariate_normal(np.zeros(D), np.eye(D) / precision).logpdf(w)
    _, logdet = np.linalg.slogdet(X.T @ X / NOISE**2 + precision * np.eye(D))
    return log_lik + log_prior + 0.5 * D * np.log(2 * np.pi) - 0.5 * logdet


def _scales(precision, structure, **kwargs):
    ens = EnsembleMAP(linear(precision), ensemble_size=2)
    params = {"w_auto_loc": jnp.asarray(np.stack([map_point(precision)] * 2), jnp.float32)}
    laplace, _ = laplace_members(
        ens, params, jnp.asarray(X), jnp.asarray(Y), structure=structure,
        prior_precision="evidence", **kwargs,
    )
    return laplace_prior_precision(laplace)


@pytest.mark.parametrize("structure, kwargs", [("full", {}), ("lowrank", {"rank": N})])
def test_the_evidence_optimal_prior_precision_of_a_conjugate_model(structure, kwargs):
    best = np.exp(minimize_scalar(lambda t: -log_marginal(np.exp(t)), bounds=(-10, 10),
                                  method="bounded", options={"xatol": 1e-8}).x)
    # at the type-II maximum likelihood precision, the MAP point's own prior is optimal
    np.testing.assert_allclose(_scales(best, structure, **kwargs), 1.0, rtol=2e-3)
    # elsewhere: the maximizer of the Laplace evidence at the fixed point, written out
    start = best / 20
    w = map_point(start)
    want = np.exp(minimize_scalar(lambda t: -laplace_log_evidence(np.exp(t), w),
                                  bounds=(-10, 10), method="bounded", options={"xatol": 1e-8}).x)
    np.testing.assert_allclose(_scales(start, structure, **kwargs) * start, want, rtol=2e-3)


def test_optimal_prior_scale_solves_mackays_equation():
    lam = jnp.array([100.0, 10.0, 1.0, 0.0])
    c = float(optimal_prior_scale(lam, jnp.array(0.5)))
    assert np.isclose(np.sum(np.asarray(lam) / (np.asarray(lam) + c)), 0.5 * c, rtol=1e-5)
    assert float(optimal_prior_scale(lam, jnp.array(0.0))) == pytest.approx(np.exp(25.0))


def test_evidence_needs_the_ggn():
    ens = EnsembleMAP(linear(1.0), ensemble_size=2)
    params = ens.get_params(ens.init(random.key(2), jnp.asarray(X), jnp.asarray(Y)))
    with pytest.raises(ValueError, match="prior_precision='evidence' needs curvature='ggn'"):
        laplace_members(ens, params, jnp.asarray(X), jnp.asarray(Y), curvature="hessian",
                        prior_precision="evidence")
    with pytest.raises(ValueError, match="prior_precision must be one of"):
        laplace_members(ens, params, jnp.asarray(X), jnp.asarray(Y), prior_precision="ml")
