"""Mini-batch indices for subsampled plates, drawn per member by the ensemble itself.

A model that subsamples with ``numpyro.plate(name, N, subsample_size=B)`` lets
NumPyro draw ``B`` indices without replacement at every step: a sequential
Fisher-Yates scan of ``B`` steps on CPU and a full permutation of ``N`` on
accelerators, which costs more than the step itself on small models. Instead
:meth:`~numpyro_ensemble.EnsembleSVI.run` supplies the indices of every
subsampled plate (through NumPyro's ``substitute`` handler, as ``HMCECS`` does)
from a cheap per-member stream:

- ``"epoch"`` (default): each member shuffles the ``N`` points once per epoch
  (one permutation per member per epoch, made when an epoch starts) and takes
  consecutive slices of ``B``; every point is used once per epoch. Epochs run
  on without a gap: a batch that crosses the end of an epoch takes its last
  points from the next epoch's shuffle.
- ``"iid"``: ``B`` indices drawn uniformly with replacement at every step.
- ``"numpyro"``: NumPyro draws them, exactly as a plain ``SVI`` run does.

The plate keeps its scale ``N / B``, so every batch loss is an unbiased estimate of
the full-data loss. The stream of member ``e`` is a function of its key
(``EnsembleSVI.member_keys(rng_key)[e]``) and of the step count alone, so runs are
reproducible and a run resumed from ``init_state`` with the same ``rng_key``
continues the same epochs.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
from jax import lax, random
import jax.numpy as jnp
from jaxtyping import Array, Int, PRNGKeyArray
import numpy as np

from numpyro_ensemble.members import map_members

__all__ = ["SUBSAMPLE_MODES", "Plate"]

SUBSAMPLE_MODES = ("epoch", "iid", "numpyro")
# Folded into a member's key to give the key of its mini-batch stream.
_STREAM_TAG = 0x62617463


class Plate(NamedTuple):
    """A subsampled ``numpyro.plate``: its name, full size ``N`` and batch size ``B``."""

    name: str
    size: int
    subsample_size: int


def subsampled_plates(model_trace) -> tuple[Plate, ...]:
    """The plates of a (possibly abstract) model trace whose ``subsample_size < size``."""
    plates = {}
    for name, site in model_trace.items():
        if site["type"] != "plate":
            continue
        size, subsample_size = site["args"]
        if subsample_size is not None and subsample_size != size:
            plates[name] = Plate(name, int(size), int(subsample_size))
    return tuple(plates[name] for name in sorted(plates))


def check_mode(subsample: str) -> str:
    if subsample not in SUBSAMPLE_MODES:
        raise ValueError(
            f"subsample must be one of {list(SUBSAMPLE_MODES)}, got {subsample!r}."
        )
    return subsample


class Stream(NamedTuple):
    """Where the members' batch streams stand: the step count ``t`` and, per plate
    (``"epoch"`` mode), the current epoch, the offset into it and the members'
    shuffles of that epoch ``(E, N)``."""

    t: Int[Array, ""]
    epochs: tuple
    offsets: tuple
    perms: tuple


def stream_keys(member_keys: PRNGKeyArray) -> PRNGKeyArray:
    """The per-member keys of the mini-batch streams, from the members' keys."""
    return jax.vmap(lambda k: random.fold_in(k, _STREAM_TAG))(member_keys)


def _shuffles(keys, plate_index, epoch, size, map_options):
    def shuffle(key, _):
        key = random.fold_in(random.fold_in(key, plate_index), epoch)
        return random.permutation(key, size).astype(jnp.int32)

    return map_members(shuffle, keys, **map_options)


def position_at(plates, mode, t0: int) -> Stream:
    """The step count and, per plate, the epoch and the offset into it at step ``t0``
    (computed on the host with Python ints); no shuffles yet."""
    epochs, offsets = [], []
    if mode == "epoch":
        for plate in plates:
            epoch, offset = divmod(t0 * plate.subsample_size, plate.size)
            epochs.append(np.int32(epoch))
            offsets.append(np.int32(offset))
    return Stream(np.int32(t0), tuple(epochs), tuple(offsets), ())


def with_shuffles(plates, mode, keys, position: Stream, map_options=None) -> Stream:
    """``position`` with the members' shuffles of its current epochs, ``(E, N)`` per plate."""
    if mode != "epoch":
        return position
    map_options = map_options or {}
    perms = tuple(
        _shuffles(keys, i, position.epochs[i], plate.size, map_options)
        for i, plate in enumerate(plates)
    )
    return position._replace(perms=perms)


def advance(plates, mode, keys, stream: Stream, map_options=None) -> tuple[dict, Stream]:
    """The indices of every subsampled plate for the current step, ``{name: (E, B)}``,
    and the stream moved on by one step."""
    map_options = map_options or {}
    indices = {}
    if mode == "iid":
        for i, plate in enumerate(plates):

            def draw(key, _, i=i, plate=plate):
                key = random.fold_in(random.fold_in(key, i), stream.t)
                return random.randint(key, (plate.subsample_size,), 0, plate.size)

            indices[plate.name] = map_members(draw, keys, **map_options)
        return indices, stream._replace(t=stream.t + 1)

    epochs, offsets, perms = [], [], []
    for i, plate in enumerate(plates):
        N, B = plate.size, plate.subsample_size
        epoch, offset, perm = stream.epochs[i], stream.offsets[i], stream.perms[i]
        # The predicate is the same for all members (the step count), so this is a
        # real branch: the next shuffle is made once per epoch, not at every step.
        crosses = offset + B >= N
        following = lax.cond(
            crosses,
            lambda e=epoch, i=i, N=N: _shuffles(keys, i, e + 1, N, map_options),
            lambda p=perm: p,
        )
        pos = offset + jnp.arange(B, dtype=jnp.int32)
        here = jnp.take(perm, jnp.minimum(pos, N - 1), axis=1)
        there = jnp.take(following, jnp.maximum(pos - N, 0), axis=1)
        indices[plate.name] = jnp.where(pos < N, here, there)
        epochs.append(epoch + crosses.astype(jnp.int32))
        offsets.append(offset + B - N * crosses.astype(jnp.int32))
        perms.append(following)
    return indices, Stream(stream.t + 1, tuple(epochs), tuple(offsets), tuple(perms))


def stream_indices(
    plates, mode, keys, num_steps: int, start_step: int = 0
) -> dict[str, Int[Array, "E T B"]]:
    """All indices of ``num_steps`` steps from ``start_step``: ``{plate: (E, T, B)}``."""
    position = position_at(plates, mode, start_step)
    return _stream_indices(keys, position, plates=plates, mode=mode, num_steps=num_steps)


@partial(jax.jit, static_argnames=("plates", "mode", "num_steps"))
def _stream_indices(keys, position, *, plates, mode, num_steps):
    def body(stream, _):
        indices, stream = advance(plates, mode, keys, stream)
        return stream, indices

    stream = with_shuffles(plates, mode, keys, position)
    _, out = lax.scan(body, stream, None, length=num_steps)
    return {name: jnp.swapaxes(v, 0, 1) for name, v in out.items()}
