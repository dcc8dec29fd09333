"""Mini-batch indices that the ensemble draws for subsampled plates in ``run``."""

from conftest import member, subsample_model, tree_allclose
import jax
from jax import random
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import substitute
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta
import optax
import pytest

from numpyro_ensemble import EnsembleMAP, EnsembleSVI

E = 3


def data(n):
    x = jnp.linspace(-2.0, 2.0, n)
    return x, 1.5 * x + 0.3 * random.normal(random.key(2), (n,))


@pytest.mark.parametrize("n, batch", [(12, 4), (10, 4)])
def test_epoch_batches_use_every_point_once_per_epoch(n, batch):
    x, y = data(n)
    ens = EnsembleMAP(subsample_model, optax.adam(0.01), ensemble_size=E)
    epochs = 3
    steps = -(-epochs * n // batch)
    idx = np.asarray(ens.batch_indices(random.key(0), steps, x, y, batch=batch)["data"])
    assert idx.shape == (E, steps, batch)
    stream = idx.reshape(E, -1)  # batches in order; a batch may run into the next epoch
    for e in range(E):
        for k in range(epochs):
            assert sorted(stream[e, k * n:(k + 1) * n]) == list(range(n))
        assert any((stream[e, :n] != stream[e, n:2 * n]))  # a new shuffle each epoch
    assert not np.array_equal(stream[0], stream[1])  # members differ
    again = ens.batch_indices(random.key(0), steps, x, y, batch=batch)["data"]
    np.testing.assert_array_equal(idx, again)  # a function of the key
    other = ens.batch_indices(random.key(1), steps, x, y, batch=batch)["data"]
    assert not np.array_equal(idx, other)
    tail = ens.batch_indices(random.key(0), steps - 2, x, y, batch=batch, start_step=2)["data"]
    np.testing.assert_array_equal(idx[:, 2:], tail)  # positions are exact from any step


def test_iid_batches():
    x, y = data(12)
    ens = EnsembleMAP(subsample_model, optax.adam(0.01), ensemble_size=E, subsample="iid")
    idx = np.asarray(ens.batch_indices(random.key(0), 50, x, y)["data"])
    assert idx.shape == (E, 50, 4) and idx.min() >= 0 and idx.max() < 12
    assert len(np.unique(idx[0], axis=0)) > 40  # a new draw every step
    assert not np.array_equal(idx[0], idx[1])
    assert EnsembleMAP(subsample_model, optax.adam(0.01), ensemble_size=E, subsample="numpyro") \
        .batch_indices(random.key(0), 5, x, y) == {}


@pytest.mark.parametrize("subsample", ["epoch", "iid"])
def test_member_takes_plain_svi_steps_on_its_batches(subsample):
    """Member e of run is plain SVI.update on the model with member e's batch indices
    substituted into the plate, step by step; resuming continues the same stream."""
    x, y = data(10)
    guide = AutoDelta(subsample_model)
    esvi = EnsembleSVI(subsample_model, guide, optax.sgd(0.02), Trace_ELBO(), ensemble_size=E,
                       subsample=subsample)
    key = random.key(4)
    whole = esvi.run(key, 9, x, y, progress_bar=False)
    idx = esvi.batch_indices(key, 9, x, y)["data"]

    def plain_step(state, batch):
        sub = {"data": batch}
        svi = SVI(substitute(subsample_model, data=sub), substitute(guide, data=sub),
                  optax.sgd(0.02), Trace_ELBO())
        svi.constrain_fn = esvi.constrain_fn
        return svi.update(state, x, y)

    plain_step = jax.jit(plain_step)
    start = esvi.init(key, x, y)
    for e in range(E):
        state = member(start, e)
        for t in range(9):
            state, loss = plain_step(state, idx[e, t])
            np.testing.assert_allclose(whole.losses[e, t], loss, rtol=1e-5)
        tree_allclose(member(whole.state, e), state, rtol=1e-5, atol=1e-6)
    first = esvi.run(key, 4, x, y, progress_bar=False)
    rest = esvi.run(key, 5, x, y, progress_bar=True, init_state=first.state)
    np.testing.assert_allclose(jnp.concatenate([first.losses, rest.losses], 1), whole.losses, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::numpyro_ensemble.IdenticalMembersWarning")
def test_epoch_batch_losses_average_to_the_full_data_loss():
    """With the params held still, the N/B-scaled batch losses of one epoch average to
    the full-data loss exactly (every point once), and i.i.d. batches are unbiased."""
    n, batch = 12, 4
    x, y = data(n)
    init = {"w": jnp.array(0.7)}
    full = EnsembleMAP(subsample_model, optax.sgd(0.0), ensemble_size=1)
    full_loss = full.evaluate(full.init(random.key(0), x, y, batch=n, init_params=init), x, y, batch=n)[0]
    ens = EnsembleMAP(subsample_model, optax.sgd(0.0), ensemble_size=E)
    losses = ens.run(random.key(0), 3 * n // batch, x, y, init_params=init, progress_bar=False).losses
    per_epoch = np.asarray(losses).reshape(E, 3, n // batch).mean(axis=2)
    np.testing.assert_allclose(per_epoch, full_loss, rtol=1e-5)
    assert len(np.unique(np.asarray(losses))) > n // batch  # batches do differ
    iid = EnsembleMAP(subsample_model, optax.sgd(0.0), ensemble_size=400, subsample="iid")
    losses = np.asarray(iid.run(random.key(0), 5, x, y, init_params=init, progress_bar=False).losses)
    assert abs(losses.mean() - full_loss) < 4 * losses.std() / np.sqrt(losses.size)


def test_numpyro_subsample_member_is_plain_svi_run():
    x, y = data(10)
    esvi = EnsembleSVI(subsample_model, AutoDelta(subsample_model), optax.adam(0.05), Trace_ELBO(),
                       ensemble_size=2, subsample="numpyro")
    result = esvi.run(random.key(3), 15, x, y, progress_bar=False)
    for e, key in enumerate(esvi.member_keys(random.key(3))):
        ref = SVI(subsample_model, AutoDelta(subsample_model), optax.adam(0.05), Trace_ELBO()) \
            .run(key, 15, x, y, progress_bar=False)
        np.testing.assert_allclose(result.losses[e], ref.losses, rtol=1e-5)


def test_subsample_mode_is_checked():
    with pytest.raises(ValueError, match=r"subsample must be one of \['epoch', 'iid', 'numpyro'\], got 'random'"):
        EnsembleMAP(subsample_model, optax.adam(0.01), ensemble_size=2, subsample="random")
