"""The compiled programs: compiled once per configuration and shapes, shared by new
objects; the model is inspected once per shapes; the persistent compilation cache."""

import os
import subprocess
import sys
import textwrap

from conftest import compiled_programs, regression_model, subsample_model
import jax
from jax import random
import jax.monitoring
import numpy as np
import numpyro
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import EnsembleMAP, EnsembleSVI

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def count_compiles():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield compiles
    jax.monitoring.unregister_event_duration_listener(listener)


def counted(model):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    return wrapped, calls


def test_second_run_traces_and_compiles_nothing(count_compiles, regression_data):
    model, calls = counted(subsample_model)
    x, y = regression_data
    ens = EnsembleMAP(model, optax.adam(0.01), ensemble_size=4)
    ens.run(random.key(0), 30, x, y, progress_bar=True)
    y_new, key = y + 1.0, random.key(1)
    before_calls, before_compiles = len(calls), len(count_compiles)
    ens.run(key, 30, x, y_new, progress_bar=True)  # new data, same shapes
    ens.init(random.key(2), x, y)
    assert len(calls) == before_calls, "the model was traced (or validated) again"
    assert len(count_compiles) == before_compiles, "something was compiled again"
    ens.run(random.key(1), 30, x[:8], y[:8], progress_bar=False)  # new shapes: inspected again
    assert len(calls) > before_calls


def test_new_object_on_the_same_model_compiles_nothing(count_compiles, regression_data):
    x, y = regression_data
    guide, optim = AutoNormal(regression_model), optax.adam(0.01)
    EnsembleSVI(regression_model, guide, optim, Trace_ELBO(), ensemble_size=4).run(
        random.key(0), 20, x, y, progress_bar=False)
    before = len(count_compiles)
    other = EnsembleSVI(regression_model, guide, optim, Trace_ELBO(), ensemble_size=4)
    result = other.run(random.key(1), 20, x, y, progress_bar=False)
    other.get_params(result.state)
    assert len(count_compiles) == before
    # EnsembleMAP builds its guide itself: the same model and optimizer are enough.
    map_optim = optax.adam(0.02)
    EnsembleMAP(regression_model, map_optim, ensemble_size=3).run(random.key(0), 10, x, y, progress_bar=False)
    before = len(count_compiles)
    again = EnsembleMAP(regression_model, map_optim, ensemble_size=3)
    again.get_points(again.run(random.key(1), 10, x, y, progress_bar=False).params)
    assert len(count_compiles) == before
    # A different loss setting is a different program.
    EnsembleSVI(regression_model, guide, optim, Trace_ELBO(num_particles=2), ensemble_size=4).run(
        random.key(1), 20, x, y, progress_bar=False)
    assert len(count_compiles) > before


def test_an_equal_guide_built_again_compiles_nothing(count_compiles, regression_data):
    """A guide made again with equal settings (a notebook cell run twice) shares the
    programs, once set up itself; other settings or shapes are other programs."""
    x, y = regression_data

    def fit(guide, key, data=(x, y)):
        ens = EnsembleSVI(regression_model, guide, optax.adam(0.01), Trace_ELBO(), ensemble_size=2)
        return ens, ens.run(key, 20, *data, progress_bar=False)

    first, expected = fit(AutoNormal(regression_model), random.key(1))
    before = len(count_compiles)
    again, result = fit(AutoNormal(regression_model), random.key(1))
    assert len(count_compiles) == before
    np.testing.assert_array_equal(result.losses, expected.losses)
    assert again.guide.prototype_trace is not None  # set up, for the user's own calls
    np.testing.assert_array_equal(
        again.guide.median(jax.tree.map(lambda v: v[0], result.params))["w"],
        first.guide.median(jax.tree.map(lambda v: v[0], expected.params))["w"],
    )
    fit(AutoNormal(regression_model, init_scale=0.2), random.key(1))  # another setting
    assert len(count_compiles) > before


def test_a_linesearch_run_compiles_its_chunk_program_once(regression_data):
    """optax's L-BFGS state starts weakly typed and a step makes it strong: the chunks
    after the first (a progress bar cuts 30 steps into 15) and the steps of a jitted
    update loop after the first must not each be a new program."""
    x, y = regression_data

    def fit():
        ens = EnsembleMAP(regression_model, optax.lbfgs(), ensemble_size=2)
        ens.run(random.key(0), 30, x, y, progress_bar=True)
        state, update = ens.init(random.key(1), x, y), jax.jit(ens.update)
        for _ in range(3):  # a user's jitted loop, as with SVI
            state, _ = update(state, x, y)
        return state

    names = compiled_programs(fit)
    # compiled side by side with the init program (threads), each once
    assert names.count("jit(_chunk)") == 1 and names.count("jit(_init)") == 1, names
    assert names.count("jit(update)") == 1, names


def test_guides_for_other_shapes_are_kept_apart():
    """Two EnsembleMAPs of a model with a local latent on data of two sizes both work."""
    import jax.numpy as jnp
    import numpyro.distributions as dist

    def local_model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", y.shape[0]):
            z = numpyro.sample("z", dist.Normal(mu, 1.0))
            numpyro.sample("y", dist.Normal(z, 0.5), obs=y)

    optim = optax.adam(0.05)
    for n in (3, 5, 3):
        ens = EnsembleMAP(local_model, optim, ensemble_size=2)
        points = ens.get_points(ens.run(random.key(0), 5, jnp.arange(float(n)), progress_bar=False).params)
        assert points["z"].shape == (2, n)


CACHE_SCRIPT = textwrap.dedent(
    """
    import os, sys, jax, jax.monitoring, optax
    from jax import random
    from conftest import regression_model
    from numpyro.infer import Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from numpyro_ensemble import EnsembleSVI, enable_compilation_cache

    hits = []
    jax.monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
    path = enable_compilation_cache(sys.argv[1])
    assert jax.config.jax_compilation_cache_dir == path
    x = jax.numpy.linspace(-1.0, 1.0, 12)
    ens = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.01), Trace_ELBO(), ensemble_size=3)
    ens.run(random.key(0), 10, x, 2.0 * x, progress_bar=False)
    print("HITS", len(hits), "FILES", len(os.listdir(path)))
    """
)


@pytest.mark.slow
def test_enable_compilation_cache_serves_a_second_process(tmp_path):
    script = tmp_path / "cached.py"
    script.write_text(CACHE_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
    cache = tmp_path / "cache"
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, str(script), str(cache)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        _, hits, _, files = out.stdout.split()[-4:]
        runs.append((int(hits), int(files)))
    (first_hits, first_files), (second_hits, second_files) = runs
    assert first_files > 10  # NumPyro's small eager programs are cached too
    assert second_hits >= first_files - 2  # (almost) every program is loaded, not compiled
    assert second_files <= first_files + 2


def test_clear_compiled_programs_releases_memory_maps_and_keeps_ensembles_usable(regression_data):
    from numpyro_ensemble import clear_compiled_programs

    def maps():
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)

    x, y = regression_data
    ens = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02),
                      Trace_ELBO(), ensemble_size=2)
    first = ens.run(random.key(0), 5, x, y, progress_bar=False)
    before = maps() if sys.platform == "linux" else 0
    clear_compiled_programs()
    if sys.platform == "linux":  # every compiled program held a few memory maps
        assert maps() < before
    again = ens.run(random.key(0), 5, x, y, progress_bar=False)  # compiles again
    jax.tree.map(np.testing.assert_array_equal, first.params, again.params)


def test_runs_of_any_length_share_one_chunk_program(count_compiles, regression_data):
    # Chunks run a dynamic number of steps in one program: a tail, another num_steps, a
    # progress bar, early stopping's chunks and checkpoint segments all reuse it.
    from numpyro_ensemble import EarlyStopping

    x, y = regression_data
    ens = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=3)
    first = ens.run(random.key(0), 100, x, y, progress_bar=False)
    before = len(count_compiles)
    for steps, progress_bar in [(90, False), (77, True), (1500, False), (3, True)]:
        result = ens.run(random.key(0), steps, x, y, progress_bar=progress_bar)
        assert result.losses.shape == (3, steps) and np.isfinite(np.asarray(result.losses)).all()
    assert len(count_compiles) == before, "a run of another length compiled something"
    # The same steps in chunks of 77 and 23 (progress bar) as in one chunk: the same numbers.
    again = ens.run(random.key(0), 100, x, y, progress_bar=True)
    np.testing.assert_array_equal(np.asarray(again.losses), np.asarray(first.losses))
    for name in first.params:
        np.testing.assert_array_equal(np.asarray(again.params[name]), np.asarray(first.params[name]))
    # Early stopping: about 20 chunks of one length and a tail; the stopping rule makes a
    # new step program, compiled once.
    before = len(count_compiles)
    stopped = ens.run(random.key(0), 301, x, y, progress_bar=False,
                      early_stopping=EarlyStopping(patience=5, min_delta=10.0))
    assert len(count_compiles) == before + 1
    stopped_at = np.asarray(ens.get_extra_fields()["stopped_at"])
    assert (stopped_at < 301).all() and stopped.losses.shape == (3, 301)
    np.testing.assert_array_equal(np.asarray(stopped.losses[:, -1]),
                                  np.asarray(ens.get_extra_fields()["final_loss"]))


def test_chunk_plan_covers_every_step_and_checkpoints_every_segment():
    from numpyro_ensemble.engine import loop

    for num_steps in (1, 7, 20, 21, 999, 1024, 1025, 5000):
        for progress_bar in (False, True):
            lengths = loop.chunk_lengths(num_steps, progress_bar)
            assert sum(lengths) == num_steps and max(lengths) <= loop.MAX_CHUNK
            assert len(set(lengths[:-1])) <= 1  # equal chunks and one tail
    plan = loop.chunk_plan(2500, False, every=1200)
    assert [n for n, _ in plan] == [1024, 176, 1024, 176, 100]
    assert [c for _, c in plan] == [False, True, False, True, True]
