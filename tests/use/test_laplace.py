"""Laplace members: the Laplace approximation around every member's point, used
wherever a fitted ensemble is; AutoLaplaceApproximation members; warm starts."""

import warnings

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    ensemble_predictive,
    ensemble_summary,
    importance_weights,
    laplace_exclusions,
    laplace_init_params,
    laplace_members,
    mcmc_init_params,
    sample_posterior,
    stacking_weights,
    take_member,
    to_arviz,
)
from numpyro_ensemble.use.laplace import REASONS

X = jnp.linspace(4.0, 6.0, 30)  # off-centre inputs: intercept and slope correlate at -0.99
Y = 1.0 + 0.5 * X + 0.3 * random.normal(random.key(0), (30,))
NOISE, PRIOR_SD = 0.3, 10.0


def regression(x, y=None):
    a = numpyro.sample("a", dist.Normal(0.0, PRIOR_SD))
    b = numpyro.sample("b", dist.Normal(0.0, PRIOR_SD))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x, NOISE), obs=y)


def analytic_posterior():
    design = np.stack([np.ones(30), np.asarray(X)], axis=1)
    precision = design.T @ design / NOISE**2 + np.eye(2) / PRIOR_SD**2
    covariance = np.linalg.inv(precision)
    return covariance @ design.T @ np.asarray(Y) / NOISE**2, covariance


def test_the_laplace_mixture_of_a_gaussian_posterior_is_that_posterior():
    mean, covariance = analytic_posterior()
    assert covariance[0, 1] / np.sqrt(covariance[0, 0] * covariance[1, 1]) < -0.99
    ens = EnsembleMAP(regression, ensemble_size=3)
    result = ens.run(random.key(0), 300, X, Y, progress_bar=False)
    laplace, params = laplace_members(ens, result.params, X, Y)
    assert isinstance(laplace.guide, AutoMultivariateNormal)
    assert params["auto_loc"].shape == (3, 2) and params["auto_scale_tril"].shape == (3, 2, 2)
    for e in range(3):  # the latent vector is (a, b): both unconstrained
        np.testing.assert_allclose(params["auto_loc"][e], mean, rtol=1e-3)
        L = np.asarray(params["auto_scale_tril"][e], np.float64)
        np.testing.assert_allclose(L @ L.T, covariance, rtol=2e-2)
    weights = importance_weights(laplace, random.key(1), params, X, Y, num_samples=2000)
    assert weights.pareto_k < 0.5
    np.testing.assert_allclose(weights.member_weights, 1 / 3, atol=0.05)
    draws = sample_posterior(laplace, random.key(2), params, X, Y, weights=weights)
    pooled = np.stack([draws["a"], draws["b"]], axis=1)
    sd = np.sqrt(np.diag(covariance))
    np.testing.assert_allclose(pooled.mean(0), mean, atol=0.05 * sd.max())
    np.testing.assert_allclose(pooled.std(0), sd, rtol=0.05)


def scale_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))  # a constrained site
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


SCALE_Y = 1.0 + 0.7 * random.normal(random.key(3), (25,))


def test_autolaplace_members_draw_from_their_own_laplace_approximation():
    guide = AutoLaplaceApproximation(scale_model)
    svi = EnsembleSVI(scale_model, guide, optax.lbfgs(), Trace_ELBO(), ensemble_size=3)
    result = svi.run(random.key(0), 60, SCALE_Y, progress_bar=False)
    # move member 2 off the mode, so the members' Hessians differ
    params = {**result.params, "auto_loc": result.params["auto_loc"].at[2].add(0.3)}
    laplace, laplace_params = laplace_members(svi, params, SCALE_Y)
    draws = sample_posterior(svi, random.key(1), params, SCALE_Y, num_samples=4000)
    for e in range(3):  # NumPyro's own Laplace approximation of member e
        member = take_member(params, e)
        transform = guide.get_transform(member)
        np.testing.assert_allclose(laplace_params["auto_scale_tril"][e], transform.scale_tril,
                                   rtol=1e-3, atol=1e-6)
        plain = guide.sample_posterior(random.key(5), member, sample_shape=(4000,))
        for name in ("mu", "sigma"):
            assert float(draws[name][e].std()) > 0.02  # a spread, not the point
            np.testing.assert_allclose(draws[name][e].mean(), plain[name].mean(), atol=0.01)
            np.testing.assert_allclose(draws[name][e].std(), plain[name].std(), rtol=0.06)
    assert float(jnp.abs(draws["mu"][2].mean() - draws["mu"][0].mean())) > 0.1

    # every function that draws uses them
    weights = importance_weights(svi, random.key(2), params, SCALE_Y, num_samples=200)
    assert 0.0 < float(weights.member_weights[2]) < float(weights.member_weights[0])
    assert stacking_weights(svi, random.key(2), params, SCALE_Y, num_samples=50).pointwise.shape == (3, 25)
    predicted = ensemble_predictive(svi, random.key(3), params, SCALE_Y[:4], num_samples=5,
                                    resample_observed=True)
    assert predicted["y"].shape == (3, 5, 4) and float(predicted["y"].std()) > 0
    idata = to_arviz(svi, random.key(4), params, SCALE_Y, num_samples=20)
    assert float(idata["posterior"]["mu"].std(dim="draw").min()) > 0.02
    starts = mcmc_init_params(svi, random.key(5), params, SCALE_Y, num_chains=3)
    assert len(np.unique(np.asarray(starts["mu"]))) == 3
    summary = ensemble_summary(svi, random.key(6), result._replace(params=params), SCALE_Y)
    assert summary.weight_kind == "importance" and np.isfinite(summary.r_hat)


def two_modes():
    mix = dist.MixtureSameFamily(dist.Categorical(jnp.array([0.5, 0.5])),
                                 dist.Normal(jnp.array([-3.0, 3.0]), 1.0))
    numpyro.sample("x", mix)


def test_a_member_whose_hessian_is_not_positive_definite_is_flagged_and_excluded():
    ens = EnsembleMAP(two_modes, optax.adam(0.01), ensemble_size=3)
    params = ens.get_params(ens.init(random.key(0), init_params={"x": jnp.array([-3.0, 0.0, 3.0])}))
    with pytest.warns(RuntimeWarning, match=r"members \[1\] of 3 have no Laplace approximation: "
                                            r"the curvature is not positive definite"):
        laplace, laplace_params = laplace_members(ens, params)
    assert laplace_exclusions(laplace) == {1: REASONS["indefinite"]}
    assert np.isnan(np.asarray(laplace_params["auto_loc"][1])).all()
    np.testing.assert_allclose(np.asarray(laplace_params["auto_loc"])[[0, 2], 0], [-3.0, 3.0], atol=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the excluded member, named again
        weights = importance_weights(laplace, random.key(1), laplace_params, num_samples=500)
    assert weights.member_weights[1] == 0
    np.testing.assert_allclose(np.asarray(weights.member_weights)[[0, 2]], 0.5, atol=0.05)


def half_normal_scale():
    numpyro.sample("tau", dist.HalfNormal(1.0))


def test_a_map_point_at_a_boundary_is_moved_to_the_unconstrained_mode():
    """tau ~ HalfNormal(1): the MAP (constrained density) is tau -> 0, where the
    unconstrained density of u = log tau, exp(u - exp(2u) / 2), is flat. Its mode is
    u = 0 with curvature 2: the Laplace member is N(0, 1/2), not a huge Gaussian at
    the MAP point."""
    ens = EnsembleMAP(half_normal_scale, ensemble_size=2)
    result = ens.run(random.key(0), 300, progress_bar=False)
    assert (np.asarray(ens.get_points(result.params)["tau"]) < 0.05).all()  # the MAP
    _, laplace_params = laplace_members(ens, result.params)
    np.testing.assert_allclose(np.asarray(laplace_params["auto_loc"]), 0.0, atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(laplace_params["auto_scale_tril"]), np.sqrt(0.5), rtol=1e-3
    )


@pytest.mark.filterwarnings("ignore::numpyro_ensemble.IdenticalMembersWarning")  # one mode
def test_a_variational_fit_starts_at_the_laplace_members():
    ens = EnsembleMAP(scale_model, ensemble_size=2)
    result = ens.run(random.key(0), 200, SCALE_Y, progress_bar=False)
    laplace, laplace_params = laplace_members(ens, result.params, SCALE_Y)
    svi = EnsembleSVI(scale_model, AutoMultivariateNormal(scale_model), optax.adam(1e-3),
                      Trace_ELBO(), ensemble_size=2)
    start = svi.get_params(svi.init(random.key(1), SCALE_Y, init_params=laplace_params))
    for name in ("auto_loc", "auto_scale_tril"):
        np.testing.assert_allclose(start[name], laplace_params[name], rtol=1e-5, atol=1e-7)
    fitted = svi.run(random.key(1), 100, SCALE_Y, progress_bar=False, init_params=laplace_params)
    assert np.isfinite(np.asarray(fitted.losses)).all()
    # the returned ensemble itself runs from there too
    more = laplace.run(random.key(2), 20, SCALE_Y, progress_bar=False, init_params=laplace_params)
    assert more.params["auto_scale_tril"].shape == (2, 2, 2)
    # The Laplace members are no fit of the twin's ELBO: with their points' losses the
    # summary checks the points' trend, not an ELBO Newton step ("to go" NaN); params
    # of a fit started from them are the twin's own fit.
    from numpyro_ensemble import ensemble_summary
    from numpyro_ensemble.use.fitted import is_laplace

    summary = ensemble_summary(laplace, random.key(3), result._replace(params=laplace_params),
                               SCALE_Y, num_samples=100)
    assert np.isnan(summary.to_go).all() and summary.converged.all()
    assert "not converged" not in summary.verdict
    assert is_laplace(laplace, laplace_params) and is_laplace(laplace, dict(laplace_params))
    assert not is_laplace(laplace, more.params) and not is_laplace(svi, laplace_params)


def test_the_verdict_says_not_converged_for_a_short_adam_run_and_not_for_lbfgs():
    from numpyro_ensemble import ensemble_summary as summarise

    adam = EnsembleMAP(regression, optax.adam(0.01), ensemble_size=3)
    short = adam.run(random.key(0), 300, X, Y, progress_bar=False)
    summary = summarise(adam, random.key(1), short, X, Y)
    assert summary.converged is not None and not summary.converged.any()
    assert "have not converged" in summary.verdict and "do not use their draws" in summary.verdict
    assert "distinct modes" not in summary.verdict and "trusted" not in summary.verdict
    assert (summary.loss_trend < -0.5).all()  # the loss still falls by nats per window

    lbfgs = EnsembleMAP(regression, ensemble_size=3)
    done = lbfgs.run(random.key(0), 300, X, Y, progress_bar=False)
    summary = summarise(lbfgs, random.key(1), done, X, Y)
    assert summary.converged.all() and "not converged" not in summary.verdict
    assert summary.num_modes == 1 and "agree" in summary.verdict
    assert "converged" in str(summary).splitlines()[0]


# A correlated 4-d Gaussian and a positive site: the Laplace approximation is exact in
# (x, log s), so every guide family's start is known in closed form.
MVN_MEAN = np.array([1.0, -2.0, 0.5, 3.0])
MVN_COV = 0.8 ** np.abs(np.subtract.outer(np.arange(4), np.arange(4))) * np.outer(
    [1.0, 2.0, 0.5, 1.5], [1.0, 2.0, 0.5, 1.5]
)


def gaussian_and_scale():
    numpyro.sample("x", dist.MultivariateNormal(jnp.asarray(MVN_MEAN), jnp.asarray(MVN_COV)))
    numpyro.sample("s", dist.LogNormal(0.2, 0.4))


@pytest.mark.filterwarnings("ignore::numpyro_ensemble.IdenticalMembersWarning")  # one mode
def test_laplace_init_params_start_each_guide_family_at_its_closest_gaussian():
    ens = EnsembleMAP(gaussian_and_scale, ensemble_size=2)
    laplace, laplace_params = laplace_members(
        ens, ens.run(random.key(0), 100, progress_bar=False).params
    )
    covariance = np.zeros((5, 5))  # the latent vector is (x, log s)
    covariance[:4, :4], covariance[4, 4] = MVN_COV, 0.4**2
    mean = np.append(MVN_MEAN, 0.2)
    mean_field_sd = 1 / np.sqrt(np.diag(np.linalg.inv(covariance)))
    assert (mean_field_sd < np.sqrt(np.diag(covariance)) - 0.1).any()  # a different answer

    def start(guide):
        svi = EnsembleSVI(gaussian_and_scale, guide, optax.adam(1e-3), Trace_ELBO(),
                          ensemble_size=2)
        init = laplace_init_params(laplace, laplace_params, guide)
        return svi.get_params(svi.init(random.key(1), init_params=init))

    normal = start(AutoNormal(gaussian_and_scale))
    np.testing.assert_allclose(normal["x_auto_loc"], np.tile(MVN_MEAN, (2, 1)), rtol=1e-3)
    np.testing.assert_allclose(normal["s_auto_loc"], 0.2, rtol=1e-3)
    np.testing.assert_allclose(normal["x_auto_scale"][1], mean_field_sd[:4], rtol=1e-3)
    np.testing.assert_allclose(normal["s_auto_scale"], 0.4, rtol=1e-3)

    diagonal = start(AutoDiagonalNormal(gaussian_and_scale, prefix="diag"))
    np.testing.assert_allclose(diagonal["diag_loc"][0], mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(diagonal["diag_scale"][0], mean_field_sd, rtol=1e-3)

    def low_rank_covariance(params, e=0):
        scale = np.asarray(params["auto_scale"][e], np.float64)
        factor = np.asarray(params["auto_cov_factor"][e], np.float64) * scale[:, None]
        return factor @ factor.T + np.diag(scale**2)

    full = start(AutoLowRankMultivariateNormal(gaussian_and_scale, rank=5))
    np.testing.assert_allclose(low_rank_covariance(full), covariance, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(full["auto_loc"][1], mean, rtol=1e-3, atol=1e-4)

    def eigenvalues(c):  # of c / (sd sd^T), sd the posterior's, descending
        sd = np.sqrt(np.diag(covariance))
        return np.linalg.eigvalsh(c / np.outer(sd, sd))[::-1]

    rank2 = start(AutoLowRankMultivariateNormal(gaussian_and_scale, rank=2))
    assert rank2["auto_cov_factor"].shape == (2, 5, 2)
    np.testing.assert_allclose(
        eigenvalues(low_rank_covariance(rank2))[:2], eigenvalues(covariance)[:2], rtol=1e-3
    )

    mvn = start(AutoMultivariateNormal(gaussian_and_scale))
    for name in ("auto_loc", "auto_scale_tril"):
        np.testing.assert_allclose(mvn[name], laplace_params[name], rtol=1e-5, atol=1e-7)

    with pytest.raises(TypeError, match=r"laplace must be the ensemble laplace_members\(..., structure=.full.\) returned"):
        laplace_init_params(ens, laplace_params, AutoNormal(gaussian_and_scale))
    with pytest.raises(ValueError, match="guide is of another model"):
        laplace_init_params(laplace, laplace_params, AutoNormal(regression))
    with pytest.raises(TypeError, match="guide must be an AutoNormal"):
        laplace_init_params(laplace, laplace_params, AutoLaplaceApproximation(gaussian_and_scale))


def test_to_go_is_how_far_the_loss_is_above_its_optimum():
    # Members whose loss no longer moves (flat losses) but sit 0, 1 and 2 posterior sds
    # from the optimum along the ridge of the -0.99-correlated posterior: a Newton step
    # would lower the loss by delta^2 / 2 (exact for this quadratic loss), and the
    # summary must not call the far ones converged.
    from numpyro.infer.svi import SVIRunResult

    mean, covariance = analytic_posterior()
    eigenvalues, vectors = np.linalg.eigh(covariance)
    ridge = vectors[:, -1] * np.sqrt(eigenvalues[-1])  # one sd along the long axis
    points = np.stack([mean, mean + ridge, mean - 2 * ridge]).astype(np.float32)
    flat = jnp.zeros((3, 50))
    ens = EnsembleMAP(regression, optax.adam(1e-3), ensemble_size=3)
    state = ens.init(random.key(0), X, Y, init_params={"a": points[:, 0], "b": points[:, 1]})
    summary = ensemble_summary(ens, random.key(1), SVIRunResult(ens.get_params(state), state, flat), X, Y)
    np.testing.assert_allclose(summary.to_go, [0.0, 0.5, 2.0], atol=0.02)
    assert summary.converged.tolist() == [True, False, False]
    assert "members [1, 2] have not converged" in summary.verdict

    # Mean-field members: at the variational optimum (loc the mean, scale 1/sqrt(diag P))
    # the noise-corrected estimate is within its noise; 2 sds off in loc it is 2 nats.
    from numpyro.infer.autoguide import AutoNormal as Normal

    svi = EnsembleSVI(regression, Normal(regression), optax.adam(1e-3), Trace_ELBO(),
                      ensemble_size=2)
    scale = 1 / np.sqrt(np.diag(np.linalg.inv(covariance)))
    locs = np.stack([mean, mean - 2 * ridge]).astype(np.float32)
    init = {"a_auto_loc": locs[:, 0], "b_auto_loc": locs[:, 1],
            "a_auto_scale": np.full(2, scale[0], np.float32),
            "b_auto_scale": np.full(2, scale[1], np.float32)}
    state = svi.init(random.key(0), X, Y, init_params=init)
    summary = ensemble_summary(svi, random.key(1), SVIRunResult(svi.get_params(state), state, flat[:2]), X, Y)
    assert summary.converged.tolist() == [True, False]
    assert abs(summary.to_go[0]) < 0.05
    np.testing.assert_allclose(summary.to_go[1], 2.0, rtol=0.25)


def test_autolaplace_predictions_at_new_inputs_without_the_data_first():
    """The first call after the fit predicts at new inputs without y: the Laplace twin
    takes the fitted guide's layout (y stays observed, not a latent of the twin)."""
    svi = EnsembleSVI(regression, AutoLaplaceApproximation(regression), optax.adam(0.05),
                      Trace_ELBO(), ensemble_size=2)
    result = svi.run(random.key(0), 300, X, Y, progress_bar=False)
    x_new = jnp.array([4.0, 5.0, 6.0])
    y_new = ensemble_predictive(svi, random.key(1), result.params, x_new, num_samples=5)["y"]
    assert y_new.shape == (2, 5, 3) and np.isfinite(np.asarray(y_new)).all()
    # the predictive mean follows the fitted line a + b x (intercept and slope near 1, 0.5)
    np.testing.assert_allclose(np.asarray(y_new).mean(axis=(0, 1)), 1.0 + 0.5 * x_new, atol=0.6)
