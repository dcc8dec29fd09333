"""The ensemble axis, in one place.

Everything that maps a function over the ``E`` members of an ensemble goes through
:func:`map_members`; every other module calls it rather than ``jax.vmap``-ing on
its own. This module also owns what is per member and what is shared:

- the model's arguments: arrays are traced and shared by all members, Python
  values are static, and data wrapped in :func:`per_member` carries a leading
  ``(E,)`` axis that is split between the members;

Where members start (``init_params``, the identical-start check) is
:mod:`numpyro_ensemble.engine.starts`.
"""

from __future__ import annotations

from collections.abc import Callable
import numbers
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jaxtyping import PyTree
import numpy as np

from numpyro_ensemble.engine.sharding import shard_members

__all__ = ["PerMember", "per_member"]


# -- per-member data ---------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class PerMember:
    """Data that differs between members: every array leaf of ``value`` has a
    leading ``(E,)`` axis and member ``e`` sees ``value[e]``. Made by :func:`per_member`."""

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(children[0])

    def __repr__(self):
        return f"per_member({self.value!r})"


def per_member(value: PyTree) -> PerMember:
    """
    Marks a model argument as per-member data: every array leaf has a leading
    ``(E,)`` axis and member ``e`` of the ensemble is fitted on ``value[e]``.

    Everything not wrapped is shared by all members, as before. One compiled run
    then fits, e.g., ``E`` cross-validation folds or ``E`` bootstrap resamples
    (bagging); member ``e`` is exactly a plain ``SVI`` fitted on ``value[e]``.
    The inner shapes must agree between members (pad or resample folds to one size).

    **Example:**

    .. doctest::

        >>> import jax.numpy as jnp
        >>> from jax import random
        >>> import numpyro, numpyro.distributions as dist, optax
        >>> from numpyro_ensemble import EnsembleMAP, per_member

        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with numpyro.plate("data", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

        >>> y = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        >>> boot = random.choice(random.key(0), 6, (3, 6))   # 3 bootstrap resamples
        >>> ens = EnsembleMAP(model, optax.adam(0.1), ensemble_size=3, prior_weight=0.0)
        >>> result = ens.run(random.key(1), 500, per_member(y[boot]), progress_bar=False)
        >>> bool(jnp.allclose(ens.get_points(result.params)["mu"], y[boot].mean(1), atol=1e-3))
        True

    :param value: an array, or a pytree of arrays, with a leading ``(E,)`` axis.
    :return: the marked value, to pass as a model argument.
    """
    return PerMember(value)


def _is_per_member(leaf) -> bool:
    return isinstance(leaf, PerMember)


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


# -- splitting arguments into traced and static parts --------------------------------


class Static:
    """Hashable holder of the non-array parts of ``(args, kwargs)``, a static
    argument of ``jit``: two calls with equal static parts share compiled programs."""

    def __init__(self, treedef, entries):
        self.treedef = treedef
        self.entries = entries
        try:
            self._hash = hash((treedef, entries))
        except TypeError:  # an unhashable Python value: compare by identity
            self._hash = None

    def __hash__(self):
        return id(self) if self._hash is None else self._hash

    def __eq__(self, other):
        if not isinstance(other, Static) or self._hash is None or other._hash is None:
            return self is other
        return self.treedef == other.treedef and self.entries == other.entries


# Entries of ``Static.entries``, one per top-level leaf of ``(args, kwargs)``.
_SHARED = "shared"  # an array shared by all members: one traced argument
_MEMBER = "member"  # a ``PerMember``: ("member", inner treedef, number of arrays)


class SplitArgs(NamedTuple):
    """``(args, kwargs)`` split for ``jit``: ``dynamic`` are the arrays (traced),
    ``axes`` their member axis (0 for per-member data, None for shared), ``static``
    the rest (hashable)."""

    dynamic: tuple
    axes: tuple
    static: Static

    @property
    def has_per_member(self) -> bool:
        return any(axis == 0 for axis in self.axes)


def split_args(args: tuple, kwargs: dict) -> SplitArgs:
    """Split the model's arguments: arrays (and :func:`per_member` data) are traced,
    Python values (sizes, flags, callables) stay static, as they would be closed
    over by ``SVI.run``. Data given as a Python list of numbers is an error: JAX
    would compile every number into the program as a constant."""
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, value in named:
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value)
        ):
            raise TypeError(
                f"{name} is a Python list of numbers; pass data as an array, e.g. "
                f"jnp.asarray(...) (a static setting such as layer sizes can be a tuple)."
            )
    leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_per_member)
    dynamic, axes, entries = [], [], []
    for leaf in leaves:
        if _is_per_member(leaf):
            inner, inner_def = jax.tree.flatten(leaf.value)
            dynamic.extend(inner)
            axes.extend([0] * len(inner))
            entries.append((_MEMBER, inner_def, len(inner)))
        elif _is_array(leaf):
            dynamic.append(leaf)
            axes.append(None)
            entries.append(_SHARED)
        else:
            entries.append(leaf)
    return SplitArgs(tuple(dynamic), tuple(axes), Static(treedef, tuple(entries)))


def merge_args(dynamic, static: Static) -> tuple[tuple, dict]:
    """Inverse of :func:`split_args` for one member: per-member data comes back
    as the member's own (sliced) arrays, not wrapped."""
    dynamic = iter(dynamic)
    leaves = []
    for entry in static.entries:
        if isinstance(entry, tuple) and entry and entry[0] == _MEMBER:
            _, inner_def, count = entry
            leaves.append(jax.tree.unflatten(inner_def, [next(dynamic) for _ in range(count)]))
        elif isinstance(entry, str) and entry == _SHARED:
            leaves.append(next(dynamic))
        else:
            leaves.append(entry)
    return jax.tree.unflatten(static.treedef, leaves)


def check_per_member(split: SplitArgs, ensemble_size: int) -> None:
    """Every per-member array must have a leading axis of size ``ensemble_size``."""
    for leaf, axis in zip(split.dynamic, split.axes, strict=True):
        if axis == 0 and (np.ndim(leaf) == 0 or np.shape(leaf)[0] != ensemble_size):
            raise ValueError(
                f"per_member data must have a leading axis of size ensemble_size="
                f"{ensemble_size} on every array, got an array of shape {np.shape(leaf)}."
            )


def member_args(args: tuple, kwargs: dict, e: int) -> tuple[tuple, dict]:
    """The model arguments that member ``e`` sees (per-member data sliced)."""
    return jax.tree.map(
        lambda leaf: jax.tree.map(lambda v: v[e], leaf.value) if _is_per_member(leaf) else leaf,
        (args, kwargs),
        is_leaf=_is_per_member,
    )


def has_per_member(tree) -> bool:
    return any(_is_per_member(leaf) for leaf in jax.tree.leaves(tree, is_leaf=_is_per_member))


# -- mapping over members ---------------------------------------------------------------


def map_members(
    fn: Callable,
    mapped: PyTree,
    shared: PyTree = None,
    *,
    members_per_chunk: int | None = None,
) -> Any:
    """
    ``fn(member_slice_of_mapped, shared)`` for every member.

    Every leaf of ``mapped`` has a leading ``(E,)`` axis; ``shared`` is passed
    whole to every member. All members run at once (``jax.vmap``), or, with
    ``members_per_chunk=k``, in sequential groups of ``k`` vmapped members
    (``lax.map(..., batch_size=k)``), which bounds the memory of one step.
    """
    member_fn = lambda m: fn(m, shared)  # noqa: E731
    try:
        if members_per_chunk is None:
            return jax.vmap(member_fn)(mapped)
        return lax.map(member_fn, mapped, batch_size=members_per_chunk)
    except NotImplementedError as err:
        if "pure_callback" in str(err) and "vmap_method" in str(err):
            raise NotImplementedError(
                "A host callback (jax.pure_callback) in the model, guide or optimizer has "
                "no vmap_method, so JAX cannot map it over the ensemble's members: pass "
                "vmap_method='sequential' to jax.pure_callback (one host call per member), "
                "or 'expand_dims' / 'broadcast_all' if the callback handles a leading batch axis."
            ) from err
        raise


def apply_members(
    fn: Callable,
    mapped: PyTree,
    split: SplitArgs,
    *,
    mesh=None,
    members_per_chunk: int | None = None,
) -> Any:
    """
    ``fn(member_slice_of_mapped, args, kwargs)`` for every member, where ``args`` /
    ``kwargs`` are the model arguments that member sees (its slice of per-member
    data, shared data whole). With a ``mesh`` every device runs its own block of
    members; the outputs keep the member axis.
    """
    def local(mapped, member_dyn, shared_dyn):
        def one(m, shared):
            tree, dyn = m
            args, kwargs = merge_args(combine(dyn, shared, split.axes), split.static)
            return fn(tree, args, kwargs)

        return map_members(one, (mapped, member_dyn), shared_dyn, members_per_chunk=members_per_chunk)

    member_dyn, shared_dyn = partition(split.dynamic, split.axes)
    return shard_members(local, mesh, (True, True, False), True)(mapped, member_dyn, shared_dyn)


def apply_members_jitted(owner, key, build: Callable, mapped, split: SplitArgs) -> Any:
    """:func:`apply_members` of ``build()`` (the per-member function, built on the first
    call only) as one jitted program, compiled once per ``owner`` (an ensemble, whose
    mesh and ``members_per_chunk`` it uses), ``key`` (every setting the function's
    closure depends on) and the arguments' static part and axes: a second call with
    equal settings traces and compiles nothing (run eagerly, a mapped ``lax.scan`` in
    NumPyro's ``Predictive`` is a new program on every call)."""
    axes, static = split.axes, split.static
    mesh, members_per_chunk = owner.mesh, owner.members_per_chunk

    def program():
        fn = build()
        return lambda m, dynamic: apply_members(
            fn, m, SplitArgs(dynamic, axes, static), mesh=mesh, members_per_chunk=members_per_chunk
        )

    return owner_program(owner, ("apply_members", key, axes, static), program)(mapped, split.dynamic)


def owner_program(owner, key, build: Callable) -> Callable:
    """``jax.jit(build())``, built once per ``owner`` (an ensemble) and ``key`` (every
    setting the built function's closure depends on, e.g. the arguments' static part)."""
    programs = owner.__dict__.setdefault("_owner_programs", {})
    if key not in programs:
        programs[key] = jax.jit(build())
    return programs[key]


def partition(dynamic, axes) -> tuple[list, list]:
    """``dynamic`` as (per-member arrays, shared arrays), each in order."""
    mapped = [d for d, a in zip(dynamic, axes, strict=True) if a == 0]
    shared = [d for d, a in zip(dynamic, axes, strict=True) if a is None]
    return mapped, shared


def combine(mapped, shared, axes) -> list:
    """Inverse of :func:`partition`."""
    mapped, shared = iter(mapped), iter(shared)
    return [next(mapped) if a == 0 else next(shared) for a in axes]


def is_per_member_tree(tree: PyTree, ensemble_size: int) -> bool:
    """True if every array leaf of ``tree`` has a leading ``(E,)`` axis."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(
        np.ndim(leaf) > 0 and np.shape(leaf)[0] == ensemble_size for leaf in leaves
    )


def stack(trees: list) -> PyTree:
    """Stack a list of member pytrees along a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def take(tree: PyTree, e) -> PyTree:
    """Member ``e`` (or members ``e``, an index array) of a tree with an ``(E,)`` axis."""
    return jax.tree.map(lambda leaf: leaf[e], tree)

