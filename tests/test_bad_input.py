"""Bad input found by users: each a clear error naming the argument, before compiling."""

import re

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoNormal
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    ensemble_map,
    ensemble_predict,
    sample_posterior,
)


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def other(y):
    nu = numpyro.sample("nu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(nu, 1.0), obs=y)


Y = jnp.array([0.5, 1.0, 1.5])


def make(E=3, guide=None):
    return EnsembleSVI(model, guide or AutoNormal(model), optax.adam(0.01), Trace_ELBO(),
                       ensemble_size=E)


def test_guide_and_loss_must_be_instances():
    with pytest.raises(TypeError, match="guide must be an instance, e.g. AutoNormal\\(model\\), got the class AutoNormal"):
        EnsembleSVI(model, AutoNormal, optax.adam(0.01), Trace_ELBO(), ensemble_size=2)
    with pytest.raises(TypeError, match="loss must be an instance, e.g. Trace_ELBO\\(\\), got the class Trace_ELBO"):
        EnsembleSVI(model, AutoNormal(model), optax.adam(0.01), Trace_ELBO, ensemble_size=2)
    with pytest.raises(TypeError, match="loss must be an object like Trace_ELBO\\(\\), got 'elbo'"):
        EnsembleSVI(model, AutoNormal(model), optax.adam(0.01), "elbo", ensemble_size=2)
    with pytest.raises(TypeError, match="init_loc_fn must be an init strategy"):
        EnsembleMAP(model, optax.adam(0.01), ensemble_size=2, init_loc_fn="median")


def test_run_result_or_state_where_params_are_expected():
    svi = make()
    result = svi.run(random.key(0), 5, Y, progress_bar=False)
    with pytest.raises(TypeError, match="got a whole SVIRunResult: pass result.params"):
        sample_posterior(svi, random.key(1), result, Y)
    with pytest.raises(TypeError, match="got an SVIState: pass ensemble.get_params"):
        sample_posterior(svi, random.key(1), result.state, Y)
    with pytest.raises(TypeError, match="got a whole SVIRunResult"):
        ensemble_predict(result, lambda p, x: x)
    with pytest.raises(TypeError, match="predict_fn must be a callable"):
        ensemble_predict(result.params, "mean", Y)


def test_points_of_another_ensemble_size():
    ens = EnsembleMAP(model, optax.adam(0.01), ensemble_size=3)
    params = ens.run(random.key(0), 5, Y, progress_bar=False).params
    bigger = EnsembleMAP(model, optax.adam(0.01), ensemble_size=4)
    bigger.run(random.key(0), 5, Y, progress_bar=False)
    with pytest.raises(ValueError, match="ensemble_size=4"):
        bigger.get_points(params)


def test_one_shot_learning_rate():
    for bad in (-0.1, 0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
            ensemble_map(model, Y, ensemble_size=2, num_steps=5, rng_key=random.key(0),
                         learning_rate=bad)
    with pytest.raises(TypeError, match="learning_rate must be a finite number > 0"):
        ensemble_map(model, Y, ensemble_size=2, num_steps=5, rng_key=random.key(0),
                     learning_rate="fast")


def test_init_params_values():
    svi = make()
    with pytest.raises(ValueError, match=r"init_params\['mu_auto_loc'\] has non-finite"):
        svi.init(random.key(0), Y, init_params={"mu_auto_loc": jnp.array([0.0, jnp.nan, 1.0])})
    with pytest.raises(TypeError, match=r"init_params\['mu_auto_loc'\] must hold numbers"):
        svi.init(random.key(0), Y, init_params={"mu_auto_loc": "zero"})
    with pytest.raises(ValueError, match=r"init_params\['mu_auto_scale'\] is outside the param's support"):
        svi.init(random.key(0), Y, init_params={"mu_auto_scale": jnp.array([0.1, -1.0, 0.2])})


def test_init_state_from_another_model():
    svi = make()
    foreign = EnsembleSVI(other, AutoNormal(other), optax.adam(0.01), Trace_ELBO(), ensemble_size=3)
    state = foreign.run(random.key(0), 5, Y, progress_bar=False).state
    with pytest.raises(ValueError, match=r"init_state holds the params \['nu_auto_loc', 'nu_auto_scale'\]"):
        svi.run(random.key(0), 5, Y, progress_bar=False, init_state=state)
    delta = make(guide=AutoDelta(model))
    with pytest.raises(ValueError, match="same model and guide"):
        delta.run(random.key(0), 5, Y, progress_bar=False, init_state=svi.init(random.key(0), Y))


def test_host_callback_without_vmap_method():
    import jax
    import numpy as np

    def host_shift(x):
        return jax.pure_callback(lambda v: np.asarray(v) + 1.0,
                                 jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    def with_callback(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.deterministic("h", host_shift(jax.lax.stop_gradient(mu)))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    ens = EnsembleMAP(with_callback, optax.adam(0.05), ensemble_size=2)
    with pytest.raises(NotImplementedError, match="pass vmap_method='sequential' to jax.pure_callback"):
        ens.run(random.key(0), 5, Y, progress_bar=False)


def test_data_as_python_lists():
    svi = make()
    with pytest.raises(TypeError, match="argument 0 is a Python list of numbers; pass data as an array"):
        svi.run(random.key(0), 5, [0.5, 1.0, 1.5], progress_bar=False)
    with pytest.raises(TypeError, match="y is a Python list of numbers"):
        svi.init(random.key(0), y=[0.5, 1.0])


@pytest.fixture
def nothing_compiles(monkeypatch):
    """Fails the test if an ensemble builds its compiled programs: the error must come first."""
    from numpyro_ensemble.engine import loop

    def refuse(ensemble):
        raise AssertionError("the ensemble started compiling before the input was checked")

    monkeypatch.setattr(loop, "programs", refuse)


def test_per_member_settings_of_the_wrong_length_name_the_argument(nothing_compiles):
    from numpyro_ensemble import TemperedTrace_ELBO

    with pytest.raises(ValueError, match=r"prior_weight has 2 values, but ensemble_size=3"):
        EnsembleMAP(model, optax.adam(0.01), ensemble_size=3, prior_weight=jnp.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"prior_weight must be .* a 1-D \(E,\) array .* shape \(3, 1\)"):
        EnsembleMAP(model, optax.adam(0.01), ensemble_size=3, prior_weight=jnp.ones((3, 1)))
    with pytest.raises(ValueError, match=r"kl_weight has 2 values"):
        EnsembleSVI(model, AutoNormal(model), optax.adam(0.01),
                    TemperedTrace_ELBO(kl_weight=[1.0, 0.5]), ensemble_size=3)
    with pytest.raises(ValueError, match=r"hyperparameter learning_rate has shape \(3, 1\)"):
        EnsembleSVI(model, AutoNormal(model),
                    optax.inject_hyperparams(optax.adam)(learning_rate=jnp.full((3, 1), 0.01)),
                    Trace_ELBO(), ensemble_size=3)
    # num_particles is one setting of the loss, not per member, and 0 gives no loss at all
    for loss in (Trace_ELBO(num_particles=0), Trace_ELBO(num_particles=jnp.ones(3, int))):
        with pytest.raises(ValueError, match=r"the loss's num_particles must be an int >= 1"):
            EnsembleSVI(model, AutoNormal(model), optax.adam(0.01), loss, ensemble_size=3)
    with pytest.raises(ValueError, match=r"num_particles must be an int >= 1 \(one value for all members\), got 0"):
        TemperedTrace_ELBO(num_particles=0)


def test_a_plain_svi_where_an_ensemble_is_expected():
    from numpyro.infer import SVI

    from numpyro_ensemble import (
        ensemble_predictive,
        ensemble_summary,
        importance_weights,
        mcmc_init_params,
        stacking_weights,
        to_arviz,
    )

    svi = SVI(model, AutoNormal(model), optax.adam(0.01), Trace_ELBO())
    params = svi.get_params(svi.init(random.key(0), Y))
    for fn in (sample_posterior, ensemble_predictive, importance_weights, stacking_weights,
               to_arviz, mcmc_init_params, ensemble_summary):
        with pytest.raises(TypeError, match=rf"{fn.__name__} needs an EnsembleSVI or EnsembleMAP"
                                            r".*got a plain numpyro.infer.SVI"):
            fn(svi, random.key(1), params, Y)
    with pytest.raises(TypeError, match="needs an EnsembleSVI or EnsembleMAP as its first argument, got dict"):
        sample_posterior(params, random.key(1), params, Y)


def test_discrete_latent_site_under_a_continuous_autoguide(nothing_compiles):
    def with_switch(y):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu + z, 1.0), obs=y)

    svi = EnsembleSVI(with_switch, AutoNormal(with_switch), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=2)
    match = (r"discrete latent sites \['z'\], which AutoNormal .* cannot fit.*MixtureSameFamily"
             r".*TraceEnum_ELBO.*block\(model, hide=\['z'\]\)")
    with pytest.raises(ValueError, match=match):
        svi.run(random.key(0), 5, Y, progress_bar=False)
    with pytest.raises(ValueError, match=match):
        svi.init(random.key(0), Y)


def test_rng_key_must_be_a_key(nothing_compiles):
    svi = make()
    for bad, found in ((0, "got 0 of type int"), (random.split(random.key(0), 3), "an array of 3 typed keys"),
                       (random.split(random.PRNGKey(0), 3), r"a uint32 array of shape \(3, 2\)")):
        with pytest.raises(TypeError, match=rf"rng_key must be one JAX PRNG key, e\.g\. jax\.random\.key\(0\).*{found}"):
            svi.run(bad, 5, Y, progress_bar=False)
    with pytest.raises(TypeError, match="rng_key must be one JAX PRNG key"):
        svi.init(0, Y)
    with pytest.raises(TypeError, match="rng_key must be one JAX PRNG key"):
        svi.batch_indices(1, 3, Y)


def test_legacy_prng_keys_still_work():
    svi = make(E=2)
    legacy = svi.run(random.PRNGKey(0), 5, Y, progress_bar=False)
    typed = svi.run(random.wrap_key_data(random.PRNGKey(0)), 5, Y, progress_bar=False)
    np.testing.assert_array_equal(legacy.losses, typed.losses)  # the same key, two spellings
    draws = sample_posterior(svi, random.PRNGKey(1), legacy.params, Y, num_samples=3)
    assert draws["mu"].shape == (2, 3)


@pytest.fixture
def compiles():
    """The XLA compilations made during the test (jax.monitoring's compile events)."""
    import jax

    events = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


def test_kl_weight_of_the_wrong_length_for_the_ensemble(nothing_compiles, compiles):
    from numpyro_ensemble import TemperedTrace_ELBO

    weights = np.array([1.0, 0.5, 0.2, 0.1])  # (converting these to JAX's float type compiles)
    with pytest.raises(ValueError, match=r"kl_weight has 4 values, but ensemble_size=3: give one "
                                         r"value per member or a scalar"):
        EnsembleSVI(model, AutoNormal(model), optax.adam(0.01),
                    TemperedTrace_ELBO(kl_weight=weights), ensemble_size=3)
    assert compiles == []


def observed_only(y):
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)


def params_only(y):
    loc = numpyro.param("loc", lambda key: random.normal(key, ()))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(loc, 1.0), obs=y)


def test_a_model_with_nothing_to_fit(nothing_compiles, compiles):
    key = random.key(0)
    svi = EnsembleSVI(observed_only, AutoNormal(observed_only), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=2)
    ens = EnsembleMAP(observed_only, ensemble_size=2)
    compiles.clear()  # (making the default optimizer's state at no params compiles)
    match = (r"EnsembleSVI: the model has no latent sample sites \(every sample site \['y'\] is "
             r"observed\) and no numpyro.param sites, so AutoNormal has nothing to fit.*"
             r"nothing to infer.*numpyro.param")
    with pytest.raises(ValueError, match=match):
        svi.run(key, 5, Y, progress_bar=False)
    with pytest.raises(ValueError, match=match):
        svi.init(key, Y)
    with pytest.raises(ValueError, match=r"EnsembleMAP: the model has no latent sample sites.*"
                                         r"so AutoDelta has nothing to fit"):
        ens.run(key, 5, Y, progress_bar=False)
    assert compiles == []


def test_a_model_whose_params_are_all_it_fits():
    # No latent sites, but numpyro.param sites (a network's weights, here one number):
    # the members fit them, by maximum likelihood under EnsembleMAP or next to an
    # AutoNormal with nothing of its own.
    svi = EnsembleSVI(params_only, AutoNormal(params_only), optax.adam(0.1), Trace_ELBO(),
                      ensemble_size=2)
    assert svi.run(random.key(0), 5, Y, progress_bar=False).params["loc"].shape == (2,)
    ens = EnsembleMAP(params_only, ensemble_size=2)
    result = ens.run(random.key(0), 50, Y, progress_bar=False)
    np.testing.assert_allclose(result.params["loc"], Y.mean(), rtol=1e-4)


def test_discrete_latent_site_when_funsor_is_installed(nothing_compiles, compiles, monkeypatch):
    # With funsor importable NumPyro no longer fails at once (no ImportError): it failed
    # after compiling the members' init. Funsor enumerates only under TraceEnum_ELBO.
    import importlib.machinery
    import sys
    import types

    funsor = types.ModuleType("funsor")
    funsor.__spec__ = importlib.machinery.ModuleSpec("funsor", None)
    monkeypatch.setitem(sys.modules, "funsor", funsor)

    def with_count(y):
        k = numpyro.sample("k", dist.Poisson(3.0))
        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        with numpyro.plate("n", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu + k, 1.0), obs=y)

    key = random.key(0)
    svi = EnsembleSVI(with_count, AutoNormal(with_count), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=2)
    compiles.clear()
    with pytest.raises(ValueError, match=r"discrete latent sites \['k'\], which AutoNormal"):
        svi.run(key, 5, Y, progress_bar=False)
    assert compiles == []


def test_params_of_another_ensemble():
    svi = make()
    svi.init(random.key(0), Y)
    foreign = {"nu_auto_loc": jnp.zeros(3), "nu_auto_scale": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"params has no values for \['mu_auto_loc', "
                                         r"'mu_auto_scale'\], params of this EnsembleSVI "
                                         r"\(it holds \['nu_auto_loc', 'nu_auto_scale'\]\)"):
        sample_posterior(svi, random.key(1), foreign, Y)


def test_a_flat_loss_has_no_newton_step():
    # A Hessian of zeros (the loss does not depend on the params): NaN or inf to go,
    # not a division that warns.
    import warnings

    from numpyro_ensemble.trust.convergence import _decrement

    g = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    hessian = np.stack([np.zeros((2, 2)), np.zeros((2, 2)), np.diag([2.0, 1.0])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decrement, error = _decrement(g, np.zeros((3, 2, 2)), hessian)
    assert caught == []
    assert np.isnan(decrement[0]) and np.isnan(error[0])
    assert decrement[1] == np.inf and error[1] == 0.0
    np.testing.assert_allclose(decrement[2], 0.25)  # g^T H^-1 g / 2


RECIPE = """
import json, sys, warnings

import numpyro
numpyro.enable_x64()
import numpy as np
import jax.numpy as jnp
from jax import random
import numpyro.distributions as dist
from numpyro_ensemble import (EnsembleMAP, ensemble_summary, importance_weights,
                              laplace_members, sample_posterior)

def model(x, y=None):  # posteriordb's kidiq-kidscore_momiq, with weakly informative priors
    a = numpyro.sample("a", dist.Normal(0.0, 100.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(50.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)

rng = np.random.default_rng(0)
x = rng.normal(100.0, 15.0, 434)
x, y = jnp.asarray(x), jnp.asarray(26.0 + 0.6 * x + rng.normal(0.0, 18.0, 434))
with warnings.catch_warnings(record=True) as caught:  # (after the imports)
    warnings.simplefilter("always")
    ens = EnsembleMAP(model, ensemble_size=4)
    res = ens.run(random.PRNGKey(0), 300, x, y, progress_bar=False)
    lap, lp = laplace_members(ens, res.params, x, y)
    iw = importance_weights(lap, random.PRNGKey(7), lp, x, y, num_samples=100)
    s = ensemble_summary(lap, random.PRNGKey(8), res._replace(params=lp), x, y, weights=iw)
    draws = sample_posterior(lap, random.PRNGKey(9), lp, x, y, weights=iw, num_samples=100)
    try:  # the points' own params with the Laplace members
        ensemble_summary(lap, random.PRNGKey(8), res, x, y, weights=iw)
        misuse = ""
    except ValueError as error:
        misuse = str(error)
json.dump({"warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
           "dtype": str(draws["a"].dtype), "verdict": s.verdict, "misuse": misuse}, sys.stdout)
"""


def test_the_recommended_recipe_warns_nothing_in_float64(tmp_path):
    # EnsembleMAP -> laplace_members -> importance_weights -> ensemble_summary ->
    # sample_posterior on a well-posed regression: nothing a user cannot act on. In a
    # process of its own: float64 is per process, and ArviZ (first imported inside
    # importance_weights, for PSIS) shows its once-a-day FutureWarning of its refactor
    # on a fresh cache.
    import json
    import os
    import pathlib
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", RECIPE], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parents[1], env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    assert found["warnings"] == []
    assert found["dtype"] == "float64" and "can be trusted" in found["verdict"]
    assert re.search(r"params has no values for \['auto_loc', 'auto_scale_tril'\].*these are "
                     r"Laplace members.*result._replace\(params=laplace_params\)", found["misuse"])
