import os

# The suite is mostly XLA compiling small programs that then run for milliseconds:
# LLVM's -O0 compiles them about 1.5x faster. Tests check numbers, never speed (the
# benchmarks in benchmarks/ run at the default level). Set before JAX starts its
# backend; subprocesses started by tests inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()

import jax
from jax import random
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest


def normal_model(y, prior_scale=2.0):
    """mu ~ N(0, prior_scale), y_i ~ N(mu, 1): the conjugate Normal-Normal model."""
    mu = numpyro.sample("mu", dist.Normal(0.0, prior_scale))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def regression_model(x, y=None):
    """A small regression with a positive latent (a constrained site)."""
    w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    mean = w[0] + w[1] * x
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(mean, sigma), obs=y)


def subsample_model(x, y=None, batch=4):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as idx:
        numpyro.sample("y", dist.Normal(w * x[idx], 0.5), obs=None if y is None else y[idx])


@pytest.fixture
def regression_data():
    x = jnp.linspace(-1.0, 1.0, 12)
    y = 0.3 + 1.5 * x + 0.2 * random.normal(random.key(1), (12,))
    return x, y


def run_tutorial(name: str, *argv: str):
    """Runs ``examples/<name>.py`` in quick mode (``main(["--quick", *argv])``) and
    returns what its ``main`` returns. Every tutorial's test calls this
    (``tests/test_docs.py`` checks that each tutorial has such a test)."""
    import pathlib
    import runpy

    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    namespace = runpy.run_path(str(script), run_name="not_main")
    return namespace["main"](["--quick", *argv])


def compiled_programs(fn) -> list:
    """The names of the programs XLA compiles while ``fn()`` runs (its outputs
    ready), from a ``jax.monitoring`` listener on backend compiles."""
    names = []

    def listener(event, duration, fun_name=None, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(jax.tree.leaves(fn()))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return names


def tree_allclose(a, b, **kw):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb, strict=False):
        u, v = _data(u), _data(v)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


def member(tree, e):
    return jax.tree.map(lambda leaf: leaf[e], tree)


def _data(leaf):
    if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
        return random.key_data(leaf)
    return leaf


def pytest_configure(config):
    """Most of the suite's time is XLA compiling programs that other tests compiled
    already (the same model and guide on new objects): share them through JAX's
    persistent compilation cache, in a directory that lives as long as the session
    (made once by the main process; pytest-xdist workers inherit it;
    ``NUMPYRO_ENSEMBLE_TEST_JAX_CACHE=off`` turns it off). And keep the workers'
    memory maps bounded (:class:`ReleaseCompiledPrograms`)."""
    import atexit
    import shutil
    import tempfile

    config.pluginmanager.register(ReleaseCompiledPrograms(), "release-compiled-programs")
    path = os.environ.get("NUMPYRO_ENSEMBLE_TEST_JAX_CACHE")
    if path == "off":
        return
    if path is None:
        path = tempfile.mkdtemp(prefix="numpyro-ensemble-jax-cache-")
        os.environ["NUMPYRO_ENSEMBLE_TEST_JAX_CACHE"] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


class ReleaseCompiledPrograms:
    """Every program XLA:CPU compiles keeps a few memory maps until it is freed, and
    jitted functions keep their programs: a worker that runs hundreds of tests reaches
    Linux's limit of 65,530 maps per process (``vm.max_map_count``), where the next
    compile segfaults. After any test (doctests included: a registered plugin, not a
    fixture) that leaves more than ``MAX_MAPS``, drop the compiled programs (JAX's
    caches and this package's registry of programs; the persistent cache keeps them
    cheap to get back)."""

    MAX_MAPS = int(os.environ.get("NUMPYRO_ENSEMBLE_TEST_MAX_MAPS", "30000"))

    @staticmethod
    def map_count() -> int:
        try:
            with open("/proc/self/maps", "rb") as maps:
                return sum(1 for _ in maps)
        except OSError:  # not Linux
            return 0

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item, nextitem):
        if self.map_count() > self.MAX_MAPS:
            from numpyro_ensemble import clear_compiled_programs

            clear_compiled_programs()
