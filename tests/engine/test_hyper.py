"""Per-member hyperparameters: tempering weights and optax.inject_hyperparams values."""

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import EnsembleMAP, EnsembleSVI, TemperedTrace_ELBO

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y = jnp.array([2.0, 3.0, 4.0])
WEIGHTS = jnp.array([0.0, 0.5, 1.0, 2.0])


def test_prior_weight_per_member_is_the_tempered_map_and_compiles_once():
    adam = optax.adam(0.05)  # programs are shared per optimizer object
    ens = EnsembleMAP(model, adam, ensemble_size=4, prior_weight=WEIGHTS)
    result = ens.run(random.key(0), 1500, Y, progress_bar=False)
    # argmax of log p(y | mu) + w log p(mu): sum(y) / (n + w)
    np.testing.assert_allclose(ens.get_points(result.params)["mu"], Y.sum() / (3 + WEIGHTS), atol=1e-4)
    for e in (0, 3):  # member e is the scalar run's member e
        alone = EnsembleMAP(model, optax.adam(0.05), ensemble_size=4, prior_weight=float(WEIGHTS[e]))
        single = alone.run(random.key(0), 1500, Y, progress_bar=False)
        np.testing.assert_allclose(result.losses[e], single.losses[e], rtol=1e-6)
    new_weights = np.asarray(WEIGHTS) + 0.25  # (numpy: an eager jnp op would compile)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:  # a new sweep of other values: same programs
        other = EnsembleMAP(model, adam, ensemble_size=4, prior_weight=new_weights)
        swept = other.run(random.key(0), 1500, Y, progress_bar=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    np.testing.assert_allclose(other.get_points(swept.params)["mu"], Y.sum() / (3 + new_weights), atol=1e-4)


def test_kl_weight_and_learning_rate_per_member_equal_scalar_runs():
    rates = jnp.array([0.003, 0.03, 0.1])
    betas = jnp.array([0.1, 1.0, 3.0])

    def make(rate, beta):
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=rate)
        return EnsembleSVI(model, AutoNormal(model), tx, TemperedTrace_ELBO(kl_weight=beta),
                           ensemble_size=3)

    swept = make(rates, betas).run(random.key(1), 200, Y, progress_bar=False)
    for e in range(3):
        single = make(float(rates[e]), float(betas[e])).run(random.key(1), 200, Y, progress_bar=False)
        np.testing.assert_allclose(swept.losses[e], single.losses[e], rtol=1e-5)
        np.testing.assert_allclose(swept.params["mu_auto_loc"][e], single.params["mu_auto_loc"][e],
                                   rtol=1e-5)
    state = swept.state.optim_state[1]
    kinds = tuple(
        getattr(optax, n)
        for n in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
        if hasattr(optax, n)
    )
    nodes = jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, kinds))
    hyperparams = next(n for n in nodes if isinstance(n, kinds)).hyperparams
    np.testing.assert_allclose(hyperparams["learning_rate"], rates)  # member e keeps its own


def test_wrong_lengths_are_clear_errors():
    with pytest.raises(ValueError, match=r"prior_weight must be a finite number >= 0 or an \(E,\) array"):
        EnsembleMAP(model, optax.adam(0.05), ensemble_size=2, prior_weight=jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match=r"prior_weight has 3 values, but ensemble_size=2"):
        EnsembleMAP(model, optax.adam(0.05), ensemble_size=2, prior_weight=WEIGHTS[:3])
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=jnp.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="the optimizer's hyperparameter learning_rate has 3 values"):
        EnsembleMAP(model, tx, ensemble_size=2)
