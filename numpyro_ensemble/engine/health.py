"""Members whose params are not finite: excluded from draws, weights and export.

A member that diverged (NaN or infinite params) must not break what the other
members give: its draws, predictions and weights are left out, with one warning
naming it. The functions here find such members and make the params safe to trace
(NumPyro validates distribution arguments when it traces a member concretely).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ensemble.engine.checks import warn

__all__ = ["finite_members", "usable_params"]


def finite_members(params) -> np.ndarray:
    """``(E,)`` bool: member ``e`` has finite values in every floating leaf.

    Traced params (inside ``jax.jit``) cannot be inspected: every member counts as
    finite there, and a diverged member's draws come out non-finite by themselves."""
    leaves = jax.tree.leaves(params)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return np.ones(np.shape(leaves[0])[0], bool)
    flags = None
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        if getattr(leaf, "is_fully_addressable", True):  # NumPy on the host: nothing compiled
            ok = np.isfinite(np.reshape(np.asarray(leaf), (np.shape(leaf)[0], -1))).all(axis=1)
        else:
            ok = np.asarray(jnp.isfinite(jnp.reshape(leaf, (np.shape(leaf)[0], -1))).all(axis=1))
        flags = ok if flags is None else flags & ok
    if flags is None:
        return np.ones(np.shape(leaves[0])[0], bool)
    return flags


def usable_params(params, caller: str, quiet: bool = False) -> tuple[dict, np.ndarray]:
    """The params with each non-finite member replaced by the first finite one (so
    they can be traced), and the ``(E,)`` mask of finite members. Warns once, naming
    the excluded members; raises if no member is finite."""
    finite = finite_members(params)
    if finite.all():
        return params, finite
    bad = np.flatnonzero(~finite).tolist()
    if not finite.any():
        raise ValueError(
            f"{caller}: every member has non-finite params (members {bad}); nothing "
            f"can be drawn. Refit with stable_update=True or a smaller step size."
        )
    if not quiet:
        warn(
            f"{caller}: members {bad} of {finite.size} have non-finite params and are "
            f"excluded (weight 0; their draws are NaN).",
            RuntimeWarning,
        )
    source = int(np.flatnonzero(finite)[0])
    index = np.where(finite, np.arange(finite.size), source)
    return jax.tree.map(lambda leaf: jnp.asarray(leaf)[index], params), finite


def blank(tree, finite: np.ndarray):
    """``tree`` (leading member axis) with the excluded members' floating values set to NaN."""
    if finite.all():
        return tree

    def one(leaf):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            return leaf
        mask = jnp.reshape(jnp.asarray(finite), (-1,) + (1,) * (leaf.ndim - 1))
        return jnp.where(mask, leaf, jnp.nan)

    return jax.tree.map(one, tree)
