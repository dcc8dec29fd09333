"""Program keys: equal settings share compiled programs, different settings never do."""

from conftest import regression_model
import jax
from jax import random
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import EnsembleSVI
from numpyro_ensemble.engine.keys import hashable, loss_key, optimizer_key

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def other_model(x, y=None):
    regression_model(x, y)


@pytest.mark.parametrize(
    "make, other",
    [
        (lambda: optax.adam(1e-3), lambda: optax.adam(2e-3)),
        (lambda: optax.adam(1e-3), lambda: optax.adamw(1e-3)),
        (lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
         lambda: optax.chain(optax.clip_by_global_norm(2.0), optax.adam(1e-3))),
        (lambda: optax.adam(optax.cosine_decay_schedule(1e-2, 100)),
         lambda: optax.adam(optax.cosine_decay_schedule(1e-2, 200))),
        (lambda: optax.inject_hyperparams(optax.adam)(learning_rate=jnp.array([0.1, 0.2])),
         lambda: optax.inject_hyperparams(optax.adam)(learning_rate=jnp.array([0.1, 0.3]))),
        (lambda: optax.lbfgs(), lambda: optax.lbfgs(memory_size=20)),
        (lambda: numpyro.optim.Adam(0.01), lambda: numpyro.optim.Adam(0.02)),
        (lambda: numpyro.optim.Adam(0.01), lambda: numpyro.optim.SGD(0.01)),
    ],
)
def test_optimizers_with_equal_settings_share_a_key(make, other):
    assert optimizer_key(make()) == optimizer_key(make())
    assert optimizer_key(make()) != optimizer_key(other())
    hash(optimizer_key(make()))


def test_losses_with_equal_settings_share_a_key_and_guides_are_by_identity():
    assert loss_key(Trace_ELBO()) == loss_key(Trace_ELBO())
    assert loss_key(Trace_ELBO()) != loss_key(Trace_ELBO(num_particles=2))
    # an AutoGuide keeps its set-up for the shapes it first saw: never shared by settings
    assert hashable(AutoNormal(regression_model)) != hashable(AutoNormal(regression_model))


def test_a_new_ensemble_of_equal_settings_compiles_nothing(regression_data):
    x, y = regression_data

    guide = AutoNormal(regression_model)

    def fit(optim):
        ens = EnsembleSVI(regression_model, guide, optim, Trace_ELBO(), ensemble_size=3)
        return ens.run(random.key(0), 40, x, y, progress_bar=False)

    first = fit(optax.adam(1e-2))
    compiles = []

    def listener(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = fit(optax.adam(1e-2))  # new optimizer and loss: equal settings
        assert compiles == [], "an optimizer and loss of equal settings compiled again"
        fit(optax.adam(3e-2))  # another learning rate: another program
        assert compiles, "a different optimizer shared a program"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    for name in first.params:
        np.testing.assert_array_equal(np.asarray(again.params[name]), np.asarray(first.params[name]))
    np.testing.assert_array_equal(np.asarray(again.losses), np.asarray(first.losses))
