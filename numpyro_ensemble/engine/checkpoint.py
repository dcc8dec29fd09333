"""Save and resume an ensemble's state.

Format (version 1): one NumPy ``.npz`` file holding every array leaf of the state
(``leaf_<i>``; typed PRNG keys as their key data), the pytree structure (pickled
``PyTreeDef``: load only checkpoints you trust, as with any pickle) and a JSON
header (format name, version, leaf count, key implementations, steps taken,
ensemble size). It is written to a temporary file beside ``path`` and moved into
place with ``os.replace``, so a run killed while saving leaves the previous
checkpoint intact. NumPy's own format is used rather than orbax-checkpoint: the
states are small pytrees of host-addressable arrays, and this keeps the package's
dependencies to NumPyro's; arrays sharded over several hosts are not supported
(gather them first, or use orbax).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile

import jax
import numpy as np

from numpyro_ensemble.engine.checks import check_positive_int

__all__ = ["load_checkpoint", "save_checkpoint"]

FORMAT = "numpyro_ensemble.engine.checkpoint"
VERSION = 1


def _steps(state) -> int:
    """Steps taken: the optimizer's step counter (the largest over members)."""
    try:
        return int(np.max(np.asarray(state.optim_state[0])))
    except Exception:  # not an SVIState: no step counter
        return -1


def check_checkpoint_path(path) -> None:
    """A place a checkpoint can be written: an existing, writable directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint_path must be a file path, got {type(path).__name__}.")
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        raise ValueError(f"checkpoint_path {os.fspath(path)}: {directory} is not a writable directory.")
    if os.path.isdir(os.fspath(path)):
        raise ValueError(f"checkpoint_path {os.fspath(path)} is a directory; give a file path.")


def check_checkpointing(path, every, num_steps: int) -> int | None:
    """``run``'s ``checkpoint_path`` / ``checkpoint_every``: the steps between saves."""
    if every is not None:
        every = check_positive_int(every, "checkpoint_every")
        if path is None:
            raise ValueError("checkpoint_every needs a checkpoint_path to save to.")
    if path is None:
        return None
    check_checkpoint_path(path)
    return every or num_steps


def save_checkpoint(path, state) -> None:
    """
    Writes ``state`` (e.g. ``run(...).state``, or params) to ``path`` atomically.

    :param path: file path (``.npz`` is not appended).
    :param state: an ensemble's :data:`~numpyro.infer.svi.SVIState` or any pytree of arrays.
    """
    leaves, treedef = jax.tree.flatten(state)
    arrays, keys = {}, {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            keys[str(i)] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise NotImplementedError(
                "save_checkpoint: the state is sharded over several hosts; gather it "
                "(jax.experimental.multihost_utils.process_allgather) or use orbax-checkpoint."
            )
        arrays[f"leaf_{i}"] = np.asarray(leaf)
    sizes = {a.shape[0] for a in arrays.values() if a.ndim}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "num_leaves": len(leaves),
        "keys": keys,
        "steps": _steps(state),
        "ensemble_size": sizes.pop() if len(sizes) == 1 else None,
    }
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    arrays["__treedef__"] = np.frombuffer(pickle.dumps(treedef), dtype=np.uint8)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, like=None):
    """
    Reads a state written by :func:`save_checkpoint`.

    :param path: the checkpoint file.
    :param like: optionally a state to match (e.g. ``svi.init(key, *args)``): the
        checkpoint must have its structure and shapes.
    :return: the state; pass it as ``run(..., init_state=...)`` to continue (with the
        first run's ``rng_key`` the mini-batches continue where they stopped).
    :raises ValueError: naming ``path`` when the file is not a readable checkpoint
        of this format, or does not match ``like``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}.")
    try:
        with open(path, "rb") as f:
            data = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
        header = json.loads(bytes(data.pop("__header__")).decode())
        treedef = pickle.loads(bytes(data.pop("__treedef__")))
    except Exception as err:
        raise ValueError(f"{path} is not a readable numpyro-ensemble checkpoint ({err}).") from err
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a numpyro-ensemble checkpoint (format {header.get('format')!r}).")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {header.get('version')}; this version "
            f"of numpyro-ensemble reads version {VERSION}."
        )
    try:
        leaves = []
        for i in range(header["num_leaves"]):
            leaf = data[f"leaf_{i}"]
            impl = header["keys"].get(str(i))
            leaves.append(jax.random.wrap_key_data(leaf, impl=impl) if impl else jax.numpy.asarray(leaf))
        state = jax.tree.unflatten(treedef, leaves)
    except Exception as err:
        raise ValueError(f"{path} is a damaged numpyro-ensemble checkpoint ({err}).") from err
    if like is not None:
        if jax.tree.structure(like) != treedef:
            raise ValueError(
                f"the checkpoint {path} holds a state of another structure (another model, "
                f"guide or optimizer?) than the one expected."
            )
        for a, b in zip(jax.tree.leaves(like), leaves, strict=True):
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"the checkpoint {path} holds an array of shape {np.shape(b)} where "
                    f"{np.shape(a)} is expected (another ensemble_size or model?)."
                )
    return state
