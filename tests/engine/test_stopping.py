"""Early stopping inside the scan, and what happened to each member (get_extra_fields)."""

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

from numpyro_ensemble import EarlyStopping, EnsembleMAP


def model(y):
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(jnp.exp(a), 1.0), obs=y)


Y = jnp.array([2.0, 3.0, 2.5, 3.5])
STARTS = {"a": jnp.array([-2.0, 0.0, 1.0, 2.5])}


def make():
    return EnsembleMAP(model, optax.adam(0.05), ensemble_size=4)


def test_a_stopped_member_equals_a_run_of_that_many_steps(capsys):
    ens = make()
    rule = EarlyStopping(patience=10, min_delta=1e-4, smoothing=0.5)
    result = ens.run(random.key(0), 3000, Y, progress_bar=False, init_params=STARTS,
                     early_stopping=rule)
    fields = ens.get_extra_fields()
    stopped_at = np.asarray(fields["stopped_at"])
    assert result.losses.shape == (4, 3000)
    assert (stopped_at < 3000).all() and len(set(stopped_at.tolist())) > 1  # members differ
    assert not np.asarray(fields["diverged"]).any()
    np.testing.assert_allclose(fields["final_loss"], result.losses[:, -1])
    for e, s in enumerate(stopped_at.tolist()):
        # losses after s repeat the last loss
        np.testing.assert_array_equal(result.losses[e, s:], result.losses[e, s - 1])
        plain = make().run(random.key(0), s, Y, progress_bar=False, init_params=STARTS)
        np.testing.assert_allclose(result.params["a_auto_loc"][e], plain.params["a_auto_loc"][e],
                                   rtol=1e-6)
        np.testing.assert_allclose(result.losses[e, :s], plain.losses[e], rtol=1e-6)
    ens.print_summary()
    out = capsys.readouterr().out
    assert "stopped at" in out and str(stopped_at[0]) in out


def test_progress_bar_and_no_stopping_agree():
    ens = make()
    rule = EarlyStopping(patience=10**6)  # never stops
    stopped = ens.run(random.key(0), 200, Y, progress_bar=True, init_params=STARTS,
                      early_stopping=rule)
    assert (np.asarray(ens.get_extra_fields()["stopped_at"]) == 200).all()
    plain = make().run(random.key(0), 200, Y, progress_bar=False, init_params=STARTS)
    np.testing.assert_allclose(stopped.losses, plain.losses, rtol=1e-6)


def test_extra_fields_flag_a_diverged_member():
    ens = make()
    ens.run(random.key(0), 20, Y, progress_bar=False,
            init_params={"a": jnp.array([0.0, 1.0, 100.0, 0.5])})  # exp(100) overflows
    assert np.asarray(ens.get_extra_fields()["diverged"]).tolist() == [False, False, True, False]


def test_bad_early_stopping():
    ens = make()
    with pytest.raises(RuntimeError, match="call run\\(\\) first"):
        ens.get_extra_fields()
    for bad, match in [
        (EarlyStopping(patience=0), "patience must be an int >= 1"),
        (EarlyStopping(patience=5, min_delta=-1.0), "min_delta must be a finite number >= 0"),
        (EarlyStopping(patience=5, smoothing=1.0), "smoothing must be in \\[0, 1\\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            ens.run(random.key(0), 10, Y, progress_bar=False, early_stopping=bad)
    with pytest.raises(TypeError, match="early_stopping must be an EarlyStopping"):
        ens.run(random.key(0), 10, Y, progress_bar=False, early_stopping=5)
