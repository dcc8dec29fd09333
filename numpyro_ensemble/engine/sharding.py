"""Members sharded over devices (and hosts) with ``jax.sharding``.

Members never talk to each other, so an ensemble shards along its member axis
with no communication at all: every device runs the same program on its own
block of ``E / D`` members (``jax.shard_map``), shared data is replicated and
per-member data, state and params are split along their leading ``(E,)`` axis
(``NamedSharding(mesh, P(axes))``). With several hosts, call
``jax.distributed.initialize()`` first and pass a mesh over ``jax.devices()``
(all hosts' devices); every host runs the same script on the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from numpyro_ensemble.engine.checks import check_positive_int

__all__ = ["member_mesh"]

MEMBER_AXIS = "members"


def member_mesh(devices: Sequence[jax.Device] | Mesh | None) -> Mesh | None:
    """
    The mesh that ``devices`` describes: a sequence of devices becomes a 1-D mesh
    with axis ``"members"``; a :class:`jax.sharding.Mesh` is used as given (members
    are split over all its axes); None means no sharding.
    """
    if devices is None or isinstance(devices, Mesh):
        return devices
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(
            f"devices must be a sequence of jax devices (e.g. jax.devices()) or a "
            f"jax.sharding.Mesh, got {type(devices).__name__}."
        )
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(
            f"devices must be a non-empty sequence of jax devices (e.g. jax.devices()) "
            f"or a jax.sharding.Mesh, got {devices!r}."
        )
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices lists a device more than once: {devices}.")
    return Mesh(np.array(devices), (MEMBER_AXIS,))


def check_layout(mesh: Mesh | None, ensemble_size: int, members_per_chunk) -> int | None:
    """``members_per_chunk`` checked: E must split evenly over the devices (if any) and
    each device's block into chunks of ``members_per_chunk``."""
    if members_per_chunk is not None:
        members_per_chunk = check_positive_int(members_per_chunk, "members_per_chunk")
    if mesh is None:
        if members_per_chunk is not None and ensemble_size % members_per_chunk:
            raise ValueError(
                f"members_per_chunk={members_per_chunk} does not divide "
                f"ensemble_size={ensemble_size}."
            )
        return members_per_chunk
    num_devices = mesh.devices.size
    if ensemble_size % num_devices:
        raise ValueError(
            f"ensemble_size={ensemble_size} is not a multiple of the {num_devices} devices "
            f"in devices: every device holds the same number of members. Use an "
            f"ensemble_size that is a multiple of {num_devices}, or fewer devices."
        )
    local = ensemble_size // num_devices
    if members_per_chunk is not None and local % members_per_chunk:
        raise ValueError(
            f"members_per_chunk={members_per_chunk} does not divide the {local} members "
            f"that each of the {num_devices} devices holds (ensemble_size={ensemble_size})."
        )
    return members_per_chunk


def member_spec(mesh: Mesh) -> PartitionSpec:
    """The leading (member) axis split over every axis of the mesh."""
    return PartitionSpec(tuple(mesh.axis_names))


def shard_members(fn: Callable, mesh: Mesh | None, in_members, out_members) -> Callable:
    """
    ``fn`` run per device on its own block of members (``jax.shard_map``), or ``fn``
    itself without a mesh. ``in_members`` / ``out_members`` are pytree prefixes of
    the inputs / outputs: True for values with a member axis, False for replicated.
    """
    if mesh is None:
        return fn
    spec = member_spec(mesh)
    to_spec = lambda flag: spec if flag else PartitionSpec()  # noqa: E731
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=jax.tree.map(to_spec, in_members),
        out_specs=jax.tree.map(to_spec, out_members),
        check_vma=False,
    )


def put_args(dynamic, axes, mesh: Mesh | None) -> tuple:
    """The model's traced arguments placed on the mesh: per-member ones (axis 0)
    split along the member axis, shared ones replicated."""
    return tuple(put(leaf, mesh, axis == 0) for leaf, axis in zip(dynamic, axes, strict=True))


def put(tree, mesh: Mesh | None, members: bool):
    """Place ``tree`` on the mesh: split along the member axis, or replicated. Works
    with several hosts (each host passes the same full value)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, member_spec(mesh) if members else PartitionSpec())

    def place(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if jax.process_count() == 1 or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
            return jax.device_put(leaf, sharding)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # typed keys: place their data
            return jax.random.wrap_key_data(place(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)  # the same value on every host: each takes its blocks
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)
