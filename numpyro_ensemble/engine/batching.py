"""Mini-batch indices for subsampled plates, drawn per member by the ensemble itself.

A model that subsamples with ``numpyro.plate(name, N, subsample_size=B)`` lets
NumPyro draw ``B`` indices without replacement at every step: a sequential
Fisher-Yates scan of ``B`` steps on CPU and a full permutation of ``N`` on
accelerators, which costs more than the step itself on small models. Instead
:meth:`~numpyro_ensemble.EnsembleSVI.run` supplies the indices of every
subsampled plate (through NumPyro's ``substitute`` handler, as ``HMCECS`` does)
from a cheap per-member stream:

- ``"epoch"`` (default): each member visits the ``N`` points in a new random
  order every epoch, ``B`` at a time, so every point is used once per epoch.
  Epochs run on without a gap: a batch that crosses the end of an epoch takes its
  last points from the next epoch's order. The order is a keyed pseudo-random
  permutation evaluated only at the batch's positions (a four-round Feistel
  network with cycle walking, seeded per member and epoch by an integer hash), so nothing of size ``N`` is stored or sorted: a
  shuffle by ``jax.random.permutation`` sorts ``N`` keys, which on a CPU cost
  more than the steps of a whole epoch of a small model.
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
from numpyro.handlers import substitute

from numpyro_ensemble.engine.members import map_members

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
    (``"epoch"`` mode), the current epoch and the offset into it (shared by all
    members, who move in step)."""

    t: Int[Array, ""]
    epochs: tuple
    offsets: tuple


def stream_keys(member_keys: PRNGKeyArray) -> PRNGKeyArray:
    """The per-member keys of the mini-batch streams, from the members' keys."""
    return jax.vmap(lambda k: random.fold_in(k, _STREAM_TAG))(member_keys)


def position_at(plates, mode, t0: int) -> Stream:
    """The stream at step ``t0``: positions computed on the host with Python ints, so
    they are exact however long the run."""
    epochs, offsets = [], []
    if mode == "epoch":
        for plate in plates:
            epoch, offset = divmod(t0 * plate.subsample_size, plate.size)
            epochs.append(np.int32(epoch))
            offsets.append(np.int32(offset))
    return Stream(np.int32(t0), tuple(epochs), tuple(offsets))


# -- a keyed permutation of range(N), evaluated pointwise ---------------------------

_ROUNDS = 4
_GOLDEN = 0x9E3779B9


def _mix(x):
    """A 32-bit integer hash (Wellons' "lowbias32")."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _feistel(x, seed, bits: int):
    """A bijection of ``range(2 ** bits)`` set by ``seed``: ``_ROUNDS`` rounds of an
    unbalanced Feistel network (the two halves swap widths every round)."""
    widths = (bits // 2, bits - bits // 2)
    left, right = x >> widths[1], x & jnp.uint32((1 << widths[1]) - 1)
    for k in range(_ROUNDS):
        left_bits = widths[k % 2]
        round_key = _mix(seed + jnp.uint32(((k + 1) * _GOLDEN) % 2**32))
        left, right = right, left ^ (_mix(right ^ round_key) & jnp.uint32((1 << left_bits) - 1))
    return (left << widths[(_ROUNDS - 1) % 2]) | right


def permuted(seed, positions, size: int):
    """``positions`` (``< size``) sent through a pseudo-random permutation of
    ``range(size)`` set by ``seed`` (uint32, broadcast against ``positions``).

    The Feistel network permutes ``range(M)``, ``M = 2 ** bits`` the smallest power
    of two ``>= size``; values that land at or above ``size`` are sent through it
    again (cycle walking, on average fewer than one more pass as ``M < 2 size``)
    until they land below: that restricts it to a permutation of ``range(size)``.
    """
    bits = max(2, int(size - 1).bit_length())
    x = _feistel(positions.astype(jnp.uint32), seed, bits)
    x = lax.while_loop(
        lambda x: jnp.any(x >= size),
        lambda x: jnp.where(x >= size, _feistel(x, seed, bits), x),
        x,
    )
    return x.astype(jnp.int32)


def _epoch_seed(member_seed, plate_index: int, epoch):
    """The seed of one member's order of one plate in one epoch."""
    return _mix(_mix(member_seed ^ jnp.uint32((plate_index * _GOLDEN) % 2**32)) + epoch.astype(jnp.uint32))


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

    epochs, offsets = [], []
    for i, plate in enumerate(plates):
        N, B = plate.size, plate.subsample_size
        epoch, offset = stream.epochs[i], stream.offsets[i]
        position = offset + jnp.arange(B, dtype=jnp.int32)
        later = position >= N  # the batch runs into the next epoch (B <= N: by one at most)

        def draw(key, _, i=i, N=N, epoch=epoch, position=position, later=later):
            member_seed = random.bits(key, (), jnp.uint32)
            seed = _epoch_seed(member_seed, i, epoch + later.astype(jnp.int32))
            return permuted(seed, jnp.where(later, position - N, position), N)

        indices[plate.name] = map_members(draw, keys, **map_options)
        crosses = (offset + B >= N).astype(jnp.int32)
        epochs.append(epoch + crosses)
        offsets.append(offset + B - N * crosses)
    return indices, Stream(stream.t + 1, tuple(epochs), tuple(offsets))


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

    _, out = lax.scan(body, position, None, length=num_steps)
    return {name: jnp.swapaxes(v, 0, 1) for name, v in out.items()}


def full_data(model, plates):
    """``model`` with every subsampled plate taking all its indices (scale 1)."""
    if not plates:
        return model
    return substitute(model, data={p.name: jnp.arange(p.size) for p in plates})
