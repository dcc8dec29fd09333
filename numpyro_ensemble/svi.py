"""``EnsembleSVI``: E independent SVI fits of one model, vmapped in one jitted scan."""

from __future__ import annotations

import copy
from functools import partial
import math
import warnings

import jax
from jax import lax, random
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray
import numpy as np
from numpyro.handlers import seed
from numpyro.infer.autoguide import (
    AutoContinuous,
    AutoGuide,
    AutoGuideList,
    _ravel_dict_with_shape_dict,
)
from numpyro.infer.svi import SVI, SVIRunResult, SVIState
import tqdm

from numpyro_ensemble._checks import check_positive_int, leading_sizes

__all__ = ["EnsembleSVI"]

# How many times ``run(progress_bar=True)`` hands control back to the host.
_PROGRESS_UPDATES = 20
# Largest copy of the model's array arguments (one per member) that ``run`` makes.
_BROADCAST_BYTES = 64 * 2**20


def _fresh_guide(guide):
    """A copy of ``guide`` that has not built its AutoGuide prototype yet."""
    if not isinstance(guide, AutoGuide):
        return guide  # a plain callable guide keeps no init state
    # Under jit a copy of a concrete array (e.g. a key kept by an earlier
    # prototype) would be staged into a tracer; copy it eagerly instead.
    with jax.ensure_compile_time_eval():
        fresh = copy.deepcopy(guide)
    _reset_prototype(fresh)
    return fresh


def _reset_prototype(guide):
    if isinstance(guide, AutoGuide):
        guide.prototype_trace = None
        for part in getattr(guide, "_guides", ()):  # AutoGuideList
            _reset_prototype(part)


def _with_init_locs(guide, source):
    """A shallow copy of the user's AutoGuide that takes its init locations from
    ``source``, a fresh copy whose prototype was built with one member's key.

    Only the locations move, by site name: the layout of the params (e.g. the
    order of sites in an AutoContinuous latent vector, which differs when the
    prototype is built under ``vmap``) stays that of the user's guide.
    """
    member = copy.copy(guide)
    locs = getattr(source, "_init_locs", None)
    if locs is not None and getattr(guide, "_init_locs", None) is not None:
        member._init_locs = {name: locs[name] for name in guide._init_locs}
        if isinstance(guide, AutoContinuous):
            shapes = {name: jnp.shape(value) for name, value in guide._init_locs.items()}
            member._init_latent = _ravel_dict_with_shape_dict(member._init_locs, shapes)
    if isinstance(guide, AutoGuideList):
        member._guides = [_with_init_locs(g, s) for g, s in zip(guide._guides, source._guides, strict=False)]
    return member


class _Static:
    """Hashable holder of the non-array leaves of ``(args, kwargs)`` for ``jit``."""

    def __init__(self, treedef, leaves):
        self.treedef = treedef
        self.leaves = leaves
        try:
            self._hash = hash((treedef, leaves))
        except TypeError:  # an unhashable leaf: compare by identity
            self._hash = None

    def __hash__(self):
        return id(self) if self._hash is None else self._hash

    def __eq__(self, other):
        if not isinstance(other, _Static) or self._hash is None or other._hash is None:
            return self is other
        return self.treedef == other.treedef and self.leaves == other.leaves


def _is_dynamic(leaf):
    return isinstance(leaf, (jax.Array, np.ndarray))


def _split_args(args, kwargs):
    """Arrays become traced arguments; Python values (sizes, flags, callables) stay static,
    exactly as they would be closed over by ``SVI.run``."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [leaf if _is_dynamic(leaf) else None for leaf in leaves]
    static = tuple(None if _is_dynamic(leaf) else leaf for leaf in leaves)
    return dynamic, _Static(treedef, static)


def _merge_args(dynamic, static):
    leaves = [d if s is None else s for d, s in zip(dynamic, static.leaves, strict=False)]
    return jax.tree.unflatten(static.treedef, leaves)


def _chunks(num_steps, progress_bar):
    """Lengths of the scanned chunks: one chunk without a progress bar, else about
    ``_PROGRESS_UPDATES`` chunks of one length (plus at most one shorter tail), so
    that at most two scan lengths are ever compiled."""
    if not progress_bar or num_steps <= _PROGRESS_UPDATES:
        return [num_steps] if not progress_bar else [1] * num_steps
    for count in range(_PROGRESS_UPDATES, _PROGRESS_UPDATES // 2 - 1, -1):
        if num_steps % count == 0:  # prefer equal chunks: a single compile
            return [num_steps // count] * count
    length = math.ceil(num_steps / _PROGRESS_UPDATES)
    full, tail = divmod(num_steps, length)
    return [length] * full + ([tail] if tail else [])


class EnsembleSVI(SVI):
    """
    An ensemble of ``ensemble_size`` independent SVI fits of one model and guide.

    A drop-in for :class:`numpyro.infer.SVI`: the same constructor (plus
    ``ensemble_size``), the same ``init`` / ``update`` / ``stable_update`` /
    ``evaluate`` / ``get_params`` / ``run``. Every array in the state, the params
    and the losses gains a leading ``(E,)`` axis; nothing else changes.

    Member ``e`` is exactly a plain ``SVI`` run: ``init(rng_key)`` gives member
    ``e`` the state that ``SVI(model, guide, ...).init(keys[e])`` would give on a
    new guide, with ``keys = random.split(rng_key, ensemble_size)``
    (see :meth:`member_keys`), and every step applies ``SVI.update`` to each
    member independently (``jax.vmap``). So members start from different points
    for AutoGuides and for custom guides whose ``numpyro.param`` init takes a key,
    draw their own mini-batches from ``numpyro.plate(..., subsample_size=...)``,
    and a member that diverges cannot change the others.

    :meth:`run` is one jitted ``lax.scan`` over vmapped updates. With
    ``progress_bar=True`` it scans in about 20 chunks and advances a tqdm bar
    between them (mean / min / max loss over members); a second ``run`` with the
    same shapes reuses the compiled scan.

    **Example:**

    .. doctest::

        >>> import jax.numpy as jnp
        >>> from jax import random
        >>> import numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import Trace_ELBO
        >>> from numpyro.infer.autoguide import AutoNormal
        >>> from numpyro_ensemble import EnsembleSVI

        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with numpyro.plate("data", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

        >>> y = jnp.array([0.9, 1.1, 1.3, 0.7])
        >>> svi = EnsembleSVI(model, AutoNormal(model), numpyro.optim.Adam(0.05),
        ...                   Trace_ELBO(), ensemble_size=8)
        >>> result = svi.run(random.key(0), 1000, y, progress_bar=False)
        >>> result.params["mu_auto_loc"].shape, result.losses.shape
        ((8,), (8, 1000))
        >>> bool(abs(result.params["mu_auto_loc"].mean() - y.mean()) < 0.15)
        True

    :param model: Python callable with NumPyro primitives for the model.
    :param guide: Python callable with NumPyro primitives for the guide.
    :param optim: a ``numpyro.optim`` optimizer, a
        ``jax.example_libraries.optimizers.Optimizer`` or an
        ``optax.GradientTransformation``, as for ``SVI``.
    :param loss: ELBO loss, e.g. :class:`~numpyro.infer.Trace_ELBO` or
        :class:`~numpyro_ensemble.TemperedTrace_ELBO`.
    :param int ensemble_size: ``E``, the number of independent fits (>= 1).
    :param static_kwargs: static arguments for the model / guide, as for ``SVI``.
    """

    def __init__(self, model, guide, optim, loss, *, ensemble_size: int, **static_kwargs):
        self.ensemble_size = check_positive_int(ensemble_size, "ensemble_size")
        try:
            super().__init__(model, guide, optim, loss, **static_kwargs)
        except TypeError as err:
            raise TypeError(
                f"optim must be a numpyro.optim optimizer, a jax.example_libraries "
                f"Optimizer or an optax.GradientTransformation, got "
                f"{type(optim).__name__}."
            ) from err
        self._guide_template = _fresh_guide(guide)
        self._init_members = jax.jit(self._init_members_impl, static_argnames=("static",))
        self._scan = jax.jit(
            self._scan_steps,
            static_argnames=("static", "num_steps", "stable_update", "forward_mode"),
        )

    # -- the ensemble axis -------------------------------------------------------

    def member_keys(self, rng_key: PRNGKeyArray) -> PRNGKeyArray:
        """The per-member keys ``random.split(rng_key, ensemble_size)``: member ``e``
        of ``init(rng_key)`` / ``run(rng_key, ...)`` is a plain ``SVI`` on ``keys[e]``."""
        return random.split(rng_key, self.ensemble_size)

    def _member(self, guide=None) -> SVI:
        """A plain ``SVI`` for one member (sharing model, optimizer, loss)."""
        svi = SVI(
            self.model,
            self.guide if guide is None else guide,
            self.optim,
            self.loss,
            **self.static_kwargs,
        )
        svi.constrain_fn = self.constrain_fn
        return svi

    def _check_state(self, svi_state, name):
        if not isinstance(svi_state, SVIState):
            raise TypeError(f"{name} must be an SVIState, got {type(svi_state).__name__}.")
        sizes = leading_sizes(svi_state)
        if sizes != {self.ensemble_size}:
            found = sorted(sizes, key=lambda s: -1 if s is None else s)
            raise ValueError(
                f"{name} has leading axis sizes {found}, but this {type(self).__name__} "
                f"has ensemble_size={self.ensemble_size}: pass a state made by an "
                f"ensemble of the same size."
            )

    def _check_initialized(self, method):
        if self.constrain_fn is None:
            raise RuntimeError(
                f"{type(self).__name__}.{method} needs the param constraints that "
                f"init() sets: call init() (or run()) first."
            )

    def _validate_model(self, args, kwargs):
        """Hook for subclasses: check the model before anything is traced."""

    def _stack_init_params(self, init_params, reference):
        if not isinstance(init_params, dict):
            raise TypeError(
                f"init_params must be a dict of param site values, got "
                f"{type(init_params).__name__}."
            )
        unknown = sorted(set(init_params) - set(reference))
        if unknown:
            raise ValueError(
                f"init_params has unknown names {unknown}; the param sites of this "
                f"model and guide are {sorted(reference)}."
            )
        E = self.ensemble_size
        stacked = {}
        for name, value in init_params.items():
            value = jnp.asarray(value)
            shape = jnp.shape(reference[name])
            if value.shape == shape:  # shared by every member
                value = jnp.broadcast_to(value, (E, *shape))
            elif value.shape != (E, *shape):
                raise ValueError(
                    f"init_params[{name!r}] has shape {value.shape}; expected {shape} "
                    f"(shared by all members) or {(E, *shape)} (one value per member, "
                    f"ensemble_size={E})."
                )
            stacked[name] = value
        return stacked

    # -- the SVI contract ----------------------------------------------------------

    def init(self, rng_key: PRNGKeyArray, *args, init_params=None, **kwargs) -> SVIState:
        """
        Gets the initial state of every member.

        :param jax.random.key rng_key: random number generator seed, split into
            one key per member (:meth:`member_keys`).
        :param args: arguments to the model / guide.
        :param dict init_params: if not None, initial values of ``numpyro.param``
            sites (constrained), each either of the param's own shape (shared by
            all members) or with a leading ``(E,)`` axis (one value per member).
        :param kwargs: keyword arguments to the model / guide.
        :return: the initial :data:`~numpyro.infer.svi.SVIState`; every array leaf
            has a leading ``(E,)`` axis.
        """
        self._validate_model(args, kwargs)
        keys = self.member_keys(rng_key)
        if self.constrain_fn is None or init_params is not None:
            # Concretely and outside every transform: builds the user's guide
            # prototype (so later traced calls never store tracers in it) and sets
            # ``self.constrain_fn``; it also gives the names and shapes of the
            # params. Numpyro builds a prototype once, so later inits can skip it.
            reference = SVI.init(self, keys[0], *args, **kwargs)
        if init_params is not None:
            reference = self.constrain_fn(self.optim.get_params(reference.optim_state))
            init_params = self._stack_init_params(init_params, reference)
        dynamic, static = _split_args(args, kwargs)
        return self._init_members(keys, init_params, dynamic, static=static)

    def _init_members_impl(self, keys, init_params, dynamic, *, static):
        args, kwargs = _merge_args(dynamic, static)

        def init_member(key, member_init_params):
            guide = self.guide
            if isinstance(guide, AutoGuide):
                # Build a fresh copy's prototype with the key plain ``SVI.init``
                # would give it, so member e starts where SVI.init(keys[e]) on a
                # new guide starts; the user's guide never sees a tracer.
                _, _, guide_seed = random.split(key, 3)
                fresh = _fresh_guide(self._guide_template)
                seed(fresh, guide_seed)(*args, **kwargs, **self.static_kwargs)
                guide = _with_init_locs(guide, fresh)
            return self._member(guide).init(
                key, *args, init_params=member_init_params, **kwargs
            )

        return jax.vmap(init_member)(keys, init_params)

    def get_params(self, svi_state: SVIState) -> dict:
        """
        Gets the constrained values at ``param`` sites of every member.

        :param svi_state: current state of the ensemble.
        :return: a dict of params, each with a leading ``(E,)`` axis.
        """
        self._check_state(svi_state, "svi_state")
        self._check_initialized("get_params")
        return jax.vmap(self._member().get_params)(svi_state)

    def _vmapped(self, method, svi_state, args, kwargs, **options):
        member = self._member()
        fn = getattr(member, method)
        return jax.vmap(lambda state: fn(state, *args, **options, **kwargs))(svi_state)

    def update(
        self, svi_state: SVIState, *args, forward_mode_differentiation=False, **kwargs
    ) -> tuple[SVIState, Float[Array, " E"]]:
        """
        Takes one SVI step for every member (each on its own mini-batch, if any).

        :param svi_state: current state of the ensemble.
        :param args: arguments to the model / guide.
        :param bool forward_mode_differentiation: use forward-mode differentiation.
        :param kwargs: keyword arguments to the model / guide.
        :return: tuple of ``(svi_state, losses)`` with ``losses.shape == (E,)``.
        """
        self._check_state(svi_state, "svi_state")
        self._check_initialized("update")
        return self._vmapped(
            "update", svi_state, args, kwargs,
            forward_mode_differentiation=forward_mode_differentiation,
        )

    def stable_update(
        self, svi_state: SVIState, *args, forward_mode_differentiation=False, **kwargs
    ) -> tuple[SVIState, Float[Array, " E"]]:
        """
        Like :meth:`update`, but a member whose loss or new state is not finite
        keeps its current state; the other members step as usual.

        :return: tuple of ``(svi_state, losses)`` with ``losses.shape == (E,)``.
        """
        self._check_state(svi_state, "svi_state")
        self._check_initialized("stable_update")
        return self._vmapped(
            "stable_update", svi_state, args, kwargs,
            forward_mode_differentiation=forward_mode_differentiation,
        )

    def evaluate(self, svi_state: SVIState, *args, **kwargs) -> Float[Array, " E"]:
        """
        Evaluates the loss of every member at its current params.

        :return: the losses, shape ``(E,)``.
        """
        self._check_state(svi_state, "svi_state")
        self._check_initialized("evaluate")
        return self._vmapped("evaluate", svi_state, args, kwargs)

    # -- run -----------------------------------------------------------------------

    def _scan_steps(self, svi_state, dynamic, *, static, num_steps, stable_update, forward_mode):
        self._check_state(svi_state, "svi_state")
        member = self._member()
        method = member.stable_update if stable_update else member.update

        def member_step(state, member_dynamic):
            args, kwargs = _merge_args(member_dynamic, static)
            return method(state, *args, forward_mode_differentiation=forward_mode, **kwargs)

        # XLA does not hoist size-inflating broadcasts out of a loop, so data shared by
        # all members would be broadcast against the (E,) axis at every step (measured:
        # 1.2-1.4x slower on the sinc model). Broadcast it once, before the scan, unless
        # that would copy too much.
        E = self.ensemble_size
        nbytes = sum(d.size * d.dtype.itemsize for d in dynamic if d is not None)
        if E > 1 and E * nbytes <= _BROADCAST_BYTES:
            dynamic = [None if d is None else jnp.broadcast_to(d, (E, *d.shape)) for d in dynamic]
            data_axis = 0
        else:
            data_axis = None
        step = jax.vmap(member_step, in_axes=(0, data_axis))

        def body(state, _):
            return step(state, dynamic)

        state, losses = lax.scan(body, svi_state, None, length=num_steps)
        return state, losses.T  # (E, num_steps)

    def run(
        self,
        rng_key: PRNGKeyArray,
        num_steps: int,
        *args,
        progress_bar: bool = True,
        stable_update: bool = False,
        forward_mode_differentiation: bool = False,
        init_state: SVIState | None = None,
        init_params: dict | None = None,
        **kwargs,
    ) -> SVIRunResult:
        """
        Runs ``num_steps`` SVI steps on every member and returns the optimized
        params and the losses of every step.

        All steps run inside one jitted ``lax.scan`` over vmapped updates; with
        ``progress_bar=True`` the scan is cut into about 20 chunks and a tqdm bar
        advances between them.

        :param jax.random.key rng_key: random number generator seed.
        :param int num_steps: the number of optimization steps.
        :param args: arguments to the model / guide.
        :param bool progress_bar: whether to show a progress bar. Defaults to True.
        :param bool stable_update: whether to use :meth:`stable_update`, so a
            member with a non-finite step keeps its last finite state.
        :param bool forward_mode_differentiation: use forward-mode differentiation.
        :param SVIState init_state: if not None, continue from this state (e.g.
            ``result.state`` of a previous run); ``rng_key`` is then not used.
        :param dict init_params: initial param values, as for :meth:`init`.
        :param kwargs: keyword arguments to the model / guide.
        :return: :data:`~numpyro.infer.svi.SVIRunResult` ``(params, state, losses)``
            with a leading ``(E,)`` axis on every params leaf and
            ``losses.shape == (E, num_steps)``.
        """
        num_steps = check_positive_int(num_steps, "num_steps")
        if init_state is None:
            svi_state = self.init(rng_key, *args, init_params=init_params, **kwargs)
        else:
            self._check_state(init_state, "init_state")
            if self.constrain_fn is None:
                # A new object resuming a saved state: build the guide prototype
                # and the constraints concretely before anything is traced.
                self._validate_model(args, kwargs)
                SVI.init(self, rng_key, *args, **kwargs)
            svi_state = init_state

        dynamic, static = _split_args(args, kwargs)
        scan = partial(
            self._scan,
            static=static,
            stable_update=bool(stable_update),
            forward_mode=bool(forward_mode_differentiation),
        )
        lengths = _chunks(num_steps, progress_bar)
        losses = []
        with tqdm.tqdm(total=num_steps, disable=not progress_bar) as bar:
            pending = None
            for length in lengths:
                svi_state, chunk_losses = scan(svi_state, dynamic, num_steps=length)
                # Report the previous chunk while this one runs on the device.
                if pending is not None:
                    _report(bar, pending, losses)
                pending = chunk_losses
                if not progress_bar:
                    losses.append(chunk_losses)
                    pending = None
            if pending is not None:
                _report(bar, pending, losses)
        losses = jnp.concatenate([jnp.asarray(chunk) for chunk in losses], axis=1)

        bad = np.flatnonzero(~np.isfinite(np.asarray(losses)).all(axis=1))
        if bad.size:
            kept = (
                "they kept their last finite state at those steps"
                if stable_update
                else "pass stable_update=True to keep their last finite state"
            )
            warnings.warn(
                f"{type(self).__name__}.run: members {bad.tolist()} of "
                f"{self.ensemble_size} had non-finite losses; {kept}. The other "
                f"members are unaffected.",
                RuntimeWarning,
                stacklevel=2,
            )
        return SVIRunResult(self.get_params(svi_state), svi_state, losses)


def _report(bar, chunk_losses, losses):
    host = np.asarray(chunk_losses)  # blocks until the chunk is done
    losses.append(host)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN members
        per_member = np.nanmean(host, axis=1)
        bar.set_postfix_str(
            f"loss over members: mean {np.nanmean(per_member):.4g}, "
            f"min {np.nanmin(per_member):.4g}, max {np.nanmax(per_member):.4g}",
            refresh=False,
        )
    bar.update(host.shape[1])
