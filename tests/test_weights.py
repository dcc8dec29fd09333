"""Importance and stacking weights, weights flowing into draws / export / MCMC starts,
excluded members, and ensemble_summary."""

import pathlib
import sys
import warnings

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    ImportanceWeights,
    ensemble_predictive,
    ensemble_summary,
    importance_weights,
    mcmc_init_params,
    per_member,
    sample_posterior,
    stacking_weights,
    to_arviz,
)


def two_modes():
    mix = dist.MixtureSameFamily(
        dist.Categorical(jnp.array([0.3, 0.7])), dist.Normal(jnp.array([-3.0, 3.0]), 1.0)
    )
    numpyro.sample("x", mix)


def normal_mean(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y = random.normal(random.key(0), (40,)) + 1.0
# Posterior of mu: Normal(sum(y) / (n + 1/100), 1 / sqrt(n + 1/100)).
POST_PREC = Y.shape[0] + 1e-2
POST_MEAN, POST_SD = float(Y.sum() / POST_PREC), float(POST_PREC**-0.5)


def svi_at(model, locs, scales, *args):
    """An AutoNormal ensemble whose members sit at the given locs / scales (no fitting)."""
    name = "x" if model is two_modes else "mu"
    svi = EnsembleSVI(model, AutoNormal(model), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=len(locs))
    init = {f"{name}_auto_loc": jnp.asarray(locs), f"{name}_auto_scale": jnp.asarray(scales)}
    state = svi.init(random.key(0), *args, init_params=init)
    return svi, svi.get_params(state)


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


def test_stacking_downweights_a_bad_member_svi_and_map():
    locs = [POST_MEAN - 0.1, POST_MEAN, POST_MEAN + 0.1, POST_MEAN + 3.0]
    svi, params = svi_at(normal_mean, locs, [POST_SD] * 4, Y)
    s = stacking_weights(svi, random.key(1), params, Y, num_samples=200)
    assert s.member_weights.shape == (4,) and s.pointwise.shape == (4, Y.shape[0])
    assert float(s.member_weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert s.member_weights[3] < 0.05
    assert s.elpd_loo > s.elpd_loo_equal
    iw = importance_weights(svi, random.key(1), params, Y, num_samples=200)
    assert iw.member_weights[3] < 1e-3

    ens = EnsembleMAP(normal_mean, optax.adam(0.01), ensemble_size=4)
    map_params = ens.get_params(ens.init(random.key(0), Y, init_params={"mu": jnp.asarray(locs)}))
    s = stacking_weights(ens, random.key(1), map_params, Y)
    assert s.member_weights[3] < 0.05 and s.elpd_loo > s.elpd_loo_equal
    with pytest.raises(ValueError, match="point mass.*stacking_weights"):
        importance_weights(ens, random.key(1), map_params, Y)


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


def test_ensemble_summary_flags_modes_divergence_and_weights(modes, capsys):
    svi, params = modes
    params = dict(params)
    params["x_auto_scale"] = params["x_auto_scale"].at[0].set(jnp.nan)
    with pytest.warns(RuntimeWarning):
        summary = ensemble_summary(svi, random.key(1), params, num_samples=200)
    assert summary.diverged.tolist() == [True] + [False] * 7
    assert summary.weight[0] == 0 and summary.weight_kind == "importance"
    assert summary.mode[0] == -1
    assert len(set(summary.mode[1:4])) == 1 and len(set(summary.mode[4:7])) == 1
    assert summary.num_modes == 3  # -3, +3, and the far member
    assert summary.nearest[7] > 5
    assert summary.pareto_k < 0.7
    print(summary)
    out = capsys.readouterr().out
    assert "verdict:" in out and "3 distinct modes" in out and "members [0] diverged" in out


def test_ensemble_summary_of_a_map_run_uses_stacking():
    ens = EnsembleMAP(normal_mean, optax.adam(0.1), ensemble_size=3)
    result = ens.run(random.key(0), 300, Y, progress_bar=False)
    summary = ensemble_summary(ens, random.key(1), result, Y)
    assert summary.weight_kind == "stacking" and summary.num_modes == 1
    np.testing.assert_allclose(summary.final_loss, np.asarray(result.losses[:, -1]))
    assert np.isnan(summary.r_hat) and "agree" in summary.verdict


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
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
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


def test_log_weights_beyond_float32s_range_get_weight_zero_not_nan():
    # float64 log densities can pass float32's largest value (3.4e38), e.g. -1e71 at the
    # draws of an explosive ARMA member: the float32 dither had an infinite spacing there
    # (np.spacing(float32 max) = inf) and turned every weight into NaN.
    from numpyro_ensemble.weights import psis

    good = np.random.default_rng(0).normal(size=90)
    huge = [-1e39] * 8 + [-float(np.finfo(np.float32).max), -1e71]
    smoothed, k = psis(np.concatenate([good, huge]))
    assert np.isfinite(smoothed).all() and np.isfinite(k)
    assert np.exp(smoothed[90:]).sum() == 0
    np.testing.assert_allclose(np.exp(smoothed).sum(), 1.0, rtol=1e-12)


def test_ensemble_summary_gives_a_verdict_when_no_draw_can_be_weighted():
    # Both members sit where the model's log density is -inf (|mu| > 3) at every draw:
    # importance_weights raises, and ensemble_summary says so in its verdict instead.
    def bounded():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.factor("bound", jnp.where(jnp.abs(mu) < 3, 0.0, -jnp.inf))

    svi, params = svi_at(bounded, [10.0, 12.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="no draw has a finite log density"):
        importance_weights(svi, random.key(1), params, num_samples=50)
    summary = ensemble_summary(svi, random.key(1), params, num_samples=50)
    assert summary.weight_kind == "importance" and np.isnan(summary.weight).all()
    assert "no importance weights (no draw has a finite log density" in summary.verdict


def test_too_few_draws_for_a_pareto_fit_give_raw_weights_and_infinite_k():
    # 8 draws leave a tail of 1-2 (ArviZ 1.x raises, 0.x returns k = inf): the weights come
    # back normalised and unsmoothed, k = inf, and the verdict machinery sees "unreliable".
    from numpyro_ensemble.weights import psis

    log_weights = np.random.default_rng(1).normal(size=(2, 8)) * 3
    smoothed, k = psis(log_weights)
    assert np.all(k == np.inf)
    np.testing.assert_allclose(np.exp(smoothed).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.diff(smoothed, axis=-1), np.diff(log_weights, axis=-1), atol=1e-5)
    # 100 draws are enough for a tail fit in both ArviZ versions: k is finite.
    assert np.isfinite(psis(np.random.default_rng(2).normal(size=100))[1])
