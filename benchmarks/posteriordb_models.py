"""NumPyro translations of posteriordb's Stan models, for ``benchmarks/posteriordb.py``.

Each :class:`Translation` holds a model, written by hand from posteriordb's
``models/stan/<model>.stan``, and a function that turns posteriordb's data (the
JSON dict of ``data/data/<data>.json.zip``) into the model's positional arguments.
Site names and shapes follow the Stan program, so a Stan parameter ``beta[2]``
(1-based) is ``beta[..., 1]`` here; Stan's transformed parameters that the
reference draws include are ``numpyro.deterministic`` sites.

How Stan's conventions are translated:

- a parameter with no sampling statement has a flat (improper) density on its
  declared support: ``dist.ImproperUniform(support, (), event_shape)``;
- ``real<lower=0> s; s ~ normal(0, c)`` (or ``cauchy``) is a half-normal (half-Cauchy):
  Stan drops the constant that the truncation adds, which does not change the posterior;
- ``gamma(a, b)`` is NumPyro's ``Gamma(a, rate=b)``;
- a statement on a function of the parameters (Stan adds no Jacobian) is kept as a
  likelihood of the data with that function as its mean or scale.

Every translation was checked against posteriordb's reference draws with NUTS
(``python benchmarks/posteriordb.py --posteriordb PATH --check``, see
``docs/posteriordb.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints


class Translation(NamedTuple):
    model: Callable
    args: Callable[[dict], tuple]
    """posteriordb's data dict -> the model's positional arguments (float64 arrays)."""
    kind: str
    """What the posterior stands for in the benchmark (ill-conditioned, hierarchical, ...)."""


def _flat(support, event_shape=()):
    """Stan's implicit prior of a parameter without a sampling statement."""
    return dist.ImproperUniform(support, (), event_shape)


def _f64(*values):
    return tuple(jnp.asarray(np.asarray(v, dtype=np.float64)) for v in values)


# --- ill-conditioned regressions: unscaled predictors, flat priors -----------------


def mesquite(diam1, diam2, canopy_height, total_height, density, group, weight):
    beta = numpyro.sample("beta", _flat(constraints.real, (7,)))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    mu = (
        beta[0] + beta[1] * diam1 + beta[2] * diam2 + beta[3] * canopy_height
        + beta[4] * total_height + beta[5] * density + beta[6] * group
    )
    numpyro.sample("weight", dist.Normal(mu, sigma), obs=weight)


def kidscore_interaction(mom_hs, mom_iq, kid_score):
    beta = numpyro.sample("beta", _flat(constraints.real, (4,)))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    inter = mom_hs * mom_iq
    mu = beta[0] + beta[1] * mom_hs + beta[2] * mom_iq + beta[3] * inter
    numpyro.sample("kid_score", dist.Normal(mu, sigma), obs=kid_score)


def kilpisjarvi(x, y, pmualpha, psalpha, pmubeta, psbeta):
    alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
    beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def earn_height(height, earn):
    beta = numpyro.sample("beta", _flat(constraints.real, (2,)))
    sigma = numpyro.sample("sigma", _flat(constraints.positive))
    numpyro.sample("earn", dist.Normal(beta[0] + beta[1] * height, sigma), obs=earn)


def blr(X, y):
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


# --- hierarchical ---------------------------------------------------------------------


def eight_schools_noncentered(sigma, y):
    theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0).expand([8]).to_event(1))
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.deterministic("theta", theta_trans * tau + mu)
    numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


# --- Gaussian processes -------------------------------------------------------------


def _exp_quad(x, alpha, rho):
    """Stan's gp_exp_quad_cov: alpha^2 exp(-(x - x')^2 / (2 rho^2))."""
    d = x[:, None] - x[None, :]
    return alpha**2 * jnp.exp(-0.5 * (d / rho) ** 2)


def gp_pois_regr(x, k):
    n = x.shape[0]
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    f_tilde = numpyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand([n]).to_event(1))
    cov = _exp_quad(x, alpha, rho) + 1e-10 * jnp.eye(n)
    f = numpyro.deterministic("f", jnp.linalg.cholesky(cov) @ f_tilde)
    numpyro.sample("k", dist.Poisson(jnp.exp(f)), obs=k)


def gp_regr(x, y):
    n = x.shape[0]
    rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
    alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    # Stan's program adds sigma (not sigma^2) to the diagonal; kept as written.
    cov = _exp_quad(x, alpha, rho) + sigma * jnp.eye(n)
    numpyro.sample(
        "y", dist.MultivariateNormal(jnp.zeros(n), scale_tril=jnp.linalg.cholesky(cov)), obs=y
    )


# --- time series -----------------------------------------------------------------------


def arK(lags, y):
    """``lags[t, k] = y[t - k - 1]``: the K previous values of every y after the first K."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([lags.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    numpyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y)


def _arK_args(data):
    K, y = int(data["K"]), np.asarray(data["y"], np.float64)
    lags = np.stack([y[K - k - 1 : len(y) - k - 1] for k in range(K)], axis=1)
    return _f64(lags, y[K:])


def arma11(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
    theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
    nu_1 = mu + phi * mu  # Stan: err[0] = 0

    def step(err_prev, y_pair):
        y_prev, y_t = y_pair
        nu = mu + phi * y_prev + theta * err_prev
        return y_t - nu, nu

    _, nu_rest = lax.scan(step, y[0] - nu_1, (y[:-1], y[1:]))
    # err ~ normal(0, sigma) with err = y - nu is y ~ normal(nu, sigma): the same density.
    nu = jnp.concatenate([nu_1[None], nu_rest])
    numpyro.sample("y", dist.Normal(nu, sigma), obs=y)


def garch11(sigma1, y):
    mu = numpyro.sample("mu", _flat(constraints.real))
    alpha0 = numpyro.sample("alpha0", _flat(constraints.positive))
    # Stan: alpha1 in (0, 1), beta1 in (0, 1 - alpha1), both flat. A support that depends
    # on another parameter is not fixed for AutoGuides, so beta1 = (1 - alpha1) * beta1_unit
    # with beta1_unit ~ uniform(0, 1); the flat density on the triangle is then alpha1's
    # marginal (1 - alpha1) on (0, 1), i.e. Beta(1, 2), times the uniform beta1_unit.
    alpha1 = numpyro.sample("alpha1", dist.Beta(1.0, 2.0))
    beta1_unit = numpyro.sample("beta1_unit", dist.Uniform(0.0, 1.0))
    beta1 = numpyro.deterministic("beta1", (1.0 - alpha1) * beta1_unit)

    def step(sigma_prev, y_prev):
        sigma_t = jnp.sqrt(alpha0 + alpha1 * (y_prev - mu) ** 2 + beta1 * sigma_prev**2)
        return sigma_t, sigma_t

    _, sigma_rest = lax.scan(step, sigma1, y[:-1])
    sigma = jnp.concatenate([jnp.broadcast_to(sigma1, (1,)), sigma_rest])
    numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


# --- a mixture -------------------------------------------------------------------------


class OrderedNormal(dist.Distribution):
    """iid ``Normal(0, scale)`` restricted to increasing vectors (Stan's ``ordered[n] mu;
    mu ~ normal(0, scale)``): the order statistics of iid normals, density ``n!`` times
    the product of normal densities. Proper, so MAP members can start at prior draws."""

    support = constraints.ordered_vector

    def __init__(self, scale, size):
        self.scale, self.size = scale, size
        super().__init__(batch_shape=(), event_shape=(size,))

    def sample(self, key, sample_shape=()):
        draws = self.scale * jax.random.normal(key, sample_shape + (self.size,))
        return jnp.sort(draws, axis=-1)

    def log_prob(self, value):
        lgamma = jax.scipy.special.gammaln(self.size + 1.0)
        return dist.Normal(0.0, self.scale).log_prob(value).sum(-1) + lgamma


def low_dim_gauss_mix(y):
    mu = numpyro.sample("mu", OrderedNormal(2.0, 2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
    mixing = dist.Categorical(probs=jnp.stack([theta, 1.0 - theta]))
    numpyro.sample("y", dist.MixtureSameFamily(mixing, dist.Normal(mu, sigma)), obs=y)


POSTERIORS = {
    "mesquite-mesquite": Translation(
        mesquite,
        lambda d: _f64(d["diam1"], d["diam2"], d["canopy_height"], d["total_height"],
                       d["density"], d["group"], d["weight"]),
        "ill-conditioned (unscaled, flat)",
    ),
    "kidiq-kidscore_interaction": Translation(
        kidscore_interaction,
        lambda d: _f64(d["mom_hs"], d["mom_iq"], d["kid_score"]),
        "ill-conditioned (corr 0.99)",
    ),
    "kilpisjarvi_mod-kilpisjarvi": Translation(
        kilpisjarvi,
        lambda d: _f64(d["x"], d["y"], d["pmualpha"], d["psalpha"], d["pmubeta"], d["psbeta"]),
        "ill-conditioned (corr 0.99999)",
    ),
    "earnings-earn_height": Translation(
        earn_height,
        lambda d: _f64(d["height"], d["earn"]),
        "ill-conditioned (scale 1e4, flat)",
    ),
    "sblrc-blr": Translation(
        blr, lambda d: _f64(d["X"], d["y"]), "regression (sd 1e-3)"
    ),
    "eight_schools-eight_schools_noncentered": Translation(
        eight_schools_noncentered,
        lambda d: _f64(d["sigma"], d["y"]),
        "hierarchical (funnel, noncentred)",
    ),
    "gp_pois_regr-gp_regr": Translation(
        gp_regr, lambda d: _f64(d["x"], d["y"]), "GP (marginal)"
    ),
    "gp_pois_regr-gp_pois_regr": Translation(
        gp_pois_regr,
        lambda d: (*_f64(d["x"]), jnp.asarray(np.asarray(d["k"], np.int64))),
        "GP (latent, Poisson)",
    ),
    "arK-arK": Translation(arK, _arK_args, "time series (AR(5))"),
    "arma-arma11": Translation(arma11, lambda d: _f64(d["y"]), "time series (ARMA(1,1))"),
    "garch-garch11": Translation(
        garch11, lambda d: _f64(d["sigma1"], d["y"]), "time series (GARCH(1,1))"
    ),
    "low_dim_gauss_mix-low_dim_gauss_mix": Translation(
        low_dim_gauss_mix, lambda d: _f64(d["y"]), "mixture (ordered means)"
    ),
}


# --- a synthetic posterior with exact reference draws (for tests without posteriordb) -----


def correlated_regression(x, y, noise_sd, prior_sd):
    """``y ~ N(beta[0] + beta[1] x1 + beta[2] x2, noise_sd)``, ``beta ~ N(0, prior_sd)``,
    noise known: the posterior of beta is Gaussian, in closed form."""
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([3]).to_event(1))
    mean = beta[0] + x @ beta[1:]
    numpyro.sample("y", dist.Normal(mean, noise_sd), obs=y)


def synthetic(num_data: int = 50, num_reference: int = 10_000, seed: int = 0):
    """A correlated linear regression (inputs with correlation ~0.995, so the posterior
    of the two slopes has correlation ~-0.99) and ``num_reference`` exact draws from its
    analytic Gaussian posterior, in posteriordb's layout.

    :return: ``(translation, data dict, reference draws as a list of chains)``.
    """
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=num_data)
    x2 = x1 + 0.1 * rng.normal(size=num_data)
    x = np.stack([x1, x2], axis=1)
    noise_sd, prior_sd = 1.0, 10.0
    y = 0.5 + 1.0 * x1 - 1.0 * x2 + noise_sd * rng.normal(size=num_data)
    design = np.column_stack([np.ones(num_data), x])
    precision = design.T @ design / noise_sd**2 + np.eye(3) / prior_sd**2
    cov = np.linalg.inv(precision)
    mean = cov @ design.T @ y / noise_sd**2
    draws = rng.multivariate_normal(mean, cov, size=num_reference)
    reference = [{f"beta[{i + 1}]": draws[:, i].tolist() for i in range(3)}]
    data = {"x": x.tolist(), "y": y.tolist(), "noise_sd": noise_sd, "prior_sd": prior_sd}
    translation = Translation(
        correlated_regression,
        lambda d: _f64(d["x"], d["y"], d["noise_sd"], d["prior_sd"]),
        "synthetic Gaussian (corr -0.99)",
    )
    return translation, data, reference
