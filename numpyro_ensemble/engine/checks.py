"""Argument checks shared by the public classes.

Every check raises before anything is traced or compiled, and its message names
the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import jax
import numpy as np

# the package root (numpyro_ensemble/), above this layer
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_positive_int(value, name: str) -> int:
    """``ensemble_size``, ``num_steps``, ``num_samples``, ``num_chains``: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a positive int, got {value!r} of type {type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}.")
    return int(value)


def check_weight(value, name: str, per_member: bool = False, ensemble_size: int | None = None):
    """A tempering weight: a finite number >= 0 (a traced value is passed through);
    with ``per_member``, also a 1-D array of them, one per member (``ensemble_size``
    of them, where it is known)."""
    if isinstance(value, jax.core.Tracer):
        return value
    if per_member and not isinstance(value, (str, bytes)) and np.ndim(value) > 1:
        raise ValueError(
            f"{name} must be a finite number >= 0 or a 1-D (E,) array of them (one per "
            f"member), got an array of shape {np.shape(value)}."
        )
    if per_member and not isinstance(value, (str, bytes)) and np.ndim(value) == 1:
        try:
            values = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be finite numbers >= 0, got {value!r}.") from None
        if values.size == 0 or not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(
                f"{name} must be a finite number >= 0 or an (E,) array of them, got "
                f"{values.tolist()}."
            )
        if ensemble_size is not None and values.shape[0] != ensemble_size:
            raise ValueError(
                f"{name} has {values.shape[0]} values, but ensemble_size={ensemble_size}: "
                f"give one value per member or a scalar."
            )
        return values
    if isinstance(value, (str, bytes)) or (
        not isinstance(value, numbers.Real) and np.ndim(value) != 0
    ):
        raise TypeError(
            f"{name} must be a finite number >= 0, got {value!r} of type "
            f"{type(value).__name__}."
        )
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a finite number >= 0, got {value!r} of type "
            f"{type(value).__name__}."
        ) from None
    if not math.isfinite(as_float) or as_float < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {as_float}.")
    return as_float


def check_key(rng_key, name: str = "rng_key"):
    """One JAX PRNG key: a typed key (``jax.random.key``) or, as NumPyro accepts, a
    legacy ``uint32`` key (``jax.random.PRNGKey``)."""
    dtype = getattr(rng_key, "dtype", None)
    shape = np.shape(rng_key) if dtype is not None else None
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return rng_key
        found = f"an array of {shape[0] if len(shape) == 1 else shape} typed keys"
    elif dtype is not None and np.dtype(dtype) == np.uint32 and len(shape) == 1:
        return rng_key  # a legacy key; its implementation checks the length
    elif dtype is not None and np.dtype(dtype) == np.uint32:
        found = f"a uint32 array of shape {shape} (several legacy keys?)"
    else:
        found = f"{rng_key!r} of type {type(rng_key).__name__}"
    raise TypeError(
        f"{name} must be one JAX PRNG key, e.g. jax.random.key(0) (a legacy "
        f"jax.random.PRNGKey(0) works too), got {found}."
    )


def check_discrete_sites(ensemble, info) -> None:
    """Discrete latent sites under a continuous AutoGuide built on the model: name the
    sites and the remedies. NumPyro's own error comes late (once the members' init is
    traced and compiled) and reads differently with and without funsor installed (an
    ImportError asking for funsor, or "Continuous inference cannot handle discrete
    sample site"), but the guide cannot fit such a site either way: only
    ``TraceEnum_ELBO`` marginalises it, so that loss is left to NumPyro."""
    from numpyro.infer import TraceEnum_ELBO
    from numpyro.infer.autoguide import AutoGuide

    guide = ensemble.guide
    if (
        info.discrete
        and isinstance(guide, AutoGuide)
        and getattr(guide, "model", None) is ensemble.model
        and not isinstance(ensemble.loss, TraceEnum_ELBO)
    ):
        sites = list(info.discrete)
        raise ValueError(
            f"{type(ensemble).__name__}: the model has discrete latent sites {sites}, which "
            f"{type(guide).__name__} (a continuous guide) cannot fit. Marginalise them "
            f"out in the model (e.g. dist.MixtureSameFamily); or enumerate them with "
            f"TraceEnum_ELBO (pip install funsor; mark them infer={{'enumerate': "
            f"'parallel'}}); or hide them from the guide, e.g. "
            f"{type(guide).__name__}(numpyro.handlers.block(model, hide={sites})), so "
            f"the model draws them from their prior."
        )


def check_something_to_fit(ensemble, info) -> None:
    """A model with no latent sample sites and no ``numpyro.param`` sites under a guide
    built on it (an AutoGuide, ``EnsembleMAP``'s AutoDelta): nothing at all to fit.
    (A model with params but no latent sites, e.g. a network fitted by maximum
    likelihood, is fitted as usual: its params are the members' params.)"""
    from numpyro.infer.autoguide import AutoGuide

    guide = ensemble.guide
    if (
        info.error is None
        and not info.latent
        and not info.params
        and isinstance(guide, AutoGuide)
        and getattr(guide, "model", None) is ensemble.model
    ):
        observed = f" {list(info.observed)}" if info.observed else ""
        raise ValueError(
            f"{type(ensemble).__name__}: the model has no latent sample sites (every "
            f"sample site{observed} is observed) and no numpyro.param sites, so "
            f"{type(guide).__name__} has nothing to fit: with every unknown observed "
            f"there is nothing to infer (numpyro.infer.util.log_density evaluates the "
            f"model). Give the unknowns a prior (numpyro.sample without obs=), or declare "
            f"the values to fit without one with numpyro.param (the members then fit "
            f"them, e.g. by maximum likelihood with EnsembleMAP)."
        )


def check_num_particles(loss) -> None:
    """A loss's ``num_particles``: an int >= 1 (NumPyro accepts 0, and every loss is
    then non-finite)."""
    if hasattr(loss, "num_particles"):
        value = loss.num_particles
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(
                f"the loss's num_particles must be an int >= 1 (one value for all "
                f"members), got {value!r}: e.g. {type(loss).__name__}(num_particles=1)."
            )


def leading_sizes(tree) -> set:
    """The set of leading-axis sizes over the array leaves of ``tree`` (None for scalars)."""
    return {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside this package."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def check_learning_rate(value, name: str = "learning_rate") -> float:
    """A step size: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {value!r} of type {type(value).__name__}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return float(value)


def check_instance(value, name: str, example: str, method: str):
    """``guide`` / ``loss`` given as a class or a string instead of an instance."""
    if isinstance(value, type):
        raise TypeError(
            f"{name} must be an instance, e.g. {example}, got the class {value.__name__} itself."
        )
    if isinstance(value, (str, bytes)) or not hasattr(value, method):
        raise TypeError(f"{name} must be an object like {example}, got {value!r}.")
    return value


def check_params_tree(params, ensemble_size: int, name: str = "params") -> None:
    """Params (or points) of this ensemble: a dict with a leading ``(E,)`` axis on
    every leaf; a whole ``SVIRunResult`` or ``SVIState`` is a clear error."""
    from numpyro.infer.svi import SVIRunResult, SVIState

    if isinstance(params, SVIRunResult):
        raise TypeError(
            f"{name} must be the params dict, got a whole SVIRunResult: pass result.params."
        )
    if isinstance(params, SVIState):
        raise TypeError(
            f"{name} must be the params dict, got an SVIState: pass ensemble.get_params(state)."
        )
    if not isinstance(params, dict):
        raise TypeError(f"{name} must be a dict of arrays, got {type(params).__name__}.")
    sizes = leading_sizes(params)
    if sizes != {ensemble_size}:
        raise ValueError(
            f"{name} must have a leading axis of size ensemble_size={ensemble_size} on every "
            f"leaf (e.g. run(...).params), got leading sizes "
            f"{sorted(s for s in sizes if s is not None)}."
        )


def check_param_names(params: dict, ensemble, name: str = "params", hint: str = "") -> None:
    """``params`` hold every param of ``ensemble`` (the names ``init`` found, in
    ``constrain_fn``): NumPyro would silently give a missing one its init value (e.g.
    the points' params of an EnsembleMAP passed with its Laplace members). ``hint``
    replaces the default advice. Not checked before ``init``."""
    transforms = getattr(getattr(ensemble, "constrain_fn", None), "args", (None,))[0]
    if not isinstance(transforms, dict) or not isinstance(params, dict):
        return
    missing = sorted(set(transforms) - set(params))
    if not missing:
        return
    hint = hint or "pass this ensemble's params, e.g. its run(...).params or get_params(state)"
    raise ValueError(
        f"{name} has no values for {missing}, params of this {type(ensemble).__name__} "
        f"(it holds {sorted(params)}): {hint}."
    )


def check_init_values(init_params: dict) -> None:
    """``init_params`` values: numeric and finite (before anything is compiled)."""
    for name, value in init_params.items():
        for leaf in jax.tree.leaves(value):
            if isinstance(leaf, (str, bytes)) or not np.issubdtype(np.asarray(leaf).dtype, np.number):
                raise TypeError(
                    f"init_params[{name!r}] must hold numbers, got {leaf!r} of type "
                    f"{type(leaf).__name__}."
                )
            if not isinstance(leaf, jax.core.Tracer) and not np.isfinite(np.asarray(leaf)).all():
                raise ValueError(f"init_params[{name!r}] has non-finite values (NaN or inf).")


def check_support(init_params: dict, constrain_fn) -> None:
    """Each ``init_params`` value inside its param's support: NumPyro's ``SVI.init``
    keeps the params' transforms in ``constrain_fn = partial(transform_fn, transforms)``."""
    transforms = getattr(constrain_fn, "args", (None,))[0]
    if not isinstance(transforms, dict):
        return
    for name, value in init_params.items():
        transform = transforms.get(name)
        if transform is None or isinstance(value, jax.core.Tracer) or not hasattr(value, "shape"):
            continue
        with np.errstate(all="ignore"):
            inside = np.isfinite(np.asarray(transform.inv(value))).all()
        if not inside:
            raise ValueError(
                f"init_params[{name!r}] is outside the param's support "
                f"({getattr(transform, 'codomain', 'its constraint')}); e.g. scales must be > 0."
            )


def check_state_params(state_params, constrain_fn) -> None:
    """``init_state`` made by this model and guide: the same param names."""
    transforms = getattr(constrain_fn, "args", (None,))[0]
    if not isinstance(transforms, dict) or not isinstance(state_params, dict):
        return
    if set(state_params) != set(transforms):
        raise ValueError(
            f"init_state holds the params {sorted(state_params)}, but this model and guide "
            f"have {sorted(transforms)}: pass a state made by an ensemble of the same "
            f"model and guide."
        )


def check_state(svi_state, name: str, ensemble_size: int, owner: str) -> None:
    """An ensemble state of this size (``init_state``, ``svi_state``)."""
    from numpyro.infer.svi import SVIState

    if not isinstance(svi_state, SVIState):
        raise TypeError(f"{name} must be an SVIState, got {type(svi_state).__name__}.")
    sizes = leading_sizes(svi_state)
    if sizes != {ensemble_size}:
        found = sorted(sizes, key=lambda s: -1 if s is None else s)
        raise ValueError(
            f"{name} has leading axis sizes {found}, but this {owner} has "
            f"ensemble_size={ensemble_size}: pass a state made by an ensemble of the same size."
        )
