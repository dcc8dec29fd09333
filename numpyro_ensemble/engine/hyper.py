"""Per-member hyperparameters: one compiled run sweeps E values.

Three hyperparameters can differ between members, each given as an ``(E,)`` array
where a scalar is usually passed (member ``e`` uses value ``e``; a scalar behaves
as before):

- ``TemperedTrace_ELBO(kl_weight=...)`` (and so ``EnsembleMAP(prior_weight=...)``);
- numeric hyperparameters of an optimizer built with ``optax.inject_hyperparams``
  (optax's own idiom for hyperparameters that live in the optimizer state), e.g.
  ``optax.inject_hyperparams(optax.adam)(learning_rate=jnp.array([...]))``: every
  numeric hyperparameter of shape ``(E,)`` is split over the members.

The values are passed to the compiled programs as per-member arguments, so a sweep
of new values of the same length compiles nothing.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = []


def find_nodes(tree, kinds: tuple) -> list:
    """The nodes of ``tree`` (e.g. an optimizer state) that are instances of ``kinds``."""
    found = []

    def visit(node):
        if isinstance(node, kinds):
            found.append(node)
        return node

    jax.tree.map(visit, tree, is_leaf=lambda node: isinstance(node, kinds))
    return found


def _inject_states(tree):
    """The ``optax.inject_hyperparams`` states inside an optimizer state."""
    kinds = tuple(
        cls
        for cls in (
            getattr(optax, "InjectHyperparamsState", None),
            getattr(optax, "InjectStatefulHyperparamsState", None),
        )
        if cls is not None
    )
    return kinds, find_nodes(tree, kinds)


def optimizer_hyperparams(optim) -> dict:
    """Numeric hyperparameters with one axis of an ``optax.inject_hyperparams`` optimizer
    (found from its state at empty params; nothing is compiled)."""
    if not isinstance(optim, optax.GradientTransformation):
        return {}
    try:
        state = optim.init({})
    except Exception:  # an optimizer that needs params to initialise: nothing to split
        return {}
    _, states = _inject_states(state)
    found = {}
    for inject in states:
        for name, value in inject.hyperparams.items():
            if hasattr(value, "shape") and np.ndim(value) == 1:
                found[name] = value
            elif hasattr(value, "shape") and np.ndim(value) > 1:
                raise ValueError(
                    f"the optimizer's hyperparameter {name} has shape {np.shape(value)}: "
                    f"give a scalar or a 1-D (E,) array (one value per member)."
                )
    return found


def loss_hyperparams(loss) -> dict:
    """``kl_weight`` of a tempered loss when it is an array (one value per member)."""
    value = getattr(loss, "kl_weight", None)
    if value is not None and np.ndim(value) == 1:
        return {"kl_weight": jnp.asarray(value, jnp.result_type(float))}
    return {}


def check(loss, optim, ensemble_size: int) -> dict:
    """The per-member hyperparameters of ``loss`` and ``optim``, each checked to have
    length ``ensemble_size``; raised before anything is compiled."""
    # the loss's values checked as given: converting them to JAX's float type compiles
    value = getattr(loss, "kl_weight", None)
    if value is not None and np.ndim(value) == 1 and np.shape(value)[0] != ensemble_size:
        raise ValueError(
            f"kl_weight has {np.shape(value)[0]} values, but ensemble_size={ensemble_size}: "
            f"give one value per member or a scalar."
        )
    found = loss_hyperparams(loss)
    for name, value in optimizer_hyperparams(optim).items():
        if np.shape(value)[0] != ensemble_size:
            raise ValueError(
                f"the optimizer's hyperparameter {name} has {np.shape(value)[0]} values "
                f"(shape {np.shape(value)}), but ensemble_size={ensemble_size}: give one "
                f"value per member or a scalar."
            )
    return found


def member_loss(loss, hyperparams: dict):
    """``loss`` with member ``e``'s scalar values (traced) in place of its arrays."""
    if not hyperparams:
        return loss
    member = copy.copy(loss)
    for name, value in hyperparams.items():
        setattr(member, name, value)
    return member


def split_optimizer_state(optim_state, ensemble_size: int):
    """After the members' init, every member holds the whole ``(E,)`` array of an
    injected hyperparameter (``(E, E)`` in all); keep member ``e``'s own value."""
    kinds, states = _inject_states(optim_state)
    if not states:
        return optim_state
    diagonal = jnp.arange(ensemble_size)

    def split(node):
        if not isinstance(node, kinds):
            return node
        hyperparams = {
            name: value[diagonal, diagonal]
            if jnp.ndim(value) == 2 and value.shape == (ensemble_size, ensemble_size)
            else value
            for name, value in node.hyperparams.items()
        }
        return node._replace(hyperparams=hyperparams)

    return jax.tree.map(split, optim_state, is_leaf=lambda node: isinstance(node, kinds))


def program_value(value):
    """How a per-member array enters a program key: its shape, not its values."""
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 1:
        return ("per-member", np.shape(value), str(np.asarray(value).dtype))
    return value
