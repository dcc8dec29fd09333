"""Checkpoints: periodic saves hold the state, a new process resumes exactly, bad files fail clearly."""

import pathlib
import subprocess
import sys
import textwrap

from conftest import subsample_model, tree_allclose
from jax import random
import jax.numpy as jnp
import numpy as np
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import EnsembleSVI, load_checkpoint, save_checkpoint
import numpyro_ensemble.fit.svi as svi_module

X = jnp.linspace(-1.0, 1.0, 12)
Y = 0.3 + 1.5 * X


def make():
    return EnsembleSVI(subsample_model, AutoNormal(subsample_model), optax.adam(0.05),
                       Trace_ELBO(), ensemble_size=3)


def test_periodic_checkpoints_hold_the_state_and_load_back(tmp_path):
    path = tmp_path / "state.ckpt"
    result = make().run(random.key(0), 30, X, Y, progress_bar=False,
                        checkpoint_path=path, checkpoint_every=7)
    loaded = load_checkpoint(path, like=result.state)
    tree_allclose(loaded, result.state, rtol=0, atol=0)
    assert loaded.rng_key.dtype == result.state.rng_key.dtype  # typed keys come back typed
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_path"):
        make().run(random.key(0), 5, X, Y, progress_bar=False, checkpoint_every=2)
    with pytest.raises(ValueError, match="is not a writable directory"):
        make().run(random.key(0), 5, X, Y, progress_bar=False,
                   checkpoint_path=tmp_path / "missing" / "state.ckpt")


RESUME = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import jax.numpy as jnp, numpy as np, optax
    from jax import random
    from numpyro.infer import Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from conftest import subsample_model
    from numpyro_ensemble import EnsembleSVI, load_checkpoint
    X = jnp.linspace(-1.0, 1.0, 12)
    Y = 0.3 + 1.5 * X
    svi = EnsembleSVI(subsample_model, AutoNormal(subsample_model), optax.adam(0.05),
                      Trace_ELBO(), ensemble_size=3)
    state = load_checkpoint({path!r})
    rest = svi.run(random.key(0), {steps}, X, Y, progress_bar=False, init_state=state)
    np.save({out!r}, np.asarray(rest.params["w_auto_loc"]))
    np.save({losses!r}, np.asarray(rest.losses))
    """
)


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.mark.slow
def test_a_run_killed_after_a_periodic_save_resumes_in_a_new_process_exactly(
    tmp_path, monkeypatch
):
    whole = make().run(random.key(0), 35, X, Y, progress_bar=False)
    path = tmp_path / "state.ckpt"
    saves = []

    def save_then_die(path, state):  # the run dies right after its second periodic save
        save_checkpoint(path, state)
        saves.append(int(np.max(state.optim_state[0])))
        if len(saves) == 2:
            raise Killed

    monkeypatch.setattr(svi_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        make().run(random.key(0), 35, X, Y, progress_bar=False, checkpoint_path=path,
                   checkpoint_every=7)
    assert saves == [7, 14]  # the file holds the state after 14 of 35 steps, mid-run
    out, losses = tmp_path / "w.npy", tmp_path / "losses.npy"
    script = RESUME.format(tests=str(pathlib.Path(__file__).parents[1]), path=str(path),
                           out=str(out), losses=str(losses), steps=35 - 14)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    np.testing.assert_allclose(np.load(out), whole.params["w_auto_loc"], rtol=1e-6)
    np.testing.assert_allclose(np.load(losses), whole.losses[:, 14:], rtol=1e-6)
    # and not by accident: the saved state differs from the start and from the end
    start = make().init(random.key(0), X, Y)
    saved = load_checkpoint(path)
    for other in (start, whole.state):
        assert not np.allclose(np.asarray(saved.optim_state[1][0]["w_auto_loc"]),
                               np.asarray(other.optim_state[1][0]["w_auto_loc"]))


def test_corrupt_or_mismatched_checkpoints_are_clear_errors(tmp_path):
    state = make().init(random.key(0), X, Y)
    good = tmp_path / "good.ckpt"
    save_checkpoint(good, state)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{broken} is not a readable numpyro-ensemble checkpoint"):
        load_checkpoint(broken)
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{junk} is not a readable"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "none.ckpt")
    other = EnsembleSVI(subsample_model, AutoNormal(subsample_model), optax.adam(0.05),
                        Trace_ELBO(), ensemble_size=4).init(random.key(0), X, Y)
    with pytest.raises(ValueError, match=f"the checkpoint {good} holds an array of shape"):
        load_checkpoint(good, like=other)
    with pytest.raises(ValueError, match="ensemble_size=4"):  # a wrong state in run is caught too
        EnsembleSVI(subsample_model, AutoNormal(subsample_model), optax.adam(0.05), Trace_ELBO(),
                    ensemble_size=4).run(random.key(0), 3, X, Y, progress_bar=False,
                                         init_state=load_checkpoint(good))
