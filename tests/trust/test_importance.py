"""importance_weights: mode masses, the analytic posterior, NUTS on eight schools, excluded
and degenerate members, weights flowing into draws, export and MCMC starts, bad input."""

import pathlib
import sys
import warnings

import jax
from jax import random
import jax.numpy as jnp
from members_at import POST_MEAN, POST_PREC, POST_SD, Y, normal_mean, svi_at, two_modes
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import (
    EnsembleSVI,
    ImportanceWeights,
    ensemble_predictive,
    importance_weights,
    mcmc_init_params,
    per_member,
    sample_posterior,
    stacking_weights,
    to_arviz,
)


@pytest.fixture(scope="module")
def modes():
    # 4 members on the 0.3 mode, 3 on the 0.7 mode, one far from both.
    return svi_at(two_modes, [-3.0] * 4 + [3.0] * 3 + [30.0], [1.0] * 8)


def test_importance_weights_give_mode_masses_not_head_counts(modes):
    svi, params = modes
    w = importance_weights(svi, random.key(1), params, num_samples=400)
    assert isinstance(w, ImportanceWeights)
    assert w.samples["x"].shape == (8, 400) and w.log_weights.shape == (8, 400)
    member = np.asarray(w.member_weights)
    assert member.sum() == pytest.approx(1.0, abs=1e-6)
    assert member[4:7].sum() == pytest.approx(0.7, abs=0.05)  # 3 of 8 members by head count
    assert member[:4].sum() == pytest.approx(0.3, abs=0.05)
    assert member[7] < 1e-3
    assert w.pareto_k < 0.7
    assert np.exp(jax.scipy.special.logsumexp(w.log_weights)) == pytest.approx(1.0, abs=1e-5)


def test_weighted_resample_is_the_analytic_posterior():
    # Over-dispersed, shifted members: equal weights are wrong, importance weights fix it.
    locs = [POST_MEAN - 0.5 * POST_SD, POST_MEAN + 0.7 * POST_SD, POST_MEAN, POST_MEAN + 0.2 * POST_SD]
    svi, params = svi_at(normal_mean, locs, [1.5 * POST_SD] * 4, Y)
    w = importance_weights(svi, random.key(1), params, Y, num_samples=3000)
    draws = sample_posterior(svi, random.key(2), params, Y, weights=w)
    assert draws["mu"].shape == (4 * 3000,)
    assert float(draws["mu"].mean()) == pytest.approx(POST_MEAN, abs=0.05 * POST_SD)
    assert float(draws["mu"].std()) == pytest.approx(POST_SD, rel=0.05)
    plain = sample_posterior(svi, random.key(2), params, Y, num_samples=3000)
    assert float(plain["mu"].std()) > 1.3 * POST_SD  # what the weights corrected


def test_nan_member_is_excluded_and_the_rest_still_draw_and_export():
    svi = EnsembleSVI(normal_mean, AutoNormal(normal_mean), optax.adam(0.05), Trace_ELBO(),
                      ensemble_size=4)
    result = svi.run(random.key(0), 200, Y, progress_bar=False)
    params = dict(result.params)
    params["mu_auto_loc"] = params["mu_auto_loc"].at[1].set(jnp.nan)
    with pytest.warns(RuntimeWarning, match=r"members \[1\] of 4 have non-finite"):
        draws = sample_posterior(svi, random.key(1), params, Y, num_samples=5)
    ok = np.isfinite(np.asarray(draws["mu"]))
    assert ok[[0, 2, 3]].all() and not ok[1].any()
    with pytest.warns(RuntimeWarning, match=r"members \[1\]"):
        w = importance_weights(svi, random.key(1), params, Y, num_samples=50)
        s = stacking_weights(svi, random.key(1), params, Y, num_samples=50)
        predicted = ensemble_predictive(svi, random.key(2), params, Y, num_samples=5, weights=w)
        idata = to_arviz(svi, random.key(3), params, Y, num_samples=5, weights=s)
        init = mcmc_init_params(svi, random.key(4), params, Y, num_chains=3)
    assert w.member_weights[1] == 0 and s.member_weights[1] == 0
    assert np.isfinite(np.asarray(predicted["y"])).all() and predicted["y"].shape == (4 * 50, 40)
    assert list(idata["posterior"]["chain"].values) == [0, 2, 3]
    assert np.isfinite(idata["posterior"]["mu"].values).all()
    assert "member_weight" in idata["sample_stats"]
    assert np.isfinite(np.asarray(init["mu"])).all() and init["mu"].shape == (3,)
    with pytest.raises(ValueError, match="num_chains=4 is larger than the 3 usable"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mcmc_init_params(svi, random.key(4), params, Y, num_chains=4)


def test_weights_flow_into_export_and_mcmc_starts(modes):
    svi, params = modes
    w = importance_weights(svi, random.key(1), params, num_samples=50)
    idata = to_arviz(svi, random.key(2), params, weights=w)
    stats = idata["sample_stats"]
    assert stats["log_weight"].shape == (8, 50)
    np.testing.assert_allclose(stats["member_weight"].values[:, 0], np.asarray(w.member_weights))
    np.testing.assert_allclose(idata["posterior"]["x"].values, np.asarray(w.samples["x"]))
    init = mcmc_init_params(svi, random.key(3), params, num_chains=3, weights=w)
    assert (np.abs(np.asarray(init["x"])) < 10).all()  # never member 7 (at 30, w < 1e-3)
    # members drawn in proportion to their weights: all seven of weight >= 1e-3, not 7
    init = mcmc_init_params(svi, random.key(3), params, num_chains=7, weights=w)
    x = np.sort(np.asarray(init["x"]))
    assert (x[:4] < 0).all() and (x[4:] > 0).all() and x.max() < 10
    with pytest.raises(ValueError, match="num_chains=8 is larger than the 7 usable members"):
        mcmc_init_params(svi, random.key(3), params, num_chains=8, weights=w)


def test_bad_weights_and_arguments_are_clear_errors(modes):
    svi, params = modes
    draw = lambda w, **kw: sample_posterior(svi, random.key(0), params, weights=w, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"shape \(ensemble_size,\) = \(8,\)"):
        draw(jnp.ones(3) / 3)
    with pytest.raises(ValueError, match="finite and >= 0"):
        draw(jnp.array([2.0, -1.0] + [0.0] * 6))
    with pytest.raises(ValueError, match="must sum to 1"):
        draw(jnp.ones(8))
    with pytest.raises(TypeError, match="weights must be an \\(E,\\) array"):
        draw("equal")
    with pytest.raises(ValueError, match="pass resample=True"):
        draw(jnp.ones(8) / 8, resample=False)
    with pytest.raises(ValueError, match="either weights or posterior_samples"):
        ensemble_predictive(svi, random.key(0), params, weights=jnp.ones(8) / 8,
                            posterior_samples={"x": jnp.zeros((8, 2))})
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        importance_weights(svi, random.key(0), params, num_samples=0)
    with pytest.raises(ValueError, match="no observed sites"):
        stacking_weights(svi, random.key(0), params)
    with pytest.raises(ValueError, match="leading axis of size ensemble_size=8"):
        importance_weights(svi, random.key(0), {"x_auto_loc": jnp.zeros(3), "x_auto_scale": jnp.ones(3)})
    folds = per_member(jnp.zeros((4, 40)))
    svi4, params4 = svi_at(normal_mean, [0.0, 1.0, 2.0, 3.0], [1.0] * 4, Y)
    with pytest.raises(ValueError, match="per_member"):
        importance_weights(svi4, random.key(0), params4, folds)
    with pytest.raises(ValueError, match="per_member"):
        stacking_weights(svi4, random.key(0), params4, folds)


@pytest.mark.slow
def test_eight_schools_weighted_moments_are_closer_to_nuts():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples"))
    from eight_schools import SIGMA, eight_schools
    from eight_schools import Y as y8

    mcmc = MCMC(NUTS(eight_schools), num_warmup=1000, num_samples=10000, progress_bar=False)
    mcmc.run(random.key(0), SIGMA, y8)
    reference = mcmc.get_samples()
    svi = EnsembleSVI(eight_schools, AutoNormal(eight_schools), optax.adam(1e-2), Trace_ELBO(),
                      ensemble_size=8)
    result = svi.run(random.key(1), 2000, SIGMA, y8, progress_bar=False)
    w = importance_weights(svi, random.key(2), result.params, SIGMA, y8, num_samples=1000)
    weights = np.exp(np.asarray(w.log_weights, np.float64)).ravel()

    def errors(draws, p):
        total = 0.0
        for name in ("mu", "tau", "theta_raw"):
            ref = np.asarray(reference[name])
            x = np.asarray(draws[name], np.float64).reshape((-1,) + ref.shape[1:])
            mean = np.tensordot(p, x, 1)
            sd = np.sqrt(np.tensordot(p, (x - mean) ** 2, 1))
            total += np.sum(np.abs(mean - ref.mean(0)) / ref.std(0))
            total += np.sum(np.abs(sd / ref.std(0) - 1))
        return total

    equal = np.full(weights.shape, 1 / weights.size)
    assert errors(w.samples, weights) < 0.7 * errors(w.samples, equal)


def test_a_guide_equal_to_the_posterior_gets_constant_weights():
    # A constrained site: AutoNormal's density of s includes the exp transform's Jacobian,
    # so a guide equal to the LogNormal target gives every draw the same weight.
    def lognormal():
        numpyro.sample("s", dist.LogNormal(0.3, 0.7))

    svi = EnsembleSVI(lognormal, AutoNormal(lognormal), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=2)
    init = {"s_auto_loc": jnp.array([0.3, 0.3001]), "s_auto_scale": jnp.array([0.7, 0.7])}
    params = svi.get_params(svi.init(random.key(0), init_params=init))
    w = importance_weights(svi, random.key(1), params, num_samples=300)
    np.testing.assert_allclose(np.asarray(w.log_weights), np.log(1 / 600), atol=1e-3)
    np.testing.assert_allclose(np.asarray(w.member_weights), 0.5, atol=1e-3)
    assert w.ess == pytest.approx(600, rel=1e-2) and w.pareto_k < 0.5


def test_a_degenerate_member_is_left_out_of_the_mixture():
    # AutoMultivariateNormal members at over-dispersed, shifted points (no fitting), and
    # member 2 with a scale that collapsed to 0: its density is NaN at every draw, which
    # made the mixture density of every draw non-finite and broke the weights.
    from numpyro.infer.autoguide import AutoMultivariateNormal

    def normal_mean_2d(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)

    y = jnp.stack([Y, -Y], axis=1)
    post_mean = np.asarray(y.sum(0) / POST_PREC)
    svi = EnsembleSVI(normal_mean_2d, AutoMultivariateNormal(normal_mean_2d), optax.adam(0.01),
                      Trace_ELBO(), ensemble_size=4)
    shifts = jnp.array([[-0.5, 0.3], [0.6, -0.2], [0.0, 0.0], [0.2, 0.5]]) * POST_SD
    init = {"auto_loc": jnp.asarray(post_mean) + shifts,
            "auto_scale_tril": jnp.broadcast_to(1.5 * POST_SD * jnp.eye(2), (4, 2, 2))}
    params = svi.get_params(svi.init(random.key(0), y, init_params=init))
    params["auto_scale_tril"] = params["auto_scale_tril"].at[2].set(jnp.zeros((2, 2)))
    with pytest.warns(RuntimeWarning, match=r"members \[2\] of 4 have a guide density that is NaN"):
        w = importance_weights(svi, random.key(1), params, y, num_samples=3000)
    assert w.member_weights[2] == 0 and np.isfinite(np.asarray(w.member_weights)).all()
    assert w.pareto_k < 0.7
    draws = sample_posterior(svi, random.key(2), params, y, weights=w)
    np.testing.assert_allclose(np.asarray(draws["mu"].mean(0)), post_mean, atol=0.05 * POST_SD)
    np.testing.assert_allclose(np.asarray(draws["mu"].std(0)), POST_SD, rtol=0.05)
