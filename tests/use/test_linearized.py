"""The linearized (GLM) predictive of Laplace members: exact for a linear-Gaussian
model, the network at its point on average, narrower than pushing weight draws through
a network; NaN members, weights, bad input."""

import warnings

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    ensemble_predictive,
    laplace_members,
    linearized_predictive,
)
from numpyro_ensemble.use.curvature import FAMILIES
from numpyro_ensemble.use.linearized import NATURAL

NOISE, PRIOR_SD = 0.3, 2.0
X = jnp.stack([jnp.ones(30), jnp.linspace(-1.0, 1.0, 30)], axis=1)
Y = X @ jnp.array([0.5, -1.0]) + NOISE * random.normal(random.key(0), (30,))
X_NEW = jnp.stack([jnp.ones(4), jnp.array([-2.0, 0.0, 1.0, 3.0])], axis=1)


def linear(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, PRIOR_SD).expand([2]).to_event(1))
    f = numpyro.deterministic("f", x @ w)
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(f, NOISE), obs=y)


def exact_posterior():
    """The posterior N(m, S) of w, S = (X^T X / noise^2 + I / prior_sd^2)^{-1}."""
    design = np.asarray(X, np.float64)
    covariance = np.linalg.inv(design.T @ design / NOISE**2 + np.eye(2) / PRIOR_SD**2)
    return covariance @ design.T @ np.asarray(Y, np.float64) / NOISE**2, covariance


def test_the_linearized_predictive_of_a_linear_gaussian_model_is_its_posterior_predictive():
    ens = EnsembleMAP(linear, ensemble_size=2)
    # any start: laplace_members' mode search (structure="full") finds the exact mode
    params = ens.get_params(ens.init(random.key(1), X, Y))
    laplace, laplace_params = laplace_members(
        ens, params, X, Y, curvature="hessian", structure="full"
    )
    mean, covariance = exact_posterior()
    S = 4000
    draws = linearized_predictive(
        laplace, random.key(2), laplace_params, X_NEW, num_samples=S, return_sites=["w", "f", "y"]
    )
    assert {k: v.shape for k, v in draws.items()} == {
        "w": (2, S, 2),
        "f": (2, S, 4),
        "y": (2, S, 4),
    }
    # the linearization of a linear function is the function: f at every draw, exactly
    np.testing.assert_allclose(draws["f"], jnp.einsum("nd,esd->esn", X_NEW, draws["w"]), atol=1e-5)
    design = np.asarray(X_NEW, np.float64)
    f_mean, f_var = design @ mean, np.diag(design @ covariance @ design.T)
    y_var = f_var + NOISE**2
    for e in range(2):
        f, y = np.asarray(draws["f"][e], np.float64), np.asarray(draws["y"][e], np.float64)
        # within 4 Monte Carlo standard errors (the variance's relative one is sqrt(2 / S))
        np.testing.assert_array_less(np.abs(f.mean(0) - f_mean), 4 * np.sqrt(f_var / S))
        np.testing.assert_array_less(np.abs(y.mean(0) - f_mean), 4 * np.sqrt(y_var / S))
        np.testing.assert_allclose(f.var(0), f_var, rtol=4 * np.sqrt(2 / S))
        np.testing.assert_allclose(y.var(0), y_var, rtol=4 * np.sqrt(2 / S))
    # by default the observed and deterministic sites, as Predictive returns them
    default = linearized_predictive(laplace, random.key(2), laplace_params, X_NEW, num_samples=3)
    assert sorted(default) == ["f", "y"]


H = 8
X_NET = jnp.linspace(-2.0, 2.0, 30)
Y_NET = jnp.sin(2.0 * X_NET) + 0.1 * random.normal(random.key(3), (30,))


def network(x, y=None):
    w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([1, H]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([H]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([H, 1]).to_event(2))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
    f = numpyro.deterministic("f", forward({"w1": w1, "b1": b1, "w2": w2, "b2": b2}, x))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(f, 0.1), obs=y)


def forward(weights, x):
    hidden = jnp.tanh(x[:, None] @ weights["w1"] + weights["b1"])
    return (hidden @ weights["w2"] + weights["b2"])[:, 0]


@pytest.fixture(scope="module")
def network_fit():
    ens = EnsembleMAP(network, optax.adam(0.02), ensemble_size=3)
    result = ens.run(random.key(4), 1000, X_NET, Y_NET, progress_bar=False)
    # member 2 diverged: it has no Laplace approximation (NaN params)
    return ens, jax.tree.map(lambda v: v.at[2].set(jnp.nan), result.params)


@pytest.mark.parametrize("structure", ["diagonal", "lowrank"])
def test_a_network_s_linearized_predictive_is_the_network_at_its_point_and_narrower(
    network_fit, structure
):
    ens, params = network_fit
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "laplace_members: members", RuntimeWarning)
        laplace, laplace_params = laplace_members(
            ens, params, X_NET, Y_NET, curvature="ggn", structure=structure, rank=3
        )
    S = 500
    with pytest.warns(RuntimeWarning, match=r"members \[2\] of 3"):
        draws = linearized_predictive(laplace, random.key(5), laplace_params, X_NET, num_samples=S)
    assert {k: v.shape for k, v in draws.items()} == {"f": (3, S, 30), "y": (3, S, 30)}
    for site in ("f", "y"):
        assert np.isfinite(draws[site][:2]).all() and np.isnan(draws[site][2]).all()
    f = np.asarray(draws["f"][:2], np.float64)
    for e in range(2):  # the linear model's mean is the network at the member's point
        point = laplace.guide._unpack_latent(laplace_params["auto_loc"][e])
        at_point = np.asarray(forward(point, X_NET), np.float64)
        np.testing.assert_array_less(np.abs(f[e].mean(0) - at_point), 5 * f[e].std(0) / np.sqrt(S))
    if structure == "lowrank":
        # the prior's variance in the directions the data do not see: pushing those
        # weight draws through the network spreads f far wider than the linear model
        with pytest.warns(RuntimeWarning, match=r"members \[2\] of 3"):
            pushed = ensemble_predictive(
                laplace, random.key(5), laplace_params, X_NET, num_samples=S, return_sites=["f"]
            )
        spread = np.asarray(pushed["f"][:2]).std(1).mean(1)
        assert (f.std(1).mean(1) < 0.5 * spread).all()
        # ... and their mean underfits, where the linear model's fits to the noise (0.1)
        rmse = np.sqrt(((f.mean(1) - np.asarray(Y_NET)) ** 2).mean(1))
        pushed_rmse = np.sqrt(
            ((np.asarray(pushed["f"][:2]).mean(1) - np.asarray(Y_NET)) ** 2).mean(1)
        )
        assert (rmse < 0.15).all() and (pushed_rmse > 2 * rmse).all()
        # with weights: the mixture, here all of member 1's draws
        with pytest.warns(RuntimeWarning, match=r"members \[2\] of 3"):
            mixed = linearized_predictive(
                laplace,
                random.key(5),
                laplace_params,
                X_NET,
                num_samples=S,
                weights=jnp.array([0.0, 1.0, 0.0]),
            )
        assert mixed["f"].shape == (3 * S, 30)
        rows = {tuple(r) for r in np.asarray(draws["f"][1]).tolist()}
        assert all(tuple(r) in rows for r in np.asarray(mixed["f"]).tolist())


def test_every_family_the_curvature_knows_is_linearized():
    assert set(NATURAL) == set(FAMILIES)


def student(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.StudentT(3.0, w * x, 0.3), obs=y)


def test_bad_input():
    x = jnp.linspace(-1.0, 1.0, 5)
    ens = EnsembleMAP(student, ensemble_size=2)
    params = ens.get_params(ens.init(random.key(0), x, 0.5 * x))
    laplace, laplace_params = laplace_members(
        ens, params, x, 0.5 * x, curvature="hessian", structure="full"
    )
    with pytest.raises(ValueError, match=r"observed sites 'y' \(StudentT\).*Normal, Bernoulli"):
        linearized_predictive(laplace, random.key(1), laplace_params, x)
    # the latent site alone needs no linearization of y
    w = linearized_predictive(laplace, random.key(1), laplace_params, x, return_sites=["w"])
    assert w["w"].shape == (2, 100)
    with pytest.raises(ValueError, match=r"return_sites \['v'\] are not"):
        linearized_predictive(laplace, random.key(1), laplace_params, x, return_sites=["v"])
    # not Laplace members: the points' ensemble, or params that are not laplace_members'
    with pytest.raises(
        ValueError, match="needs Laplace members: this ensemble's guide is AutoDelta"
    ):
        linearized_predictive(ens, random.key(1), params, x)
    with pytest.raises(ValueError, match="these are Laplace members"):
        linearized_predictive(laplace, random.key(1), params, x)
    copied = jax.tree.map(jnp.copy, laplace_params)
    with pytest.raises(ValueError, match="not the laplace_params that laplace_members returned"):
        linearized_predictive(laplace, random.key(1), copied, x)
