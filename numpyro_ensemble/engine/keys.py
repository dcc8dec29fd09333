"""What a compiled program is keyed by: settings where they can be read, identity otherwise.

An optimizer or loss built again with equal settings (``optax.adam(1e-3)`` in a new
notebook cell, a new ``Trace_ELBO()``) reuses the programs compiled for the first one. Settings are read from what defines the behaviour:

- an optax transformation is a tuple of closures: a function is keyed by its code
  object (by identity: the one its factory defines) and the values its closure and
  defaults hold, recursively (numbers, strings, tuples, dicts, ``functools.partial``,
  small arrays by value; anything else by identity);
- a NumPyro optimizer by its ``init_fn`` / ``update_fn`` / ``get_params_fn`` closures;
- a loss by its type and attributes (per-member arrays by shape, see
  :func:`~numpyro_ensemble.engine.hyper.program_value`);
- an AutoGuide by its type, the settings it was made with (read when an ensemble
  first sees it, before its set-up) and what its set-up found (:func:`guide_key`): an
  AutoGuide keeps its set-up (the prototype trace, the shapes of local latent
  sites, the sites' supports) for the data it was first called with, and the
  programs trace the first guide of a configuration, so two guides share programs
  only if their set-ups agree in every site's shape, dtype and support; any other
  guide by identity.

Keys err towards identity: two objects get one key only if every value that defines
them is equal, so a shared program computes exactly what a new one would.
"""

from __future__ import annotations

import functools
import numbers
import types
import weakref

import jax
import numpy as np
from numpyro.infer.autoguide import AutoGuide
from numpyro.optim import _NumPyroOptim

from numpyro_ensemble.engine import hyper

__all__: list[str] = []

# Arrays up to this many elements in a closure are keyed by value, larger ones by identity.
ARRAY_VALUES = 4096
# How deep settings are followed (closures of closures ...) before identity is used.
MAX_DEPTH = 32


def hashable(value):
    """``value`` if it is hashable, else its identity: a part of a program key."""
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def identity(value):
    return ("id", id(value))


def settings(value, depth: int = 0, stack: tuple = ()):
    """A hashable key equal for values with equal settings (see the module's docstring)."""
    if depth > MAX_DEPTH or any(value is seen for seen in stack):
        return identity(value)
    stack = (*stack, value)
    nested = functools.partial(settings, depth=depth + 1, stack=stack)
    if value is None or isinstance(value, (bool, str, bytes, numbers.Number, type)):
        return (type(value), value)
    if isinstance(value, (np.ndarray, jax.Array)) and not isinstance(value, jax.core.Tracer):
        if np.size(value) > ARRAY_VALUES or jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            return identity(value)
        host = np.asarray(value)
        return ("array", host.shape, str(host.dtype), host.tobytes())
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(nested(v) for v in value))
    if isinstance(value, dict):
        try:
            items = sorted(value.items())
        except TypeError:
            return identity(value)
        return (dict, tuple((hashable(k), nested(v)) for k, v in items))
    if isinstance(value, functools.partial):
        return (functools.partial, nested(value.func), nested(value.args), nested(value.keywords))
    if isinstance(value, types.FunctionType):
        try:
            cells = tuple(nested(cell.cell_contents) for cell in value.__closure__ or ())
        except ValueError:  # an empty cell
            return identity(value)
        return (
            "function",
            id(value.__code__),
            cells,
            nested(value.__defaults__),
            nested(value.__kwdefaults__),
        )
    if isinstance(value, types.BuiltinFunctionType):
        return hashable(value)
    return identity(value)


def optimizer_key(optim):
    """A program key of an optax transformation or NumPyro optimizer."""
    if isinstance(optim, _NumPyroOptim):
        return (type(optim), settings(tuple(sorted(vars(optim).items()))))
    if isinstance(optim, tuple):  # optax's GradientTransformation(ExtraArgs)
        return settings(optim)
    return hashable(optim)


def loss_key(loss):
    """Losses of one type with equal settings compile to the same program."""
    try:
        values = tuple(sorted((k, hyper.program_value(v)) for k, v in vars(loss).items()))
        hash(values)
    except TypeError:
        return identity(loss)
    return (type(loss), values)


_made_with: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def guide_settings(guide):
    """What an AutoGuide was made with (its attributes when an ensemble first saw it,
    before its set-up), or ``None`` (keyed by identity) for any other guide or one
    already set up by then; the same for every ensemble made with the guide."""
    if not isinstance(guide, AutoGuide):
        return None
    if guide not in _made_with:
        fresh = guide.prototype_trace is None
        _made_with[guide] = (type(guide), settings(tuple(sorted(vars(guide).items())))) if fresh else None
    return _made_with[guide]


def guide_key(guide, made_with):
    """A program key of ``guide``, set up, from :func:`guide_settings` (``made_with``)
    and its prototype: every site's type, shape, dtype and support, the plates' sizes."""
    if made_with is None or getattr(guide, "prototype_trace", None) is None:
        return identity(guide)
    sites = []
    for name, site in guide.prototype_trace.items():
        shapes = jax.tree.map(
            lambda v: (np.shape(v), str(jax.numpy.result_type(v))), site.get("value")
        )
        support = None
        if site["type"] == "sample":
            try:
                support = _constraint_key(site["fn"].support)
            except Exception:  # a support that cannot be read: keyed by identity
                return identity(guide)
        sites.append((name, site["type"], bool(site.get("is_observed")), settings(shapes), support))
    plates = tuple(sorted(guide._prototype_frame_full_sizes.items()))
    return (made_with, tuple(sites), settings(plates))


def _constraint_key(constraint):
    """A constraint by its type and values (NumPyro's constraints are pytrees)."""
    leaves, treedef = jax.tree.flatten(constraint)
    return (type(constraint), str(treedef), settings(tuple(leaves)))
