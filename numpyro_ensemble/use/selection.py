"""Taking members out of an ensemble and putting ensembles together.

Params, states and run results of an ensemble carry the members on the leading
axis of every array leaf. :func:`take_member` drops that axis, giving exactly what
a plain ``SVI`` run would hold, so one member works with NumPyro's own tools
(``guide.sample_posterior``, ``Predictive(guide, params=...)``, ``guide.median``,
``SVI.run(..., init_state=...)``); :func:`select_members` keeps a subset;
:func:`concat_members` grows an ensemble from fitted ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_ensemble.engine.checks import leading_sizes

__all__ = ["concat_members", "select_members", "take_member"]


def _size(tree, name: str) -> int | None:
    sizes = leading_sizes(tree)
    if not sizes:  # no array leaves (e.g. the params of a model without params)
        return None
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"{name} must have the same leading (member) axis on every array leaf, got "
            f"leading sizes {sorted(s for s in sizes if s is not None)}."
        )
    return sizes.pop()


def take_member(tree, e: int):
    """
    Member ``e`` of ensemble params, a state or a run result, without the member
    axis: ``take_member(result.params, 3)`` is what ``SVI.run`` would return as
    params for member 3, e.g. for ``guide.sample_posterior(key, params, sample_shape=(S,))``.

    :param tree: params, :data:`~numpyro.infer.svi.SVIState` or
        :data:`~numpyro.infer.svi.SVIRunResult` of an ensemble.
    :param int e: the member, ``0 <= e < E`` (negative counts from the end).
    """
    E = _size(tree, "tree")
    if E is None:
        return tree
    if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not -E <= e < E:
        raise IndexError(f"member index e must be an int in [-{E}, {E}), got {e!r}.")
    return jax.tree.map(lambda leaf: leaf[e], tree)


def select_members(tree, indices: Sequence[int]):
    """
    The members ``indices`` of ensemble params, a state or a run result, keeping the
    member axis (of size ``len(indices)``); use them with an ensemble of that size.

    :param tree: params, state or run result of an ensemble.
    :param indices: member indices (ints, or a boolean mask of length ``E``).
    """
    E = _size(tree, "tree")
    index = np.asarray(indices)
    if index.dtype == bool:
        if index.shape != (E,):
            raise ValueError(f"a boolean mask of members must have shape ({E},), got {index.shape}.")
        index = np.flatnonzero(index)
    if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty sequence of member indices, got {indices!r}.")
    if (index < -E).any() or (index >= E).any():
        raise IndexError(f"member indices must be in [-{E}, {E}), got {index.tolist()}.")
    return jax.tree.map(lambda leaf: jnp.asarray(leaf)[index], tree)


def concat_members(*trees):
    """
    One ensemble from several: params, states or run results of ensembles of the
    same model and guide, concatenated along the member axis (sizes add up).

    :param trees: two or more params / states / run results with the same structure.
    """
    if len(trees) < 2:
        raise ValueError(f"concat_members needs at least two ensembles, got {len(trees)}.")
    structure = jax.tree.structure(trees[0])
    for i, tree in enumerate(trees):
        _size(tree, f"trees[{i}]")
        if jax.tree.structure(tree) != structure:
            raise ValueError(
                f"trees[{i}] does not have the structure of trees[0] (another model, guide or "
                f"optimizer?): {jax.tree.structure(tree)} vs {structure}."
            )
        for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(tree), strict=True):
            if np.shape(a)[1:] != np.shape(b)[1:]:
                raise ValueError(
                    f"trees[{i}] has a leaf of member shape {np.shape(b)[1:]} where trees[0] "
                    f"has {np.shape(a)[1:]}."
                )
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves, axis=0), *trees)
