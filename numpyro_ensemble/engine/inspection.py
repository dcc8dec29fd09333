"""What the ensemble needs to know about a model, found once per argument shapes.

The model is traced abstractly (``jax.eval_shape``: no compile, no computation) on
the shapes and static values of its arguments, and the result is cached, so a
second ``init`` / ``run`` with the same shapes does not trace the model again for
its checks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace

from numpyro_ensemble.engine.batching import Plate, subsampled_plates
from numpyro_ensemble.engine.members import SplitArgs, merge_args

__all__ = ["ModelInfo", "inspect_model"]

_CACHE_SIZE = 64
_cache: OrderedDict = OrderedDict()


class ModelInfo(NamedTuple):
    """Sites of one model trace, in the order the model visits them."""

    latent: tuple[str, ...]
    """Latent sample sites (not observed)."""
    discrete: tuple[str, ...]
    """Latent sample sites with a discrete support."""
    observed: tuple[str, ...]
    """Observed sample sites, ``numpyro.factor`` sites included."""
    plates: tuple[Plate, ...]
    """Plates with ``subsample_size < size``, by name."""
    params: tuple[str, ...] = ()
    """The model's own ``numpyro.param`` sites (e.g. a ``flax_module``'s weights):
    fitted per member, so everything that runs the model after the fit takes them
    from the member's params."""
    size: int = 0
    """The number of values in the latent sites and the model's params (one member)."""
    error: Exception | None = None
    """Why the model could not be traced on its own (e.g. it reads a ``numpyro.param``
    that only the guide initialises, which plain ``SVI`` allows); then nothing else
    is known and mini-batches are left to NumPyro."""


def _member_avals(split: SplitArgs):
    """Abstract values of one member's arrays (per-member data without its ``(E,)`` axis)."""
    return [
        jax.ShapeDtypeStruct(leaf.shape[1:] if axis == 0 else leaf.shape, leaf.dtype)
        for leaf, axis in zip(split.dynamic, split.axes, strict=True)
    ]


def signature(model, split: SplitArgs, static_kwargs: dict):
    """A hashable key of the model and the shapes and static values of its arguments."""
    avals = tuple(
        (tuple(leaf.shape), str(leaf.dtype), axis)
        for leaf, axis in zip(split.dynamic, split.axes, strict=True)
    )
    try:
        kwargs = tuple(sorted(static_kwargs.items()))
        hash(kwargs)
    except TypeError:
        kwargs = id(static_kwargs)
    return (model, split.static, avals, kwargs)


def _improper_value(site):
    """A value for an improper (``ImproperUniform``) latent site, which cannot be sampled."""
    fn = site.get("fn")
    if site["type"] != "sample" or site.get("is_observed") or fn is None:
        return None
    base = fn
    while isinstance(base, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        base = base.base_dist
    if not isinstance(base, dist.ImproperUniform):
        return None
    return biject_to(fn.support)(jnp.zeros(fn.shape()))


def inspect_model(model, split: SplitArgs, static_kwargs: dict) -> ModelInfo:
    """The :class:`ModelInfo` of ``model`` on one member's arguments (cached per shapes)."""
    key = signature(model, split, static_kwargs)
    try:
        info = _cache.get(key)
    except TypeError:  # an unhashable static value
        key, info = None, None
    if info is not None:
        _cache.move_to_end(key)
        return info

    found = {}

    def trace_model(dynamic):
        args, kwargs = merge_args(dynamic, split.static)
        model_trace = trace(substitute(seed(model, 0), substitute_fn=_improper_value)).get_trace(
            *args, **kwargs, **static_kwargs
        )
        latent, discrete, observed = [], [], []
        params = [name for name, site in model_trace.items() if site["type"] == "param"]
        for name, site in model_trace.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                observed.append(name)
                continue
            latent.append(name)
            if site["fn"].support.is_discrete:
                discrete.append(name)
        size = sum(  # a param's value may be a pytree (a network's weights)
            int(jnp.size(leaf))
            for name in latent + params
            for leaf in jax.tree.leaves(model_trace[name]["value"])
        )
        found["info"] = ModelInfo(
            tuple(latent), tuple(discrete), tuple(observed), subsampled_plates(model_trace),
            params=tuple(params), size=size,
        )

    try:
        jax.eval_shape(trace_model, _member_avals(split))
        info = found["info"]
    except Exception as err:  # the guide's params are needed (SVI.init will tell)
        info = ModelInfo((), (), (), (), error=err)
    if key is not None:
        _cache[key] = info
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return info
