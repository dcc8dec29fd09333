"""When no member is usable (no Laplace approximation at any point, or every member
diverged): importance weights with a verdict, errors that quote it, and a summary that
says why, instead of an exception; and, on centred eight schools (where MAP points put
tau at 0), that what the verdict points to works there."""

import contextlib
import re
import warnings

import jax
from jax import random
import jax.numpy as jnp
from members_at import svi_at
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    ensemble_predictive,
    ensemble_summary,
    importance_weights,
    laplace_members,
    mcmc_init_params,
    nuts_warm_start,
    sample_posterior,
    to_arviz,
)
from numpyro_ensemble.engine.health import finite_members
from numpyro_ensemble.trust.importance import UnusableWeights
from numpyro_ensemble.use.fitted import laplace_exclusions, mark_laplace

SADDLE = "the curvature is not positive definite at its point (a saddle or a flat direction)"
DIVERGED = "its point is not finite (the member diverged)"


@contextlib.contextmanager
def no_numpy_warnings():
    """NumPy's floating-point RuntimeWarnings (overflow, invalid value, divide by zero)
    become errors; the package's own warnings are left alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "error",
            message=r".*(overflow|invalid value|divide by zero)",
            category=RuntimeWarning,
        )
        yield


def normal_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


Y = 1.0 + 2.0 * random.normal(random.key(0), (20,))


@pytest.fixture(scope="module")
def no_laplace():
    """Laplace members of a MAP ensemble, then every member's Laplace params set to NaN
    and marked excluded, members 0 and 3 for one reason, 1 for another, 2 for none."""
    ens = EnsembleMAP(normal_model, ensemble_size=4)
    result = ens.run(random.key(0), 100, Y, progress_bar=False)
    laplace, params = laplace_members(ens, result.params, Y)
    assert finite_members(params).all()  # what the test then takes away
    nan = jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), params)
    mark_laplace(laplace, nan["auto_loc"], excluded={0: SADDLE, 1: DIVERGED, 3: SADDLE})
    return ens, result, laplace, nan


def test_no_laplace_approximation_gives_weights_with_a_verdict(no_laplace):
    _, _, laplace, nan = no_laplace
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not even the package's own
        w = importance_weights(laplace, random.key(7), nan, Y, num_samples=50)
    assert np.isnan(np.asarray(w.member_weights)).all() and w.member_weights.shape == (4,)
    assert np.isneginf(np.asarray(w.log_weights)).all() and w.log_weights.shape == (4, 50)
    assert w.pareto_k == np.inf and w.ess == 0.0
    assert {k: v.shape for k, v in w.samples.items()} == {"mu": (4, 50), "sigma": (4, 50)}
    assert all(np.isnan(np.asarray(v)).all() for v in w.samples.values())
    assert w.verdict.startswith(
        "no Laplace approximation exists at these points, so there is nothing to weight or "
        f"draw (members [0, 3]: {SADDLE}; members [1]: {DIVERGED}; members [2]: its Laplace "
        "params are not finite (no Laplace approximation at its point)); what works instead: "
    )
    for alternative in (
        "EnsembleSVI(model, AutoNormal(model)",
        "nuts_warm_start",
        "MCMC(NUTS(model))",
        "mcmc_init_params",
    ):
        assert alternative in w.verdict
    assert "check the data" not in w.verdict


def test_functions_given_such_weights_raise_quoting_the_verdict(no_laplace):
    ens, result, laplace, nan = no_laplace
    w = importance_weights(laplace, random.key(7), nan, Y, num_samples=50)
    quoted = "weights: these importance weights are unusable: " + re.escape(w.verdict)
    with pytest.raises(ValueError, match=quoted):
        sample_posterior(laplace, random.key(1), nan, Y, weights=w)
    with pytest.raises(ValueError, match=quoted):
        ensemble_predictive(laplace, random.key(1), nan, Y, weights=w)
    with pytest.raises(ValueError, match=quoted):
        to_arviz(laplace, random.key(1), nan, Y, weights=w)
    with pytest.raises(ValueError, match=quoted):
        mcmc_init_params(laplace, random.key(1), nan, Y, num_chains=2, weights=w)


def test_ensemble_summary_says_no_laplace_approximation_exists_and_why(no_laplace, capsys):
    _, result, laplace, nan = no_laplace
    w = importance_weights(laplace, random.key(7), nan, Y, num_samples=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        given = ensemble_summary(
            laplace, random.key(2), result._replace(params=nan), Y, weights=w, num_samples=50
        )
        computed = ensemble_summary(
            laplace, random.key(2), result._replace(params=nan), Y, num_samples=50
        )
        print(given)
    for summary in (given, computed):
        assert summary.verdict == w.verdict
        assert summary.weight_kind == "importance" and summary.pareto_k == np.inf
        assert np.isnan(summary.weight).all() and np.isnan(summary.nearest).all()
        assert summary.mode.tolist() == [-1] * 4 and summary.num_modes == 0
        assert summary.diverged.all() and np.isnan(summary.r_hat)
        # the points' run is still shown: its losses, and that it converged
        np.testing.assert_allclose(summary.final_loss, np.asarray(result.losses[:, -1]))
        assert summary.converged.all()
    out = capsys.readouterr().out
    assert "verdict: no Laplace approximation exists at these points" in out
    assert f"members [0, 3]: {SADDLE}" in out


def test_members_partly_without_laplace_are_named_with_their_reasons():
    ens = EnsembleMAP(normal_model, ensemble_size=4)  # its own Laplace twin, marked anew
    result = ens.run(random.key(0), 100, Y, progress_bar=False)
    laplace, params = laplace_members(ens, result.params, Y)
    params = dict(params)
    params["auto_loc"] = params["auto_loc"].at[1].set(jnp.nan)
    mark_laplace(laplace, params["auto_loc"], excluded={1: SADDLE})
    with pytest.warns(RuntimeWarning, match=r"members \[1\]"), no_numpy_warnings():
        w = importance_weights(laplace, random.key(7), params, Y, num_samples=200)
        summary = ensemble_summary(
            laplace, random.key(2), result._replace(params=params), Y, weights=w
        )
    assert w.verdict == "" and np.asarray(w.member_weights)[1] == 0.0
    assert (
        f"members [1] have no Laplace approximation and are excluded (members [1]: {SADDLE})"
        in summary.verdict
    )
    assert "diverged" not in summary.verdict


def test_an_ensemble_whose_members_all_diverged_gives_a_verdict_too():
    svi, params = svi_at(normal_model_1d, [0.0, 1.0], [1.0, 1.0], Y)
    params = {**params, "mu_auto_loc": jnp.full(2, jnp.nan)}
    with no_numpy_warnings():
        w = importance_weights(svi, random.key(1), params, Y, num_samples=30)
        summary = ensemble_summary(svi, random.key(1), params, Y, num_samples=30)
    assert w.verdict == (
        "no member is usable, so there is nothing to weight or draw (members [0, 1]: its "
        "params are not finite (the member diverged)); refit with stable_update=True or a "
        "smaller step size."
    )
    assert summary.verdict == w.verdict and summary.converged is None


def normal_model_1d(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 2.0), obs=y)


def test_no_draw_with_a_finite_density_names_the_members_and_why():
    # Members 0 and 1 sit where the model's density is 0 (|mu| > 3), member 2 diverged.
    def bounded():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.factor("bound", jnp.where(jnp.abs(mu) < 3, 0.0, -jnp.inf))

    svi, params = svi_at(bounded, [10.0, 12.0, 11.0], [0.5, 0.5, 0.5])
    params = {**params, "mu_auto_loc": params["mu_auto_loc"].at[2].set(jnp.nan)}
    with pytest.raises(UnusableWeights) as error, pytest.warns(RuntimeWarning, match=r"\[2\]"):
        importance_weights(svi, random.key(1), params, num_samples=50)
    assert str(error.value) == (
        "importance_weights: no draw has a finite log density under the model: members "
        "[0, 1]: the model's log density is -inf at every one of its draws (its guide puts "
        "its mass where the model has none: outside a support, or a -inf factor); members "
        "[2]: its params are not finite (the member diverged); check the guides' locations "
        "and scales against the model's supports, or weight the members by their "
        "predictions (stacking_weights)."
    )


# posteriordb's eight_schools-eight_schools_centered: its MAP points put tau at 0.
SIGMA8 = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
Y8 = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])


def centred_eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


@pytest.fixture(scope="module")
def eight_schools_map():
    ens = EnsembleMAP(centred_eight_schools, ensemble_size=8)
    result = ens.run(random.PRNGKey(0), 2000, SIGMA8, Y8, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # members without a Laplace approximation
        laplace, params = laplace_members(ens, result.params, SIGMA8, Y8)
    return ens, result, laplace, params


def test_centred_eight_schools_recipe_ends_in_a_verdict(eight_schools_map):
    ens, result, laplace, params = eight_schools_map
    assert float(ens.get_points(result.params)["tau"].max()) < 1e-3  # the points' scale is 0
    usable = finite_members(params)
    with no_numpy_warnings(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-finite params", category=RuntimeWarning)
        w = importance_weights(laplace, random.PRNGKey(7), params, SIGMA8, Y8, num_samples=200)
        summary = ensemble_summary(
            laplace,
            random.PRNGKey(8),
            result._replace(params=params),
            SIGMA8,
            Y8,
            weights=w,
            num_samples=200,
        )
    reasons = laplace_exclusions(laplace)
    if not usable.any():
        assert w.verdict.startswith("no Laplace approximation exists at these points")
        assert summary.verdict == w.verdict
        assert all(why in w.verdict for why in reasons.values())
        with pytest.raises(ValueError, match=re.escape(w.verdict)):
            sample_posterior(laplace, random.PRNGKey(9), params, SIGMA8, Y8, weights=w)
    else:  # some members have one: excluded ones named, and untrustworthy weights said so
        assert w.verdict == ""
        if not usable.all():
            assert "have no Laplace approximation and are excluded" in summary.verdict
            assert all(reasons[e] in summary.verdict for e in reasons)
        if w.pareto_k >= 0.7:
            assert "importance weights are unreliable" in summary.verdict


@pytest.mark.slow
def test_what_the_verdict_points_to_works_on_centred_eight_schools():
    # A variational fit has a density everywhere: finite losses, usable importance
    # weights, and NUTS warm-started from it leaves tau = 0.
    svi = EnsembleSVI(
        centred_eight_schools,
        AutoNormal(centred_eight_schools),
        numpyro.optim.Adam(0.01),
        Trace_ELBO(),
        ensemble_size=4,
    )
    result = svi.run(random.PRNGKey(3), 500, SIGMA8, Y8, progress_bar=False)
    assert np.isfinite(np.asarray(result.losses)).all()
    w = importance_weights(svi, random.PRNGKey(4), result.params, SIGMA8, Y8, num_samples=200)
    assert w.verdict == "" and np.isfinite(w.pareto_k)
    assert float(np.sum(w.member_weights)) == pytest.approx(1.0, abs=1e-6)
    warm = nuts_warm_start(
        svi, random.PRNGKey(5), result.params, SIGMA8, Y8, num_chains=2, weights=w
    )
    run = warm.run(
        centred_eight_schools,
        random.PRNGKey(6),
        SIGMA8,
        Y8,
        num_samples=100,
        num_warmup=100,
        chain_method="vectorized",
        progress_bar=False,
    )
    tau = np.asarray(run.mcmc.get_samples()["tau"])
    assert tau.shape == (200,) and np.isfinite(tau).all() and tau.mean() > 0.5
    # NUTS from its default start
    mcmc = MCMC(
        NUTS(centred_eight_schools),
        num_warmup=100,
        num_samples=100,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(random.PRNGKey(2), SIGMA8, Y8)
    tau = np.asarray(mcmc.get_samples()["tau"])
    assert np.isfinite(tau).all() and tau.mean() > 0.5


def test_nuts_started_at_the_map_points_of_centred_eight_schools_does_not_move(
    eight_schools_map,
):
    # What the verdict warns of: at tau = 0 (log tau about -15) every proposal is
    # rejected, so the chains keep their starts through warm-up and sampling.
    ens, result, _, _ = eight_schools_map
    init = mcmc_init_params(ens, random.PRNGKey(1), result.params, SIGMA8, Y8, num_chains=2)
    assert (np.asarray(init["tau"]) < -10).all()
    mcmc = MCMC(
        NUTS(centred_eight_schools),
        num_warmup=100,
        num_samples=100,
        num_chains=2,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(random.PRNGKey(2), SIGMA8, Y8, init_params=init)
    log_tau = np.log(np.asarray(mcmc.get_samples(group_by_chain=True)["tau"], np.float64))
    assert np.isfinite(log_tau).all()
    np.testing.assert_allclose(
        log_tau, np.broadcast_to(np.asarray(init["tau"])[:, None], log_tau.shape), atol=1e-3
    )
