"""JAX's persistent compilation cache, turned on explicitly; compiled programs dropped."""

from __future__ import annotations

import gc
import os

import jax

from numpyro_ensemble.engine import loop

__all__ = ["clear_compiled_programs", "enable_compilation_cache"]


def enable_compilation_cache(path: str | os.PathLike, *, min_compile_time_secs: float = 0.0) -> str:
    """
    Turns on JAX's persistent compilation cache in ``path``, so that a new process
    loads the programs an earlier one compiled instead of compiling them again.

    This sets JAX's global options ``jax_compilation_cache_dir``,
    ``jax_persistent_cache_min_compile_time_secs`` and
    ``jax_persistent_cache_min_entry_size_bytes`` (for the whole process, every
    library included): nothing in ``numpyro_ensemble`` sets them otherwise. With
    the default ``min_compile_time_secs=0`` the many small programs NumPyro
    compiles while it sets a guide up (one per operation, run eagerly) are cached
    too, which is most of a first call's time for small models; JAX's own default
    caches only programs that took over a second to compile.

    .. note:: NumPyro's ``Trace_ELBO`` (0.22) adds its sites' terms in the order of a
        Python ``set``, which changes from process to process with Python's hash
        randomisation. The ensembles add them by name instead (for ``Trace_ELBO``
        and :class:`~numpyro_ensemble.TemperedTrace_ELBO`), so their programs, and
        their numbers, are the same in every process and a second process loads
        them from the cache. A plain ``SVI`` with NumPyro's ``Trace_ELBO`` still
        needs a fixed ``PYTHONHASHSEED`` (e.g. ``PYTHONHASHSEED=0 python fit.py``).

    **Example:** (at the top of a script)

    .. code-block:: python

        from numpyro_ensemble import enable_compilation_cache

        enable_compilation_cache("~/.cache/numpyro-ensemble")

    :param path: a directory (created if missing; ``~`` is expanded).
    :param float min_compile_time_secs: cache only programs whose compilation took
        at least this long.
    :return: the directory, as an absolute path.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def clear_compiled_programs() -> None:
    """
    Drops every compiled program: those this package shares between ensembles of one
    configuration, and JAX's (``jax.clear_caches()``). Ensembles stay usable; their
    next call compiles again (or loads from the persistent cache, see
    :func:`enable_compilation_cache`).

    Compiled programs are kept for the life of the process, each with its memory and,
    on the CPU, a few memory maps. A long process that fits many configurations (a
    sweep over models or sizes, a benchmark over many posteriors) can reach Linux's
    limit of 65,530 maps per process (``vm.max_map_count``), where XLA fails to
    compile ("LLVM compilation error: Cannot allocate memory") or crashes. Call this
    between configurations that will not be used again.

    **Example:**

    .. code-block:: python

        for model, data in problems:
            fit(model, data)
            clear_compiled_programs()
    """
    loop.clear_programs()
    jax.clear_caches()
    gc.collect()
