"""Bad input found by users: each a clear error naming the argument, before compiling."""

from jax import random
import jax.numpy as jnp
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
