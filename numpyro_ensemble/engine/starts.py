"""Where members start: ``init_params`` per member or shared, the reference member
that fixes the params' shapes and constraints, and the check that members do not all
start from the same point."""

from __future__ import annotations

from collections.abc import Callable
import functools

import jax
from jax import random
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray
import numpy as np
from numpyro.distributions.distribution import validation_enabled
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.svi import SVI

from numpyro_ensemble.engine.checks import check_state_params, check_support, warn
from numpyro_ensemble.engine.members import map_members, member_args, merge_args, split_args
from numpyro_ensemble.engine.sharding import put

__all__ = ["IdenticalMembersWarning"]

# Folded into a member's key to give the key of a per-member ``init_params`` function.
_INIT_FN_TAG = 0x696E6974


def set_up(svi, rng_key, args, kwargs, need_reference):
    """Build the user's guide prototype and the param constraints of ``svi`` (an
    ``EnsembleSVI``) outside every transform (so later traced calls never store
    tracers in the guide), once per ensemble object: an AutoGuide's prototype
    concretely (NumPyro builds it op by op), the rest abstractly. Returns the
    reference params of one member (abstract values where found abstractly) when
    ``need_reference``."""
    if svi.constrain_fn is not None and not need_reference:
        return None
    args, kwargs = member_args(args, kwargs, 0)
    split = split_args(args, kwargs)

    def init(key, dynamic):
        member_args_, member_kwargs = merge_args(dynamic, split.static)
        state = SVI.init(svi, key, *member_args_, **member_kwargs)  # sets svi.constrain_fn
        return svi.constrain_fn(svi.optim.get_params(state.optim_state))

    # Without NumPyro's argument validation: the reference member's draws must not fail
    # where the traced members (never validated) do not.
    with validation_enabled(False):
        reference = None
        if not needs_prototype(svi.guide):
            # nothing left for the guide to keep: abstractly (no op-by-op programs),
            # unless the param constraints depend on traced values
            reference = jax.eval_shape(init, rng_key, split.dynamic)  # arrays traced, as in run
            if holds_tracer(svi.constrain_fn):
                reference = None
        if reference is None:
            reference = init(rng_key, split.dynamic)
    return reference


def needs_prototype(guide) -> bool:
    """Whether ``guide`` is an AutoGuide that has not built its prototype yet (which
    it keeps, so it must be built concretely)."""
    return isinstance(guide, AutoGuide) and guide.prototype_trace is None


def holds_tracer(fn) -> bool:
    """Whether a ``functools.partial`` (NumPyro's ``constrain_fn``) holds a traced
    value (a constraint computed from the model's arguments under a trace); anything
    else counts as holding one."""
    if not isinstance(fn, functools.partial):
        return True
    leaves = jax.tree.leaves((fn.args, fn.keywords))
    return any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)


def resume(svi, init_state):
    """``run(..., init_state=...)``, once the guide is set up (:func:`set_up`): the
    state must hold this model and guide's params; it is placed on the members' mesh."""
    check_state_params(svi.optim.get_params(init_state.optim_state), svi.constrain_fn)
    return put(init_state, svi.mesh, True)


def warn_once_if_identical(svi, flags, shared_names) -> None:
    """The :class:`IdenticalMembersWarning`, once per ensemble object."""
    if svi._warned_identical or svi.ensemble_size < 2:
        return
    names = identical_sites(flags, shared_names)
    if names:
        warn_identical(names, svi.ensemble_size, type(svi).__name__)
        svi._warned_identical = True


def member_init_params(init_params, keys, reference, constrain_fn, members_per_chunk=None):
    """``init_params`` (a dict, or a function of a key evaluated once per member
    with a key folded from the member's) with a leading ``(E,)`` axis on every
    leaf, checked against the params' supports, and the names of the shared sites."""
    if callable(init_params):
        init_keys = jax.vmap(lambda k: random.fold_in(k, _INIT_FN_TAG))(keys)
        init_params = init_params_from_fn(
            init_params, init_keys, members_per_chunk=members_per_chunk
        )
    init_params, shared_names = stack_init_params(init_params, reference, keys.shape[0])
    check_support(init_params, constrain_fn)
    return init_params, shared_names


# -- init_params ---------------------------------------------------------------------------


def stack_init_params(init_params: dict, reference: dict, ensemble_size: int) -> tuple[dict, list]:
    """
    ``init_params`` with a leading ``(E,)`` axis on every leaf, and the names of the
    sites given as one value shared by all members.

    A site's value may be a pytree (e.g. the params of a ``flax_module``); it must
    have the structure of the site's value in ``reference`` and, on every leaf,
    either the reference leaf's shape (shared by all members) or a leading
    ``(E,)`` axis on top of it (one value per member). A param that has no init
    value of its own (``numpyro.param("b")``, as plain ``SVI`` allows) takes the
    given value, shared.
    """
    if not isinstance(init_params, dict):
        raise TypeError(
            f"init_params must be a dict of param site values (or a function of a key "
            f"returning one), got {type(init_params).__name__}."
        )
    unknown = sorted(set(init_params) - set(reference))
    if unknown:
        raise ValueError(
            f"init_params has unknown names {unknown}; the param sites of this model "
            f"and guide are {sorted(reference)}."
        )
    E = ensemble_size
    stacked, shared = {}, []
    for name, value in init_params.items():
        if reference[name] is None:  # a param with no init value of its own: shared
            shared.append(name)
            stacked[name] = jax.tree.map(
                lambda leaf: jnp.broadcast_to(jnp.asarray(leaf), (E, *jnp.shape(leaf))), value
            )
            continue
        ref_leaves, ref_def = jax.tree.flatten(reference[name])
        leaves, treedef = jax.tree.flatten(value)
        if treedef != ref_def:
            raise ValueError(
                f"init_params[{name!r}] has the structure {treedef}; the param site "
                f"{name!r} has the structure {ref_def}."
            )
        leaves = [jnp.asarray(leaf) for leaf in leaves]
        shapes = [leaf.shape for leaf in leaves]
        ref_shapes = [tuple(np.shape(leaf)) for leaf in ref_leaves]
        if shapes == ref_shapes:  # shared by every member
            shared.append(name)
            leaves = [jnp.broadcast_to(v, (E, *s)) for v, s in zip(leaves, shapes, strict=True)]
        elif shapes != [(E, *s) for s in ref_shapes]:
            if len(ref_shapes) == 1:
                expected = f"{ref_shapes[0]} (shared by all members) or {(E, *ref_shapes[0])}"
            else:
                expected = "the site's leaf shapes (shared) or all of them with a leading (E,) axis"
            raise ValueError(
                f"init_params[{name!r}] has shape{'s' if len(shapes) > 1 else ''} "
                f"{shapes if len(shapes) > 1 else shapes[0]}; expected {expected} "
                f"(one value per member, ensemble_size={E})."
            )
        stacked[name] = jax.tree.unflatten(ref_def, leaves)
    return stacked, shared


def init_params_from_fn(init_fn: Callable[[PRNGKeyArray], dict], keys: PRNGKeyArray, **map_options):
    """Evaluate a per-member init function ``init_fn(rng_key) -> {site: value}``
    once per member (mapped over the members' keys)."""
    values = jax.jit(lambda ks: map_members(lambda k, _: init_fn(k), ks, **map_options))(keys)
    if not isinstance(values, dict):
        raise TypeError(
            f"an init_params function must return a dict of param site values, got "
            f"{type(values).__name__}."
        )
    return values


# -- members that start identical ----------------------------------------------------------


class IdenticalMembersWarning(UserWarning):
    """Members of an ensemble start from the same point: the ensemble then spends ``E``
    times the compute on (nearly) one fit. Filter it with ``warnings.filterwarnings``
    if that is what you want."""


def _structured(leaf):
    """A member's value is constant, or a constant times the identity (a scale
    matrix's init, e.g. ``AutoMultivariateNormal``'s ``init_scale * I``)."""
    flat = leaf.reshape(leaf.shape[0], -1)
    if not flat.shape[1]:
        return jnp.array(True)
    constant = jnp.all(flat == flat[:, :1])
    if leaf.ndim >= 3 and leaf.shape[-1] == leaf.shape[-2]:
        eye = jnp.eye(leaf.shape[-1], dtype=bool)
        diagonal = jnp.diagonal(leaf, axis1=-2, axis2=-1)
        scaled_eye = jnp.all(jnp.where(eye, leaf == diagonal[..., :1, None], leaf == 0))
        return constant | scaled_eye
    return constant


def identical_flags(params: dict) -> dict:
    """Per site: (identical in all members, structured within each member: constant
    or a constant times the identity); traceable."""

    def flags(leaves):
        same = jnp.all(jnp.stack([jnp.all(leaf == leaf[:1]) for leaf in leaves]))
        constant = jnp.all(jnp.stack([_structured(leaf) for leaf in leaves]))
        return same, constant

    return {name: flags(jax.tree.leaves(value)) for name, value in params.items() if jax.tree.leaves(value)}


def identical_sites(flags: dict, explicit_shared=()) -> list[str]:
    """
    The param sites whose start makes members (nearly) copies of each other, from the
    :func:`identical_flags` of the members' initial params.

    All sites are returned when every member starts from the same point. Otherwise
    a site is returned when it is identical in all members but varies within a
    member (a random-looking init shared by all members, e.g. the weights of an
    eagerly built ``nnx``/``equinox`` network); sites that are constant within a
    member (scales, zero biases) or a constant times the identity (a scale matrix)
    and sites given as shared ``init_params`` are left out.
    """
    flags = jax.device_get(flags)
    same = {name for name, (s, _) in flags.items() if s}
    if same and same == set(flags):
        return sorted(same)
    return sorted(
        name for name in same if not flags[name][1] and name not in set(explicit_shared)
    )


def warn_identical(names: list[str], ensemble_size: int, cls_name: str) -> None:
    warn(
        f"{cls_name}: the param sites {names} start identical in all {ensemble_size} "
        f"members, so the members may stay (nearly) copies of one fit. Give each member "
        f"its own start: pass init_params as a function rng_key -> {{site: value}} (it is "
        f"evaluated once per member, e.g. building an nnx/equinox network from the key) "
        f"or as values with a leading (E,) axis; use a key-dependent init "
        f"(numpyro.param(name, lambda key: ...), init_to_sample / init_to_median instead "
        f"of init_to_value); or flax_module / haiku_module, whose init draws from "
        f"NumPyro's key. With random_*_module priors under EnsembleMAP members start "
        f"from their own prior draws.",
        IdenticalMembersWarning,
    )
