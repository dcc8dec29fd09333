"""``EnsembleSVI``: E independent SVI fits of one model, vmapped in one jitted scan."""

from __future__ import annotations

from functools import partial

from jax import random
from jaxtyping import Array, Float, Int, PRNGKeyArray
from numpyro.handlers import substitute
from numpyro.infer.svi import SVI, SVIRunResult, SVIState

from numpyro_ensemble.engine import batching, hyper, keys, loop, starts, stopping
from numpyro_ensemble.engine.checkpoint import check_checkpointing, save_checkpoint
from numpyro_ensemble.engine.checks import (
    check_discrete_sites,
    check_init_values,
    check_instance,
    check_key,
    check_num_particles,
    check_positive_int,
    check_something_to_fit,
    check_state,
)
from numpyro_ensemble.engine.guides import guide_template, member_guide
from numpyro_ensemble.engine.inspection import ModelInfo, inspect_model
from numpyro_ensemble.engine.members import (
    SplitArgs,
    apply_members,
    check_per_member,
    split_args,
)
from numpyro_ensemble.engine.sharding import check_layout, member_mesh, put, put_args
from numpyro_ensemble.engine.stopping import EarlyStopping, extra_fields
from numpyro_ensemble.fit import optim as optim_module
from numpyro_ensemble.fit.elbo import in_name_order

__all__ = ["EnsembleSVI"]

class EnsembleSVI(SVI):
    """
    An ensemble of ``ensemble_size`` independent SVI fits of one model and guide.

    A drop-in for :class:`numpyro.infer.SVI`: the same constructor (plus
    ``ensemble_size``), the same ``init`` / ``update`` / ``stable_update`` /
    ``evaluate`` / ``get_params`` / ``run``. Every array in the state, the params
    and the losses gains a leading ``(E,)`` axis; nothing else changes.

    Member ``e`` is a plain ``SVI`` run (the same numbers to floating-point
    rounding): ``init(rng_key)`` gives member ``e`` the state that
    ``SVI(model, guide, ...).init(keys[e])`` would give on a new guide, with
    ``keys = random.split(rng_key, ensemble_size)``
    (see :meth:`member_keys`), and every step applies ``SVI.update`` to each
    member independently. So members start from different points for AutoGuides
    and for custom guides whose ``numpyro.param`` init takes a key, and a member
    that diverges cannot change the others. Members that would all start from the
    same point (an eagerly built ``nnx`` / ``equinox`` network, ``init_to_value``,
    a ``numpyro.param`` init without a key) trigger an
    :class:`~numpyro_ensemble.IdenticalMembersWarning`; ``init_params`` can then
    be a function of a key, evaluated once per member.

    :meth:`run` is one jitted ``lax.scan`` over the members' updates. With
    ``progress_bar=True`` it scans in about 20 chunks and advances a tqdm bar
    between them (mean / min / max loss over members). The compiled programs are
    kept per configuration: a second ``run``, or a new object on the same model,
    guide and optimizer, with the same shapes, compiles nothing.

    In :meth:`run` the ensemble draws the indices of subsampled plates
    (``numpyro.plate(..., subsample_size=B)``) itself, per member, see
    ``subsample``; :meth:`update`, :meth:`stable_update` and :meth:`evaluate` leave
    that to NumPyro, as plain ``SVI`` does.

    Data that differs between members (cross-validation folds, bootstrap
    resamples) is passed wrapped in :func:`~numpyro_ensemble.per_member`, with a
    leading ``(E,)`` axis; all other arguments are shared.

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
    :param str subsample: how :meth:`run` draws the indices of subsampled plates:
        ``"epoch"`` (default: each member shuffles the data once per epoch and
        takes consecutive batches, so every point is used once per epoch),
        ``"iid"`` (uniform with replacement at every step) or ``"numpyro"``
        (NumPyro's own draw, exactly as plain ``SVI``). See
        :mod:`numpyro_ensemble.engine.batching`.
    :param devices: a sequence of devices (e.g. ``jax.devices()``) or a
        :class:`jax.sharding.Mesh` to split the members over; ``ensemble_size``
        must be a multiple of the number of devices. State, params and losses come
        back sharded along their member axis. Default: no sharding.
    :param int members_per_chunk: run the members of each step in sequential
        groups of this many (each group vmapped) to bound memory; must divide the
        members of each device. Default: all at once.
    :param static_kwargs: static arguments for the model / guide, as for ``SVI``.
    """

    def __init__(
        self,
        model,
        guide,
        optim,
        loss,
        *,
        ensemble_size: int,
        subsample: str = "epoch",
        devices=None,
        members_per_chunk: int | None = None,
        **static_kwargs,
    ):
        self.ensemble_size = check_positive_int(ensemble_size, "ensemble_size")
        check_instance(guide, "guide", "AutoNormal(model)", "__call__")
        check_instance(loss, "loss", "Trace_ELBO()", "loss")
        check_num_particles(loss)
        try:
            super().__init__(model, guide, optim_module.as_numpyro(optim), loss, **static_kwargs)
        except TypeError as err:
            raise TypeError(
                f"optim must be a numpyro.optim optimizer, a jax.example_libraries "
                f"Optimizer or an optax.GradientTransformation, got "
                f"{type(optim).__name__}."
            ) from err
        self.subsample = batching.check_mode(subsample)
        self.mesh = member_mesh(devices)
        self.members_per_chunk = check_layout(self.mesh, self.ensemble_size, members_per_chunk)
        self._hyperparams = hyper.check(self.loss, optim, self.ensemble_size)
        self._optim_arg = optim
        self._guide_template = guide_template(guide)
        self._guide_settings = keys.guide_settings(guide)
        self._warned_identical = False
        self._extra_fields = None
        self._default_early_stopping = None  # run's rule when it is given none

    # -- what happened in the last run ----------------------------------------------

    def get_extra_fields(self) -> dict:
        """
        What happened to each member in the last :meth:`run`, MCMC-style:
        ``stopped_at`` ``(E,)`` (the steps a member took before early stopping;
        ``num_steps`` if it never stopped), ``diverged`` ``(E,)`` (a non-finite loss
        at any step) and ``final_loss`` ``(E,)``.
        """
        if getattr(self, "_extra_fields", None) is None:
            raise RuntimeError(f"{type(self).__name__}.get_extra_fields: call run() first.")
        return dict(self._extra_fields)

    def print_summary(self) -> None:
        """Prints :meth:`get_extra_fields` per member, in the style of
        ``MCMC.print_summary``; :func:`~numpyro_ensemble.ensemble_summary` adds
        weights, modes and R-hat."""
        print(stopping.format_fields(self.get_extra_fields()))

    # -- the ensemble axis -------------------------------------------------------

    def member_keys(self, rng_key: PRNGKeyArray) -> PRNGKeyArray:
        """The per-member keys ``random.split(rng_key, ensemble_size)``: member ``e``
        of ``init(rng_key)`` / ``run(rng_key, ...)`` is a plain ``SVI`` on ``keys[e]``."""
        check_key(rng_key)
        return random.split(rng_key, self.ensemble_size)

    def _program_key(self):
        """What the compiled programs depend on besides the argument shapes."""
        return (
            type(self),
            self.model,
            keys.guide_key(self.guide, self._guide_settings),  # once set up
            keys.optimizer_key(self._optim_arg),
            keys.loss_key(self.loss),
            keys.hashable(tuple(sorted(self.static_kwargs.items()))),
            self.subsample,
            self.members_per_chunk,
            self.mesh,
        )

    def _member(self, guide=None, indices=None, hyperparams=None) -> SVI:
        """A plain ``SVI`` for one member (sharing model, optimizer, loss); with
        ``indices``, the subsampled plates take those indices; with ``hyperparams``,
        the loss takes the member's own values (see :mod:`numpyro_ensemble.engine.hyper`)."""
        model, guide = self.model, self.guide if guide is None else guide
        if indices:
            model, guide = substitute(model, data=indices), substitute(guide, data=indices)
        # the sites' terms added by name, not in NumPyro's set order (PYTHONHASHSEED)
        loss = in_name_order(hyper.member_loss(self.loss, hyperparams))
        svi = SVI(model, guide, self.optim, loss, **self.static_kwargs)
        svi.constrain_fn = self.constrain_fn
        return svi

    def _init_member(self, key, init_params, args, kwargs) -> tuple[SVIState, dict]:
        """One member's ``SVI.init(key)``, as on a new guide, and its params (traced)."""
        guide = member_guide(
            self.guide, self._guide_template, key, args, kwargs, self.static_kwargs
        )
        svi = self._member(guide)
        state = svi.init(key, *args, init_params=init_params, **kwargs)
        return state, svi.get_params(state)

    def _member_step(
        self, state, indices, hyperparams, args, kwargs, *, stable_update, forward_mode
    ):
        """One member's ``SVI.update`` (or ``stable_update``) on its mini-batch (traced)."""
        svi = self._member(indices=indices, hyperparams=hyperparams)
        method = svi.stable_update if stable_update else svi.update
        return method(state, *args, forward_mode_differentiation=forward_mode, **kwargs)

    def _split(self, args, kwargs) -> SplitArgs:
        split = split_args(args, kwargs)
        check_per_member(split, self.ensemble_size)
        return split

    def _inspect(self, split: SplitArgs) -> ModelInfo:
        """The model's sites and subsampled plates, found once per argument shapes."""
        info = inspect_model(self.model, split, self.static_kwargs)
        self._validate_model(info)
        return info

    def _validate_model(self, info: ModelInfo):
        """Check the model before anything is compiled (subclasses add their own checks)."""
        check_discrete_sites(self, info)
        check_something_to_fit(self, info)

    def _check_state(self, svi_state, name):
        check_state(svi_state, name, self.ensemble_size, type(self).__name__)

    def _check_initialized(self, method):
        if self.constrain_fn is None:
            raise RuntimeError(
                f"{type(self).__name__}.{method} needs the param constraints that "
                f"init() sets: call init() (or run()) first."
            )

    # -- the SVI contract ----------------------------------------------------------

    def init(self, rng_key: PRNGKeyArray, *args, init_params=None, **kwargs) -> SVIState:
        """
        Gets the initial state of every member.

        :param jax.random.key rng_key: random number generator seed, split into
            one key per member (:meth:`member_keys`).
        :param args: arguments to the model / guide.
        :param init_params: if not None, initial values of ``numpyro.param`` sites
            (constrained), as a dict whose values (arrays or pytrees, e.g. a
            ``flax_module``'s params) have the param's own shape (shared by all
            members) or a leading ``(E,)`` axis (one value per member); or a function
            ``rng_key -> dict`` evaluated once per member with a key of its own
            (traced), e.g. to build each member's network.
        :param kwargs: keyword arguments to the model / guide.
        :return: the initial :data:`~numpyro.infer.svi.SVIState`; every array leaf
            has a leading ``(E,)`` axis.
        """
        return self._init(rng_key, args, kwargs, init_params)

    def _init(self, rng_key, args, kwargs, init_params, chunks=None) -> SVIState:
        """:meth:`init`; with ``chunks`` (a first ``run``'s :class:`~numpyro_ensemble.engine.loop.Chunks`)
        the init and chunk programs are compiled side by side first."""
        check_key(rng_key)
        split = self._split(args, kwargs)
        info = self._inspect(split)
        if isinstance(init_params, dict):
            check_init_values(init_params)
        keys = self.member_keys(rng_key)
        reference = starts.set_up(self, keys[0], args, kwargs, init_params is not None)
        progs = loop.programs(self)
        optim_module.check_optimizer(self, info, args, kwargs)
        shared_names = ()
        if init_params is not None:
            init_params, shared_names = starts.member_init_params(
                init_params, keys, reference, self.constrain_fn, self.members_per_chunk
            )
        inputs = (
            put(keys, self.mesh, True),
            put(init_params, self.mesh, True),
            put_args(split.dynamic, split.axes, self.mesh),
        )
        options = {"static": split.static, "axes": split.axes}
        if chunks is not None and not progs.ran:
            loop.compile_side_by_side(progs.init, inputs, options, chunks)
        state, flags = progs.init(*inputs, **options)
        starts.warn_once_if_identical(self, flags, shared_names)
        return state

    def get_params(self, svi_state: SVIState) -> dict:
        """
        Gets the constrained values at ``param`` sites of every member.

        :param svi_state: current state of the ensemble.
        :return: a dict of params, each with a leading ``(E,)`` axis.
        """
        self._check_state(svi_state, "svi_state")
        self._check_initialized("get_params")
        return loop.programs(self).get_params(svi_state)

    def _apply(self, method, svi_state, args, kwargs, **options):
        """``SVI.<method>`` of every member on its own state (NumPyro draws mini-batches)."""
        self._check_state(svi_state, "svi_state")
        self._check_initialized(method)

        def one(member, a, k):
            state, hyperparams = member
            fn = getattr(self._member(hyperparams=hyperparams), method)
            return fn(state, *a, **options, **k)

        return apply_members(
            one,
            (svi_state, put(self._hyperparams, self.mesh, True)),
            self._split(args, kwargs),
            mesh=self.mesh,
            members_per_chunk=self.members_per_chunk,
        )

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
        return self._apply(
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
        return self._apply(
            "stable_update", svi_state, args, kwargs,
            forward_mode_differentiation=forward_mode_differentiation,
        )

    def evaluate(self, svi_state: SVIState, *args, **kwargs) -> Float[Array, " E"]:
        """
        Evaluates the loss of every member at its current params.

        :return: the losses, shape ``(E,)``.
        """
        return self._apply("evaluate", svi_state, args, kwargs)

    # -- run -----------------------------------------------------------------------

    def batch_indices(
        self, rng_key: PRNGKeyArray, num_steps: int, *args, start_step: int = 0, **kwargs
    ) -> dict[str, Int[Array, "E T B"]]:
        """
        The indices that ``run(rng_key, ...)`` gives the subsampled plates at steps
        ``start_step, ..., start_step + num_steps - 1``.

        :return: ``{plate name: array of shape (E, num_steps, subsample_size)}``;
            empty for a model without subsampled plates or with ``subsample="numpyro"``.
        """
        check_key(rng_key)
        plates = loop.run_plates(self, self._split(args, kwargs))
        if not plates:
            return {}
        keys = batching.stream_keys(self.member_keys(rng_key))
        return batching.stream_indices(plates, self.subsample, keys, num_steps, start_step)

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
        early_stopping: EarlyStopping | None = None,
        checkpoint_path=None,
        checkpoint_every: int | None = None,
        **kwargs,
    ) -> SVIRunResult:
        """
        Runs ``num_steps`` SVI steps on every member and returns the optimized
        params and the losses of every step.

        All steps run inside one jitted ``lax.scan`` over the members' updates; with
        ``progress_bar=True`` the scan is cut into about 20 chunks and a tqdm bar
        advances between them. Subsampled plates take their indices from each
        member's stream (``subsample``), which ``rng_key`` seeds, also when
        resuming from ``init_state``: pass the first run's key to continue its epochs.

        :param jax.random.key rng_key: random number generator seed.
        :param int num_steps: the number of optimization steps.
        :param args: arguments to the model / guide.
        :param bool progress_bar: whether to show a progress bar. Defaults to True.
        :param bool stable_update: whether to use :meth:`stable_update`, so a
            member with a non-finite step keeps its last finite state.
        :param bool forward_mode_differentiation: use forward-mode differentiation.
        :param SVIState init_state: if not None, continue from this state (e.g.
            ``result.state`` of a previous run).
        :param init_params: initial param values, as for :meth:`init`.
        :param early_stopping: an :class:`~numpyro_ensemble.EarlyStopping` rule: a
            member whose smoothed loss stops improving stops updating (keeping the
            state of a run of that many steps) while the others go on; the run ends
            early once all have stopped. See :meth:`get_extra_fields`.
        :param checkpoint_path: if given, the state is saved there
            (:func:`~numpyro_ensemble.save_checkpoint`, atomically) every
            ``checkpoint_every`` steps, between scanned chunks, and at the end; a
            killed run resumes with ``run(rng_key, remaining_steps, ...,
            init_state=load_checkpoint(path))`` and continues exactly.
        :param int checkpoint_every: steps between checkpoints (default: only at the end).
        :param kwargs: keyword arguments to the model / guide.
        :return: :data:`~numpyro.infer.svi.SVIRunResult` ``(params, state, losses)``
            with a leading ``(E,)`` axis on every params leaf and
            ``losses.shape == (E, num_steps)``.
        """
        check_key(rng_key)
        num_steps = check_positive_int(num_steps, "num_steps")
        checkpoint_every = check_checkpointing(checkpoint_path, checkpoint_every, num_steps)
        split = self._split(args, kwargs)
        self._inspect(split)  # (EnsembleMAP picks its default optimizer here)
        early_stopping = stopping.check_rule(
            getattr(self, "_default_early_stopping", None)
            if early_stopping is None
            else early_stopping,
            keeps_gradient=isinstance(self.optim, optim_module.LinesearchOptim),
        )
        chunks = loop.Chunks(
            self, rng_key, split,
            stable_update=bool(stable_update),
            forward_mode=bool(forward_mode_differentiation),
            early_stopping=early_stopping,
        )
        if init_state is None:
            svi_state = self._init(rng_key, args, kwargs, init_params, chunks)
        else:
            self._check_state(init_state, "init_state")
            # a new object resuming a saved state sets up the guide first
            starts.set_up(self, rng_key, args, kwargs, need_reference=False)
            optim_module.check_optimizer(self, self._inspect(split), args, kwargs)
            svi_state = starts.resume(self, init_state)
        svi_state, losses, stop = loop.run_steps(
            self, chunks, svi_state, num_steps,
            progress_bar=progress_bar,
            on_chunk=None if checkpoint_path is None else partial(save_checkpoint, checkpoint_path),
            every=checkpoint_every,
        )
        self._extra_fields = extra_fields(losses, stop, num_steps)
        return SVIRunResult(chunks.progs.get_params(svi_state), svi_state, losses)


def check_ensemble(ensemble, caller: str) -> None:
    """The first argument of the functions that use a fit: an ``EnsembleSVI`` /
    ``EnsembleMAP``, not a plain ``SVI`` (which has no member axis)."""
    if isinstance(ensemble, EnsembleSVI):
        return
    if isinstance(ensemble, SVI):
        raise TypeError(
            f"{caller} needs an EnsembleSVI or EnsembleMAP (params with a leading (E,) "
            f"axis), got a plain numpyro.infer.SVI. Fit the model with "
            f"EnsembleSVI(model, guide, optim, loss, ensemble_size=E) (E=1 for one fit), "
            f"or use numpyro.infer.Predictive for a single SVI fit."
        )
    raise TypeError(
        f"{caller} needs an EnsembleSVI or EnsembleMAP as its first argument, got "
        f"{type(ensemble).__name__}."
    )
