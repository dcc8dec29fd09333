"""Optimizers that need the loss itself: optax's linesearch methods (L-BFGS) per member.

``optax.lbfgs()`` and optax's linesearches (``scale_by_zoom_linesearch``,
``scale_by_backtracking_linesearch``) are ``GradientTransformationExtraArgs`` whose
``update`` needs ``value=``, ``grad=`` and ``value_fn=``: the loss, its gradient and
the loss as a function of the params, which the linesearch evaluates at trial
points. NumPyro's ``SVI`` passes only ``value=``, so plain NumPyro cannot run them.
Here each member gets its own: ``value_fn`` is the member's loss on the same data,
mini-batch and key as the step (:class:`LinesearchOptim`), vmapped like every other
update inside the scanned ``run``.

A linesearch compares losses at several points, and L-BFGS builds its curvature
from gradients of successive steps, so the loss must be deterministic: a point
guide (``EnsembleMAP``, ``AutoDelta``, ``AutoLaplaceApproximation``) on full data.
With a Monte Carlo ELBO or mini-batches the ensemble says so before compiling
(:func:`check_deterministic`).
"""

from __future__ import annotations

import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.handlers import seed, trace
from numpyro.optim import _NumPyroOptim, _value_and_grad, optax_to_numpyro
import optax

from numpyro_ensemble.engine.members import member_args
from numpyro_ensemble.engine.stopping import EarlyStopping, linesearch_states

__all__ = ["LinesearchOptim"]

# EnsembleMAP's defaults (one object each, so every EnsembleMAP with a default shares
# its compiled programs). On full data: L-BFGS with optax's zoom linesearch
# (:func:`full_data_lbfgs`), and run stops a member once its gradient norm is below
# 1e-5 or its loss has not decreased for 10 steps (converged as far as the float type
# allows).
DEFAULT_FULL_DATA = optax.lbfgs()  # until the model's size is known
# L-BFGS keeps 2 x memory_size vectors of the params per member: up to this many
# values in all, with memory_size from 10 (optax's default) to 50.
LBFGS_MEMORY_VALUES = 1_000_000
_full_data_lbfgs = {}
DEFAULT_FULL_DATA_STOPPING = EarlyStopping(patience=10, smoothing=0.0, grad_tol=1e-5)
# With mini-batches (a linesearch needs one loss): Adam at 0.01, the step halved each
# time the loss averaged over 100 steps has not improved (relative 1e-4) in 5 such
# averages, down to 0.01 * 2**-6.
DEFAULT_MINI_BATCH = optax.chain(
    optax.adam(1e-2),
    optax.contrib.reduce_on_plateau(
        factor=0.5, patience=5, accumulation_size=100, min_scale=2.0**-6
    ),
)


def full_data_lbfgs(size: int) -> optax.GradientTransformationExtraArgs:
    """EnsembleMAP's default on full data for a model with ``size`` values to fit:
    ``optax.lbfgs`` keeping as many curvature pairs as ``LBFGS_MEMORY_VALUES``
    allows, from 10 (optax's default) to 50. On posteriordb's posteriors (the
    posteriordb page) a memory of 50 took 107-137 iterations on mesquite (8 values;
    263-591 with 10) and 80-107 on the Poisson GP (13 values; 239-349), and about as
    many as 10 on the others; a memory longer than the number of iterations is BFGS."""
    memory = int(np.clip(LBFGS_MEMORY_VALUES // (2 * max(size, 1)), 10, 50))
    if memory not in _full_data_lbfgs:
        _full_data_lbfgs[memory] = optax.lbfgs(memory_size=memory)
    return _full_data_lbfgs[memory]


def uses_linesearch(optim) -> bool:
    """Whether ``optim`` is an optax transformation with a linesearch in its state
    (found abstractly: nothing is computed)."""
    if not isinstance(optim, optax.GradientTransformationExtraArgs):
        return False
    try:
        state = jax.eval_shape(optim.init, {"x": jax.ShapeDtypeStruct((1,), jnp.float32)})
    except Exception:  # an optimizer whose init needs more than params of one shape
        return False
    return bool(linesearch_states(state))


def as_numpyro(optim):
    """What ``SVI`` is given for ``optim``: a :class:`LinesearchOptim` for an optax
    transformation with a linesearch, NumPyro's own wrapper for other optax
    transformations, and anything else unchanged (``SVI`` checks it)."""
    if uses_linesearch(optim):
        return LinesearchOptim(optim)
    if isinstance(optim, optax.GradientTransformation):
        return optax_to_numpyro(optim)
    return optim


class LinesearchOptim(_NumPyroOptim):
    """
    A NumPyro optimizer around an optax transformation whose ``update`` takes
    ``value``, ``grad`` and ``value_fn`` (e.g. ``optax.lbfgs()``). Its state is
    NumPyro's for optax, ``(step, (params, opt_state))``.

    :param transformation: an ``optax.GradientTransformationExtraArgs``.
    """

    def __init__(self, transformation: optax.GradientTransformationExtraArgs):
        self.transformation = transformation
        self.update_with_value = True
        self.init_fn = lambda params: (params, transformation.init(params))
        self.get_params_fn = lambda state: state[0]

    def update_fn(self, step, grads, state, value=None):
        raise NotImplementedError(
            f"{type(self).__name__} needs the loss as a function of the params; use "
            f"eval_and_update (as SVI.update does)."
        )

    def _step(self, fn, state, forward_mode_differentiation):
        step, (params, opt_state) = state
        (value, aux), grads = _value_and_grad(
            fn, x=params, forward_mode_differentiation=forward_mode_differentiation
        )
        updates, opt_state = self.transformation.update(
            grads, opt_state, params, value=value, grad=grads, value_fn=lambda p: fn(p)[0]
        )
        new = (step + 1, (optax.apply_updates(params, updates), opt_state))
        return (value, aux), grads, new

    def eval_and_update(self, fn, state, forward_mode_differentiation=False):
        out, _, new = self._step(fn, state, forward_mode_differentiation)
        return out, new

    def eval_and_stable_update(self, fn, state, forward_mode_differentiation=False):
        (value, aux), grads, new = self._step(fn, state, forward_mode_differentiation)
        finite = jnp.isfinite(value) & jnp.isfinite(ravel_pytree(grads)[0]).all()
        finite &= jnp.isfinite(ravel_pytree(new[1][0])[0]).all()
        new = jax.tree.map(lambda n, o: lax.select(finite, n, o), new, state)
        return (jnp.where(finite, value, jnp.nan), aux), new

    def __getstate__(self):
        return {"transformation": self.transformation}

    def __setstate__(self, state):
        self.__init__(state["transformation"])


def _is_point(fn) -> bool:
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def check_optimizer(ensemble, info, args, kwargs) -> None:
    """For a linesearch optimizer, :func:`check_deterministic` (after the guide's set-up)."""
    if isinstance(ensemble.optim, LinesearchOptim):
        check_deterministic(ensemble, info, args, kwargs)


def check_deterministic(ensemble, info, args, kwargs) -> None:
    """A linesearch optimizer needs the same loss at every evaluation: no
    subsampled plates, and a guide that draws nothing at random (every latent site
    of the model a point of the guide). Raised before anything is compiled."""
    name = type(ensemble).__name__
    if info.plates:
        raise ValueError(
            f"{name}: a linesearch optimizer (e.g. optax.lbfgs) needs a deterministic loss, "
            f"but the model subsamples the plates {[p.name for p in info.plates]}: each step "
            f"sees another mini-batch. Fit on full data, or use an optimizer without a "
            f"linesearch (e.g. optax.adam) for mini-batches."
        )
    args, kwargs = member_args(args, kwargs, 0)
    guide_trace = trace(seed(ensemble.guide, 0)).get_trace(
        *args, **kwargs, **ensemble.static_kwargs
    )
    random_sites = [
        site_name
        for site_name, site in guide_trace.items()
        if site["type"] == "sample" and not site["is_observed"] and not _is_point(site["fn"])
    ]
    if info.error is None:  # latent sites the guide leaves to the model's prior
        random_sites += [s for s in info.latent if s not in guide_trace]
    if random_sites:
        raise ValueError(
            f"{name}: a linesearch optimizer (e.g. optax.lbfgs) needs a deterministic loss, "
            f"but the sites {random_sites} are drawn at random at every step (a Monte Carlo "
            f"ELBO). Use a point guide (EnsembleMAP, AutoDelta, AutoLaplaceApproximation), "
            f"or an optimizer without a linesearch (e.g. optax.adam) for this guide."
        )
