"""The compiled programs of an ensemble: per-member init, the scanned steps of ``run``,
``get_params``, and the host loop that drives ``run`` in chunks with a progress bar.

Programs are kept per *configuration* (model, guide, optimizer, loss, static
kwargs and the ensemble options), not per object: a new ``EnsembleSVI`` on the
same model, guide and optimizer reuses the programs an earlier one compiled.
Each program maps the members with :func:`~numpyro_ensemble.engine.members.map_members`
and, with ``devices=``, runs per device on its own block of members.
"""

from __future__ import annotations

import functools
import math
import threading
import warnings

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
import tqdm

from numpyro_ensemble.engine import batching, hyper, stopping
from numpyro_ensemble.engine.checks import warn
from numpyro_ensemble.engine.members import (
    SplitArgs,
    apply_members,
    combine,
    map_members,
    merge_args,
    partition,
    split_args,
)
from numpyro_ensemble.engine.sharding import put, put_args, shard_members
from numpyro_ensemble.engine.starts import identical_flags

__all__ = []

# How many times ``run(progress_bar=True)`` hands control back to the host.
PROGRESS_UPDATES = 20
# The longest chunk: a run is chunks of at most this many steps, each run by the same
# program (a dynamic trip count, the chunk's losses in an (E, MAX_CHUNK) buffer), so
# runs of any length, progress bar or not, early stopping or not, share one program.
MAX_CHUNK = 1024
# Largest copy of the model's shared array arguments (one per member) that ``run``
# makes on full data: XLA does not hoist size-inflating broadcasts out of a loop, so
# shared data would otherwise be broadcast against the member axis at every step
# (measured: 1.2-1.4x slower steps on the sinc model).
BROADCAST_BYTES = 64 * 2**20

_registry: dict = {}
_registry_lock = threading.Lock()


def programs(ensemble) -> Programs:
    """The compiled programs of ``ensemble``'s configuration (shared with every
    ensemble of the same configuration), once its guide is set up (the guide's
    set-up is part of the configuration, see :func:`~numpyro_ensemble.engine.keys.guide_key`)."""
    key = ensemble._program_key()
    with _registry_lock:
        found = _registry.get(key)
        if found is None:
            found = _registry[key] = Programs(ensemble)
    return found


def clear_programs() -> None:
    """Drops every configuration's programs (see :func:`programs`)."""
    with _registry_lock:
        _registry.clear()


class Programs:
    """The jitted programs of one configuration. ``owner`` is the first ensemble made
    with it; the programs use its per-member primitives, which are the same for every
    ensemble of that configuration."""

    def __init__(self, owner):
        self.owner = owner
        self.ran = False  # whether a run has called the chunk program
        self.init = jax.jit(self._init, static_argnames=("static", "axes"))
        self.chunk = jax.jit(
            self._chunk,
            static_argnames=(
                "static", "axes", "plates", "length", "stable_update", "forward_mode",
                "early_stopping",
            ),
        )
        self.get_params = jax.jit(self._get_params)

    @property
    def _map_options(self):
        return {"members_per_chunk": self.owner.members_per_chunk}

    def _init(self, keys, init_params, dynamic, *, static, axes):
        """The members' initial states and, to tell whether members start identical,
        the :func:`~numpyro_ensemble.engine.starts.identical_flags` of their params."""
        owner = self.owner
        state, params = apply_members(
            lambda m, args, kwargs: owner._init_member(*m, args, kwargs),
            (keys, init_params),
            SplitArgs(dynamic, axes, static),
            mesh=owner.mesh,
            **self._map_options,
        )
        state = state._replace(
            optim_state=hyper.split_optimizer_state(state.optim_state, keys.shape[0])
        )
        # Without weak types (optax's linesearch info starts weakly typed, a step makes
        # it strong): else the second chunk, fed the first's output, is a new program.
        state = jax.tree.map(lambda x: lax.convert_element_type(x, jnp.result_type(x)), state)
        flags = identical_flags(params) if keys.shape[0] > 1 else {}
        if owner.mesh is not None:
            flags = jax.lax.with_sharding_constraint(flags, NamedSharding(owner.mesh, PartitionSpec()))
        return state, flags

    def _get_params(self, state):
        member = self.owner._member()
        return apply_members(
            lambda s, args, kwargs: member.get_params(s),
            state,
            split_args((), {}),
            mesh=self.owner.mesh,
            **self._map_options,
        )

    def _chunk(
        self, state, stream, keys, dynamic, stop, hyperparams, count,
        *, static, axes, plates, length, stable_update, forward_mode, early_stopping,
    ):
        """``count`` steps (a traced int, at most ``length``) of every member; their
        losses in the first ``count`` columns of an ``(E, length)`` buffer (NaN after):
        every chunk of every run shares one program (``length`` is ``MAX_CHUNK``)."""
        owner = self.owner
        mode = owner.subsample

        def local(state, stream, keys, mapped_dyn, shared_dyn, stop, hyperparams, count):
            num_local = jax.tree.leaves(state)[0].shape[0]
            dynamic = combine(mapped_dyn, shared_dyn, axes)
            nbytes = sum(d.size * d.dtype.itemsize for a, d in zip(axes, dynamic, strict=True) if a is None)
            step_axes = axes
            # Not with mini-batches: gathers from member copies of the data cost more than
            # the broadcast saves (measured: 2x slower steps on a logistic regression).
            if num_local > 1 and not plates and num_local * nbytes <= BROADCAST_BYTES:
                dynamic = [
                    d if a == 0 else jnp.broadcast_to(d, (num_local, *d.shape))
                    for a, d in zip(axes, dynamic, strict=True)
                ]
                step_axes = (0,) * len(axes)
            member_dyn, member_shared = partition(dynamic, step_axes)

            def member(m, shared):
                member_state, indices, dyn, member_hyperparams = m
                args, kwargs = merge_args(combine(dyn, shared, step_axes), static)
                return owner._member_step(
                    member_state, indices, member_hyperparams, args, kwargs,
                    stable_update=stable_update, forward_mode=forward_mode,
                )

            def step(carry):
                state, stream, stop = carry
                indices = {}
                if plates:
                    indices, stream = batching.advance(plates, mode, keys, stream, self._map_options)
                new_state, losses = map_members(
                    member, (state, indices, member_dyn, hyperparams), member_shared,
                    **self._map_options,
                )
                norms = None
                if early_stopping is not None and early_stopping.grad_tol is not None:
                    norms = stopping.grad_norms(new_state.optim_state)
                state, losses, stop = stopping.apply(
                    early_stopping, stop, state, new_state, losses, norms
                )
                return (state, stream, stop), losses

            # jitted so that the loop's body reuses the trace made to find the losses'
            # dtype (a step of a large model takes seconds to trace)
            traced_step = jax.jit(step)

            def body(i, loop_carry):
                carry, buffer = loop_carry
                carry, losses = traced_step(carry)
                return carry, lax.dynamic_update_index_in_dim(buffer, losses, i, axis=1)

            carry = (state, stream, stop)
            one = jax.eval_shape(traced_step, carry)[1]
            buffer = jnp.full((num_local, length), jnp.nan, one.dtype)
            (state, stream, stop), losses = lax.fori_loop(0, count, body, (carry, buffer))
            return state, stream, losses, stop

        stream_members = False  # the stream's position is the same for every member
        mapped_dyn, shared_dyn = partition(dynamic, axes)
        state, stream, losses, stop = shard_members(
            local,
            owner.mesh,
            (True, stream_members, True, True, False, True, True, False),
            (True, stream_members, True, True),
        )(state, stream, keys, mapped_dyn, shared_dyn, stop, hyperparams, count)
        return state, stream, losses, stop, _summary(losses, stop, owner.mesh, count)


def _summary(losses, stop, mesh, count):
    """What the host reads after a chunk: (mean, min, max) over members of their mean
    loss in the chunk's ``count`` steps, which members had a non-finite loss, and
    whether every member has stopped; replicated, so every host can read them."""
    ran = jnp.arange(losses.shape[1]) < count
    per_member = jnp.nanmean(jnp.where(ran, losses, jnp.nan), axis=1)
    stats = jnp.stack([jnp.nanmean(per_member), jnp.nanmin(per_member), jnp.nanmax(per_member)])
    nonfinite = jnp.any(ran & ~jnp.isfinite(losses), axis=1)
    all_stopped = jnp.all(stop.stopped)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        stats, nonfinite, all_stopped = jax.lax.with_sharding_constraint(
            (stats, nonfinite, all_stopped), replicated
        )
    return stats, nonfinite, all_stopped


def chunk_lengths(num_steps: int, progress_bar: bool) -> list[int]:
    """Lengths of the scanned chunks: chunks of ``MAX_CHUNK`` steps without a progress
    bar, else about ``PROGRESS_UPDATES`` chunks of one length; a shorter tail. Every
    chunk runs in the same program (a dynamic trip count, see :class:`Programs`)."""
    length = MAX_CHUNK if not progress_bar else math.ceil(num_steps / PROGRESS_UPDATES)
    length = max(1, min(length, MAX_CHUNK))
    full, tail = divmod(num_steps, length)
    return [length] * full + ([tail] if tail else [])


def chunk_plan(num_steps: int, progress_bar: bool, every: int | None) -> list[tuple[int, bool]]:
    """``(length, checkpoint after it)`` of every chunk: :func:`chunk_lengths`, or with
    ``every`` (checkpoints) segments of ``every`` steps, each cut into chunks of at
    most ``MAX_CHUNK``, a checkpoint after the last chunk of each segment."""
    if every is None:
        return [(length, False) for length in chunk_lengths(num_steps, progress_bar)]
    segments = [every] * (num_steps // every) + ([num_steps % every] if num_steps % every else [])
    plan = []
    for segment in segments:
        lengths = chunk_lengths(segment, False)
        plan += [(length, k == len(lengths) - 1) for k, length in enumerate(lengths)]
    return plan


def drive(
    run_chunk, state, stream, stop, num_steps: int, progress_bar: bool, chunked: bool,
    every: int | None = None, on_chunk=None,
):
    """Run ``num_steps`` steps as scanned chunks, advancing a tqdm bar between them.

    ``run_chunk(state, stream, stop, length) -> (state, stream, losses, stop, summary)``,
    ``losses`` of shape ``(E, n >= length)`` with the chunk's in its first ``length``
    columns. The host reads chunk ``k``'s summary while chunk ``k + 1`` runs on the
    device; once every member has stopped (early stopping) no further chunk is started,
    and the losses of the steps not run repeat each member's last loss. ``chunked`` cuts
    the run into chunks as a progress bar does (for early stopping); ``every`` makes
    segments of that length (checkpoints), after each of which ``on_chunk(state)`` runs.
    Returns ``(state, losses (E, num_steps), nonfinite (E,) bool, stop)``.
    """
    losses, nonfinite, done = [], None, 0
    with tqdm.tqdm(total=num_steps, disable=not progress_bar) as bar:
        pending = None
        for length, checkpoint in chunk_plan(num_steps, progress_bar or chunked, every):
            state, stream, chunk_losses, stop, summary = run_chunk(state, stream, stop, length)
            if checkpoint and on_chunk is not None:
                on_chunk(state)
            losses.append((chunk_losses, length))
            done += length
            if pending is not None:
                nonfinite, finished = _report(bar, *pending, nonfinite)
                if finished:
                    break
            pending = (length, summary)
        else:
            nonfinite, _ = _report(bar, *pending, nonfinite)
    return state, _joined(losses, num_steps), nonfinite, stop


def _joined(chunks, num_steps):
    """The chunks' losses side by side, ``(E, num_steps)``; steps not run (every member
    stopped) repeat each member's last loss. On the host (NumPy: nothing to compile)
    where the losses are, else on the devices."""
    if all(getattr(b, "is_fully_addressable", True) for b, _ in chunks):
        losses = np.concatenate([np.asarray(b)[:, :n] for b, n in chunks], axis=1)
        if losses.shape[1] < num_steps:
            losses = np.concatenate(
                [losses, np.repeat(losses[:, -1:], num_steps - losses.shape[1], axis=1)], axis=1
            )
        return jax.device_put(losses)  # (jnp.asarray would compile a program per shape)
    losses = jnp.concatenate([b[:, :n] for b, n in chunks], axis=1)
    if losses.shape[1] < num_steps:
        losses = jnp.concatenate(
            [losses, jnp.broadcast_to(losses[:, -1:], (losses.shape[0], num_steps - losses.shape[1]))],
            axis=1,
        )
    return losses


@jax.jit
def _max_step(steps):
    """The members' largest step count, replicated (readable on every host)."""
    return jnp.max(steps)


def run_plates(ensemble, split: SplitArgs) -> tuple:
    """The subsampled plates whose indices ``run`` draws (none with ``subsample="numpyro"``)."""
    if ensemble.subsample == "numpyro":
        return ()
    return ensemble._inspect(split).plates


class Chunks:
    """The chunk program of one ``run`` with every input but the state, the stream's
    position and the stopping state: built before the members' initial state exists,
    so the first run can compile it beside the init program (:func:`compile_side_by_side`)."""

    def __init__(self, ensemble, rng_key, split, *, stable_update, forward_mode, early_stopping):
        self.ensemble, self.split = ensemble, split
        self.plates = run_plates(ensemble, split)
        self.keys = None
        if self.plates:
            self.keys = put(batching.stream_keys(ensemble.member_keys(rng_key)), ensemble.mesh, True)
        self.dynamic = put_args(split.dynamic, split.axes, ensemble.mesh)
        self.hyperparams = put(ensemble._hyperparams, ensemble.mesh, True)
        self.options = {
            "static": split.static, "axes": split.axes, "plates": self.plates, "length": MAX_CHUNK,
            "stable_update": stable_update, "forward_mode": forward_mode,
            "early_stopping": early_stopping,
        }

    @functools.cached_property
    def progs(self) -> Programs:
        """The ensemble's programs (looked up once, after its guide is set up)."""
        return programs(self.ensemble)

    def start(self, t0: int = 0):
        """The stream at step ``t0`` and a fresh stopping state."""
        stream = batching.position_at(self.plates, self.ensemble.subsample, t0)
        return stream, put(stopping.init(self.ensemble.ensemble_size), self.ensemble.mesh, True)

    def inputs(self, state, stream, stop, length):
        return (state, stream, self.keys, self.dynamic, stop, self.hyperparams, np.int32(length))

    def __call__(self, state, stream, stop, length):
        self.progs.ran = True
        return self.progs.chunk(*self.inputs(state, stream, stop, length), **self.options)

    def lower(self, state):
        """The chunk program lowered for a state of ``state``'s shapes (abstract values)."""
        stream, stop = self.start()
        state = carried(self.ensemble, state)
        return self.progs.chunk.lower(*self.inputs(state, stream, stop, 1), **self.options)


def carried(ensemble, svi_state):
    """The state as the chunks carry it."""
    if getattr(ensemble.loss, "num_particles", 1) > 1 and svi_state.mutable_state is not None:
        # NumPyro ignores mutable state with several particles (and warns when the loss
        # is traced): its update returns None, which the scan's carry must match.
        svi_state = svi_state._replace(mutable_state=None)
    return svi_state


def compile_side_by_side(init_program, init_args: tuple, init_kwargs: dict, chunks: Chunks) -> None:
    """Compile the init program and the chunk program of a first ``run`` at once: both
    are traced and lowered here (NumPyro's handler stack is not per thread), the chunk
    program for the init program's output shapes, then compiled in two threads (XLA
    compiles without holding Python's lock), so the run waits for the longer of the
    two compiles, not their sum. The calls that follow find them compiled; should a
    compile fail here, the call compiles again and reports it."""
    lowered_init = init_program.lower(*init_args, **init_kwargs)
    state, _ = lowered_init.out_info
    lowered = (lowered_init, chunks.lower(state))
    threads = [threading.Thread(target=program.compile, daemon=True) for program in lowered]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_steps(
    ensemble, chunks: Chunks, svi_state, num_steps, *, progress_bar, on_chunk, every,
):
    """``num_steps`` scanned steps of every member from ``svi_state`` (the body of
    ``EnsembleSVI.run``): mini-batch streams, chunks, early stopping, checkpoints and
    the warning about members with non-finite losses.
    Returns ``(state, losses (E, num_steps), stop)``."""
    svi_state = carried(ensemble, svi_state)
    t0 = int(_max_step(svi_state.optim_state[0])) if chunks.plates else 0
    stream, stop = chunks.start(t0)
    state, losses, nonfinite, stop = drive(
        chunks, svi_state, stream, stop, num_steps, progress_bar,
        chunked=chunks.options["early_stopping"] is not None, every=every, on_chunk=on_chunk,
    )
    bad = np.flatnonzero(nonfinite)
    if bad.size:
        kept = (
            "they kept their last finite state at those steps"
            if chunks.options["stable_update"]
            else "pass stable_update=True to keep their last finite state"
        )
        warn(
            f"{type(ensemble).__name__}.run: members {bad.tolist()} of "
            f"{ensemble.ensemble_size} had non-finite losses; {kept}. The other "
            f"members are unaffected.",
            RuntimeWarning,
        )
    return state, losses, stop


def _report(bar, length, summary, nonfinite):
    stats, bad, finished = jax.device_get(summary)  # blocks until that chunk is done
    nonfinite = bad if nonfinite is None else nonfinite | bad
    if not bar.disable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, low, high = (float(v) for v in stats)
        bar.set_postfix_str(
            f"loss over members: mean {mean:.4g}, min {low:.4g}, max {high:.4g}", refresh=False
        )
        bar.update(length)
    return np.asarray(nonfinite), bool(finished)
