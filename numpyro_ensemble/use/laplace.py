r"""Laplace members: a Gaussian around every member's point.

Member :math:`e` becomes, at :math:`u_e` the mode of the unconstrained density
nearest its point,

.. math::

    q_e(u) = \mathcal{N}\big(u \mid u_e,\; H_e^{-1}\big), \qquad
    H_e = \nabla^2_u \big[-\log p(y, T(u)) - \log |\det J_T(u)|\big]\Big|_{u = u_e},

the Laplace approximation in the unconstrained space, as NumPyro's
``AutoLaplaceApproximation`` builds it (:math:`T` the transform to the latent
sites' supports, the bracket NumPyro's ``potential_energy``, on the full data).
A MAP point (``EnsembleMAP``, ``AutoDelta``) is the mode of the *constrained*
density, which lacks the log-Jacobian: where they differ (a scale near zero, as in a
hierarchical model's MAP) the point is moved to :math:`u_e` by L-BFGS on the
potential energy first (at most 200 iterations; an ``AutoLaplaceApproximation``
member's point is :math:`u_e` already).
The members are returned as an ensemble of ``AutoMultivariateNormal`` members
(``loc = u_e``, ``scale_tril`` the Cholesky factor of :math:`H_e^{-1}`), which
every function that uses a fitted ensemble takes as it is: draws, predictions,
export, MCMC starts, and importance weights with the mixture of the Laplace
approximations as the proposal (PSIS's :math:`\hat k` says whether it suffices).
The same params start a variational fit there (a warm start):
``EnsembleSVI(model, AutoMultivariateNormal(model), ...).run(..., init_params=params)``;
:func:`~numpyro_ensemble.laplace_init_params` gives the start for ``AutoNormal``,
``AutoDiagonalNormal`` and ``AutoLowRankMultivariateNormal`` members.

A member whose Hessian is not positive definite (a saddle, a flat direction) has
no Laplace approximation: its params are NaN, so it is excluded like a diverged
member, with a warning naming it.
"""

from __future__ import annotations

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.distribution import validation_enabled
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import cholesky_of_inverse
from numpyro.handlers import substitute
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import (
    AutoLaplaceApproximation,
    AutoMultivariateNormal,
    _ravel_dict,
)
from numpyro.infer.svi import SVIRunResult
from numpyro.infer.util import potential_energy
import optax

from numpyro_ensemble.engine import loop, starts
from numpyro_ensemble.engine.batching import full_data
from numpyro_ensemble.engine.checks import warn
from numpyro_ensemble.engine.health import usable_params
from numpyro_ensemble.engine.members import SplitArgs, apply_members, map_members
from numpyro_ensemble.fit.svi import EnsembleSVI, check_ensemble
from numpyro_ensemble.use.fitted import check_params, mark_laplace, model_params

__all__ = ["laplace_members"]

# The optimizer of the returned ensemble, for a variational fit started from the
# Laplace members (one object, so such fits share their compiled programs).
WARM_START_OPTIM = optax.adam(1e-3)
# From a MAP point to the mode of the unconstrained density (see _mode).
MODE_ITERATIONS = 200


def _twin(ensemble):
    """The ensemble's ``AutoMultivariateNormal`` twin (same model, size and layout),
    made once per ensemble."""
    twin = getattr(ensemble, "_laplace_twin", None)
    if twin is None:
        prefix = getattr(ensemble.guide, "prefix", "auto")
        twin = EnsembleSVI(
            ensemble.model,
            AutoMultivariateNormal(ensemble.model, prefix=prefix),
            WARM_START_OPTIM,
            Trace_ELBO(),
            ensemble_size=ensemble.ensemble_size,
            subsample=ensemble.subsample,
            devices=ensemble.mesh,
            members_per_chunk=ensemble.members_per_chunk,
            **ensemble.static_kwargs,
        )
        ensemble._laplace_twin = twin
    return twin


def laplace_members(ensemble, params: dict, *args, **kwargs) -> tuple:
    """
    The Laplace approximation around every member's point, as an ensemble of
    ``AutoMultivariateNormal`` members (see :mod:`numpyro_ensemble.use.laplace`).

    The points are the members' medians: the MAP points of an
    :class:`~numpyro_ensemble.EnsembleMAP` (or an ``AutoDelta`` ensemble), the modes
    of an ``AutoLaplaceApproximation`` ensemble (whose draws everywhere come from
    these Laplace members), or the medians of another guide. Hessians are taken
    per member at the mode of the unconstrained density nearest its point (see
    :mod:`numpyro_ensemble.use.laplace`), on the full data and
    with the member's own values of the model's ``numpyro.param`` sites.

    **Example** (a mixture of Laplace approximations from a MAP ensemble, and
    importance weights over it)::

        ens = EnsembleMAP(model, ensemble_size=8)
        result = ens.run(random.key(0), 500, x, y)
        laplace, laplace_params = laplace_members(ens, result.params, x, y)
        weights = importance_weights(laplace, random.key(1), laplace_params, x, y)
        draws = sample_posterior(laplace, random.key(2), laplace_params, x, y, weights=weights)
        # the Laplace members have no losses: the summary checks the points' run
        summary = ensemble_summary(laplace, random.key(3), result._replace(params=laplace_params),
                                   x, y, weights=weights)

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` or
        :class:`~numpyro_ensemble.EnsembleMAP` whose guide has a ``median``.
    :param dict params: the ensemble's params, e.g. ``run(...).params``.
    :param args: the model's arguments, with the data it was fit to.
    :param kwargs: the model's keyword arguments.
    :return: ``(laplace, laplace_params)``: an :class:`~numpyro_ensemble.EnsembleSVI`
        with an ``AutoMultivariateNormal`` guide (set up, ready for
        :func:`~numpyro_ensemble.sample_posterior` and the other functions, or for
        ``run(..., init_params=laplace_params)``) and its params: ``{prefix}_loc``
        ``(E, D)``, ``{prefix}_scale_tril`` ``(E, D, D)`` and the model's own params.
    """
    check_ensemble(ensemble, "laplace_members")
    check_params(ensemble, params)
    if not callable(getattr(ensemble.guide, "median", None)):
        raise TypeError(
            f"laplace_members needs a guide with a median (an AutoGuide such as AutoDelta or "
            f"AutoLaplaceApproximation), got {type(ensemble.guide).__name__}."
        )
    twin = _twin(ensemble)
    split = ensemble._split(args, kwargs)
    plates = ensemble._inspect(split).plates
    starts.set_up(twin, random.key(0), args, kwargs, loop.programs(twin), need_reference=False)
    safe, finite = usable_params(params, "laplace_members")
    own = model_params(ensemble, safe, args, kwargs)
    with validation_enabled(False):  # NumPyro's checks of constants run op by op as it traces
        found = _hessians(ensemble, twin, plates, split, safe, own)
    loc, scale_tril, eigenvalues = (np.asarray(v) for v in found)
    positive = (
        finite
        & np.isfinite(loc).all(axis=1)
        & (eigenvalues > 0).all(axis=1)
        & np.isfinite(scale_tril).all(axis=(1, 2))
    )
    return twin, _params(twin, loc, scale_tril, positive, finite, own)


def _hessians(ensemble, twin, plates, split, params, own):
    """Every member's unconstrained point ``(E, D)``, the Cholesky factor of the
    inverse of the potential energy's Hessian there ``(E, D, D)`` and the Hessian's
    eigenvalues ``(E, D)`` (NaN where it cannot be factored, not an error), in one
    jitted pass (compiled once per twin and shapes)."""
    programs = twin.__dict__.setdefault("_laplace_programs", {})
    key = (plates, split.axes, split.static)
    if key not in programs:
        programs[key] = _hessian_program(ensemble, twin, plates, split)
    return programs[key](params, own, split.dynamic)


def _hessian_program(ensemble, twin, plates, split):
    model = full_data(ensemble.model, plates)
    guide, layout = ensemble.guide, twin.guide
    static_kwargs = ensemble.static_kwargs
    sites = layout._init_locs

    def member(m, args, kwargs):
        member_params, member_own = m
        kwargs = {**kwargs, **static_kwargs}
        if isinstance(guide, AutoLaplaceApproximation):
            u = member_params[f"{guide.prefix}_loc"]
        else:  # the member's point, constrained, sent to the unconstrained space
            point = guide.median(member_params)
            u, _ = _ravel_dict(  # in the layout of the guide's latent vector
                {
                    name: biject_to(layout.prototype_trace[name]["fn"].support).inv(point[name])
                    for name in sites
                }
            )
        at = substitute(model, data=member_own)

        def potential(z):
            return potential_energy(at, args, kwargs, layout._unpack_latent(z))

        if not isinstance(guide, AutoLaplaceApproximation):
            # A MAP point is the mode of the constrained density; the Laplace
            # approximation is centred at the mode of the unconstrained one (which
            # adds the transform's log-Jacobian), a few L-BFGS steps away.
            u = _mode(potential, u)
        precision = jax.hessian(potential)(u)
        symmetric = 0.5 * (precision + precision.T)
        return u, cholesky_of_inverse(precision), jnp.linalg.eigvalsh(symmetric)

    @jax.jit
    def run(params, own, dynamic):
        return apply_members(
            member,
            (params, own),
            SplitArgs(dynamic, split.axes, split.static),
            mesh=ensemble.mesh,
            members_per_chunk=ensemble.members_per_chunk,
        )

    return run


def _mode(fn, u, max_iterations: int = MODE_ITERATIONS):
    """L-BFGS (optax's, zoom linesearch) on ``fn`` from ``u`` until the gradient's norm
    is below ``sqrt(eps) (1 + |fn|)`` (the float type's ``eps``) or ``max_iterations``."""
    optimizer = optax.lbfgs()
    tolerance = float(np.sqrt(np.finfo(u.dtype).eps))
    value_and_grad = optax.value_and_grad_from_state(fn)

    def step(carry):
        z, state = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = optimizer.update(
            grad, state, z, value=value, grad=grad, value_fn=fn
        )
        return optax.apply_updates(z, updates), state

    def moving(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        value = optax.tree.get(state, "value")
        small = optax.tree.norm(grad) <= tolerance * (1.0 + jnp.abs(value))
        return (count == 0) | ((count < max_iterations) & ~small & jnp.isfinite(value))

    z, _ = jax.lax.while_loop(moving, step, (u, optimizer.init(u)))
    return z


def resolve(ensemble, params, args, kwargs, with_data: bool = True):
    """What the functions that draw from an ensemble use: for an
    ``AutoLaplaceApproximation`` ensemble its Laplace members (each member's own
    Hessian), for any other ensemble itself. Without the data (``with_data=False``:
    predictions at new inputs) the Hessians are NumPyro's own
    (``AutoLaplaceApproximation.get_transform``, on the data the guide was set up with)."""
    if not isinstance(ensemble.guide, AutoLaplaceApproximation):
        return ensemble, params
    if with_data:
        return laplace_members(ensemble, params, *args, **kwargs)
    return _from_guide(ensemble, params, args, kwargs)


def _from_guide(ensemble, params, args, kwargs):
    check_params(ensemble, params)
    twin = _twin(ensemble)
    starts.set_up(twin, random.key(0), args, kwargs, loop.programs(twin), need_reference=False)
    safe, finite = usable_params(params, "ensemble_predictive")
    programs = twin.__dict__.setdefault("_laplace_programs", {})
    if "guide" not in programs:
        guide = ensemble.guide

        def member(member_params, _):
            transform = guide.get_transform(member_params)
            return transform.loc, transform.scale_tril

        programs["guide"] = jax.jit(lambda p: map_members(member, p))
    loc, scale_tril = (np.asarray(v) for v in programs["guide"](safe))
    # NumPyro turns the factor of a Hessian that is not positive definite into zeros
    positive = finite & (np.abs(np.diagonal(scale_tril, axis1=1, axis2=2)) > 0).all(axis=1)
    own = model_params(ensemble, safe, args, kwargs)
    return twin, _params(twin, loc, scale_tril, positive, finite, own)


def _params(twin, loc, scale_tril, positive, finite, own):
    """The twin's params; members without a Laplace approximation NaN, with a warning."""
    flagged = np.flatnonzero(finite & ~positive).tolist()
    if flagged:
        warn(
            f"laplace_members: members {flagged} of {finite.size} have a Hessian that is not "
            f"positive definite at their point (a saddle or a flat direction), so no Laplace "
            f"approximation: they are excluded (NaN params, weight 0).",
            RuntimeWarning,
        )
    bad = ~positive[:, None]
    prefix = twin.guide.prefix
    params = {
        f"{prefix}_loc": jax.device_put(np.where(bad, np.nan, loc)),
        f"{prefix}_scale_tril": jax.device_put(np.where(bad[..., None], np.nan, scale_tril)),
        **own,
    }
    mark_laplace(twin, params[f"{prefix}_loc"])
    return params


def resolve_result(ensemble, result, args, kwargs):
    """:func:`resolve` for a ``run`` result (its losses kept) or params."""
    if not isinstance(ensemble.guide, AutoLaplaceApproximation):
        return ensemble, result
    if isinstance(result, SVIRunResult):
        twin, params = resolve(ensemble, result.params, args, kwargs)
        return twin, result._replace(params=params)
    return resolve(ensemble, result, args, kwargs)
