"""laplace_members' curvatures and structures: equal to NumPyro's Laplace where they
should be, low-rank and diagonal equal to the dense GGN where they can be, no D x D
array at a dimension where it would not fit, and bad choices caught before compiling."""

import warnings

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import seed
from numpyro.infer.autoguide import AutoLaplaceApproximation
import optax
import pytest

from numpyro_ensemble import (
    AutoLowRankPrecisionNormal,
    EnsembleMAP,
    laplace_exclusions,
    laplace_members,
)

N, D = 4, 12  # fewer observations than coefficients: the likelihood GGN has rank 4
XW = random.normal(random.key(0), (N, D))
YW = XW @ jnp.linspace(-1.0, 1.0, D) + 0.1 * random.normal(random.key(1), (N,))


def wide_regression(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.5).expand([x.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.LogNormal(-1.0, 0.3))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(jnp.tanh(x @ w), sigma), obs=y)


@pytest.fixture(scope="module")
def fitted():
    ens = EnsembleMAP(wide_regression, optax.adam(0.02), ensemble_size=3)
    result = ens.run(random.key(2), 300, XW, YW, progress_bar=False)
    return ens, result.params


def _precision(structure, params):
    if structure == "full":
        tril = np.asarray(params["auto_scale_tril"], np.float64)
        return np.linalg.inv(tril @ np.swapaxes(tril, -1, -2))
    if structure == "diagonal":
        return np.asarray(params["auto_scale"], np.float64) ** -2.0
    factor = np.asarray(params["auto_prec_factor"], np.float64)
    diag = np.asarray(params["auto_prec_diag"], np.float64)
    return factor @ np.swapaxes(factor, -1, -2) + diag[:, :, None] * np.eye(diag.shape[1])


def test_member_e_equals_numpyros_laplace_at_its_point(fitted):
    ens, params = fitted
    laplace, lp = laplace_members(ens, params, XW, YW, curvature="hessian", structure="full")
    assert type(laplace.guide).__name__ == "AutoMultivariateNormal"
    guide = AutoLaplaceApproximation(wide_regression)
    seed(guide, random.key(0))(XW, YW)
    for e in range(3):
        transform = guide.get_transform({"auto_loc": lp["auto_loc"][e]})
        np.testing.assert_allclose(lp["auto_scale_tril"][e], transform.scale_tril, rtol=2e-3, atol=1e-5)


def test_lowrank_and_diagonal_equal_the_dense_ggn_where_they_can(fitted):
    ens, params = fitted
    full_twin, full = laplace_members(ens, params, XW, YW, curvature="ggn", structure="full")
    # the point: the full structure searched the unconstrained mode (sigma is positive)
    loc = full["auto_loc"]
    dense = _precision("full", full)
    # the likelihood GGN has rank N=4 in w (and 1 in sigma's coordinate): rank 5 is exact
    low_twin, low = laplace_members(ens, params, XW, YW, curvature="ggn", structure="lowrank", rank=5)
    assert isinstance(low_twin.guide, AutoLowRankPrecisionNormal) and low["auto_prec_factor"].shape == (3, D + 1, 5)
    np.testing.assert_allclose(low["auto_loc"], loc, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_precision("lowrank", low), dense, rtol=2e-3, atol=2e-3 * np.abs(dense).max())
    _, diag = laplace_members(ens, params, XW, YW, curvature="ggn", structure="diagonal")
    np.testing.assert_allclose(
        _precision("diagonal", diag), np.diagonal(dense, axis1=1, axis2=2), rtol=2e-3
    )
    assert not laplace_exclusions(low_twin) and not laplace_exclusions(full_twin)


def wide_linear(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Normal(x @ w, 0.5).to_event(1), obs=y)


def test_lowrank_at_a_dimension_whose_dense_curvature_would_not_fit():
    dim = 300_000  # D x D float32: 360 GB
    x = random.normal(random.key(3), (3, dim)) / np.sqrt(dim)
    y = jnp.array([1.0, -1.0, 0.5])
    ens = EnsembleMAP(wide_linear, optax.adam(0.01), ensemble_size=2)
    params = ens.run(random.key(4), 5, x, y, progress_bar=False).params
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nobody excluded
        laplace, lp = laplace_members(ens, params, x, y, rank=3)  # auto: GGN, low-rank
    assert isinstance(laplace.guide, AutoLowRankPrecisionNormal)
    # the likelihood's GGN is X^T X / 0.25: its top eigenvalues, and the prior's 1
    want = np.sort(np.linalg.eigvalsh(np.asarray(x @ x.T, np.float64)))[::-1] / 0.25
    got = np.linalg.norm(np.asarray(lp["auto_prec_factor"], np.float64), axis=1) ** 2
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-3)
    np.testing.assert_allclose(lp["auto_prec_diag"], 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"curvature": "fisher"}, "curvature must be one of"),
        ({"structure": "kfac"}, "structure must be one of"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"curvature": "hessian", "structure": "lowrank"}, "needs curvature='ggn'"),
        ({"curvature": "ggn", "structure": "lowrank", "rank": D + 1}, r"rank must be below the number of latent values \(13\)"),
    ],
)
def test_bad_choices_are_caught_before_compiling(fitted, kwargs, match):
    ens, params = fitted
    with pytest.raises(ValueError, match=match):
        laplace_members(ens, params, XW, YW, **kwargs)


def exponential_model(y=None):
    rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
    numpyro.sample("y", dist.Exponential(rate).expand([3]).to_event(1), obs=y)


def test_ggn_of_an_unsupported_likelihood_names_the_site_and_auto_takes_the_hessian():
    ens = EnsembleMAP(exponential_model, optax.adam(0.05), ensemble_size=2)
    y = jnp.array([0.5, 1.0, 2.0])
    params = ens.run(random.key(5), 100, y, progress_bar=False).params
    with pytest.raises(ValueError, match=r"observed sites 'y' \(Exponential\) are not"):
        laplace_members(ens, params, y, curvature="ggn")
    laplace, lp = laplace_members(ens, params, y)  # auto: the Hessian, dense
    # Gamma(2, 1) prior, Exponential likelihood: the posterior Gamma(5, 1 + 3.5) in log
    # rate has its mode at log(5 / 4.5) and curvature 5
    np.testing.assert_allclose(lp["auto_loc"], np.log(5 / 4.5), atol=1e-3)  # float32 L-BFGS
    np.testing.assert_allclose(lp["auto_scale_tril"], 5**-0.5, rtol=1e-3)
