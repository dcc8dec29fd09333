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
member's point is :math:`u_e` already). Where every latent site is unconstrained
(a network's weights) the two modes coincide, and beyond the full structure the
point is taken as it is, as laplace-torch does.

:math:`H_e` is the exact Hessian (``curvature="hessian"``) or the generalized
Gauss-Newton matrix (``"ggn"``, :mod:`numpyro_ensemble.use.curvature`): the
likelihood's Fisher through the Jacobian of its parameters plus the prior's Hessian,
positive definite where a network's Hessian is not. It is kept whole
(``structure="full"``: ``AutoMultivariateNormal`` members, ``scale_tril`` the
Cholesky factor of :math:`H_e^{-1}`), as its diagonal (``"diagonal"``:
``AutoDiagonalNormal``) or as the prior's diagonal plus the top-``rank`` eigenpairs
of the likelihood term, found by Lanczos on GGN-vector products
(:mod:`numpyro_ensemble.use.lanczos`; ``"lowrank"``:
:class:`~numpyro_ensemble.AutoLowRankPrecisionNormal`), which needs memory
:math:`O(E D k)`, never :math:`D \times D`. No JAX library of these is installable
here (laplax is not on the registry): they are built on ``jax.linearize`` /
``jax.linear_transpose`` and ``jax.lax``.

The members are returned as an ensemble of that guide, which every function that
uses a fitted ensemble takes as it is: draws, predictions, export, MCMC starts, and
importance weights with the mixture of the Laplace approximations as the proposal
(PSIS's :math:`\hat k` says whether it suffices). The full structure's params start
a variational fit there (a warm start):
``EnsembleSVI(model, AutoMultivariateNormal(model), ...).run(..., init_params=params)``;
:func:`~numpyro_ensemble.laplace_init_params` gives the start for ``AutoNormal``,
``AutoDiagonalNormal`` and ``AutoLowRankMultivariateNormal`` members.

A member without a Laplace approximation -- a point that is not finite, a
curvature that is not positive definite (a saddle, a flat direction), no mode near
its point (the mode search did not converge and the density still rises: a funnel)
-- gets NaN params, so it is excluded like a diverged member, with a warning;
:func:`~numpyro_ensemble.laplace_exclusions` says why for each.
"""

from __future__ import annotations

import jax
from jax import random
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
import numpy as np
from numpyro.distributions.distribution import validation_enabled
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import cholesky_of_inverse
from numpyro.handlers import substitute
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoMultivariateNormal,
    _ravel_dict,
)
from numpyro.infer.svi import SVIRunResult
import optax

from numpyro_ensemble.engine import starts
from numpyro_ensemble.engine.batching import full_data
from numpyro_ensemble.engine.checks import warn
from numpyro_ensemble.engine.guides import share_prototype
from numpyro_ensemble.engine.health import usable_params
from numpyro_ensemble.engine.members import apply_members_jitted, map_members
from numpyro_ensemble.fit.svi import EnsembleSVI, check_ensemble
from numpyro_ensemble.use.curvature import (
    Potential,
    dense_ggn,
    ggn_likelihood_diagonal,
    hessian_diagonal,
    likelihood_sites,
    linearize_likelihood,
    prior_diagonal,
    site_ranges,
)
from numpyro_ensemble.use.evidence import optimal_prior_scale
from numpyro_ensemble.use.fitted import check_params, mark_laplace, model_params
from numpyro_ensemble.use.lanczos import top_eigenpairs
from numpyro_ensemble.use.laplace_choices import (
    FULL_UP_TO,
    check_choices,
    real_supports,
    resolve_choices,
)
from numpyro_ensemble.use.laplace_guides import AutoLowRankPrecisionNormal
from numpyro_ensemble.use.laplace_sites import HELD_SUFFIX, check_sites, held_model

__all__ = ["laplace_members"]

# The optimizer of the returned ensemble, for a variational fit started from the
# Laplace members (one object, so such fits share their compiled programs).
WARM_START_OPTIM = optax.adam(1e-3)
# From a MAP point to the mode of the unconstrained density (see _mode).
MODE_ITERATIONS = 200
# A member whose mode search did not converge has no mode near its point (e.g. a
# funnel) where its curvature is not positive definite there, or where its Newton
# decrement g^T P^{-1} g / 2 (the log density a Newton step would still gain) is above
# this many nats per latent value. (Measured: a 1-32-32-1 network after the search's
# 200 L-BFGS iterations, 2.7-3.5 nats in all for 1,153 values; centred eight schools'
# MAP points, tau ~ 1e-8, a curvature that is not positive definite.)
NO_MODE_DECREMENT = 1.0
REASONS = {
    "diverged": "its point is not finite (the member diverged)",
    "indefinite": "the curvature is not positive definite at its point (a saddle or a flat direction)",
    "no_mode": (
        "no mode near its point: the search for the mode of the unconstrained density did "
        "not converge and the density still rises along some direction (as in a funnel, "
        "or an improper posterior)"
    ),
    "prior": (
        "the prior's curvature within a site is not diagonal at this dimension, which "
        "structure='diagonal' / 'lowrank' need (use structure='full')"
    ),
}
_GUIDES = {"full": AutoMultivariateNormal, "diagonal": AutoDiagonalNormal}


def _twin(
    ensemble, structure: str = "full", rank: int | None = None, sites: tuple = (), held: tuple = ()
):
    """The ensemble's twin for a structure (same model, size and layout):
    ``AutoMultivariateNormal`` (full), ``AutoDiagonalNormal`` (diagonal) or
    :class:`~numpyro_ensemble.AutoLowRankPrecisionNormal` (lowrank, of ``rank``),
    made once per ensemble, structure and ``sites`` (with ``sites``, over those
    latent sites, the ``held`` ones at each member's point: see
    :mod:`numpyro_ensemble.use.laplace_sites`)."""
    twins = ensemble.__dict__.setdefault("_laplace_twins", {})
    key = (structure, rank if structure == "lowrank" else None, sites)
    if key not in twins:
        prefix = getattr(ensemble.guide, "prefix", "auto")
        model = ensemble.model
        if sites:
            trace = ensemble.guide.prototype_trace
            model = held_model(model, held, {name: trace[name]["value"] for name in held})
        if structure == "lowrank":
            guide = AutoLowRankPrecisionNormal(model, prefix=prefix, rank=rank)
        else:
            guide = _GUIDES[structure](model, prefix=prefix)
        twins[key] = EnsembleSVI(
            model,
            guide,
            WARM_START_OPTIM,
            Trace_ELBO(),
            ensemble_size=ensemble.ensemble_size,
            subsample=ensemble.subsample,
            devices=ensemble.mesh,
            members_per_chunk=ensemble.members_per_chunk,
            **ensemble.static_kwargs,
        )
        twins[key]._laplace_held = held
    return twins[key]


def _set_up(twin, args, kwargs, fitted=None):
    """``twin`` set up: the prototype of ``fitted`` (the ensemble's guide) where it has
    one (NumPyro's own set-up compiles one small program per array operation), else
    its own."""
    if fitted is not None and twin.guide.prototype_trace is None and twin.constrain_fn is None:
        share_prototype(twin.guide, fitted)
    starts.set_up(twin, random.key(0), args, kwargs, need_reference=False)
    return twin


def laplace_members(
    ensemble,
    params: dict,
    *args,
    curvature: str = "auto",
    structure: str = "auto",
    rank: int = 20,
    prior_precision: str = "model",
    sites=None,
    **kwargs,
) -> tuple:
    """
    The Laplace approximation around every member's point, as an ensemble of
    Gaussian members (see :mod:`numpyro_ensemble.use.laplace`).

    The points are the members' medians: the MAP points of an
    :class:`~numpyro_ensemble.EnsembleMAP` (or an ``AutoDelta`` ensemble), the modes
    of an ``AutoLaplaceApproximation`` ensemble (whose draws everywhere come from
    these Laplace members), or the medians of another guide. The curvature is taken
    per member at the mode of the unconstrained density nearest its point (see
    :mod:`numpyro_ensemble.use.laplace`), on the full data and with the member's own
    values of the model's ``numpyro.param`` sites.

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
    :param str curvature: ``"hessian"`` (the exact Hessian of the potential energy),
        ``"ggn"`` (the generalized Gauss-Newton matrix: the likelihood's Fisher pushed
        through the Jacobian of its parameters, plus the prior's Hessian; positive
        semi-definite where a network's Hessian is not; for ``Normal``,
        ``Bernoulli``, ``Categorical`` and ``Poisson`` likelihoods) or ``"auto"``:
        the GGN above 100 latent values (or for ``"lowrank"``) where the likelihood
        allows it, else the Hessian.
    :param str structure: ``"full"`` (a dense precision, ``AutoMultivariateNormal``
        members), ``"diagonal"`` (its diagonal, ``AutoDiagonalNormal``), ``"lowrank"``
        (the prior's diagonal plus the top ``rank`` eigenpairs of the GGN's
        likelihood term by Lanczos, never a ``D x D`` array,
        :class:`~numpyro_ensemble.AutoLowRankPrecisionNormal`) or ``"auto"``: full up
        to 1000 latent values, above that low-rank (GGN) or diagonal (Hessian).
    :param int rank: the rank of ``"lowrank"``.
    :param str prior_precision: ``"model"`` (the model's prior as written) or
        ``"evidence"``: per member, the prior's precision scaled by the factor that
        maximizes the member's Laplace evidence at its point
        (:mod:`numpyro_ensemble.use.evidence`; Gaussian priors, the GGN); the
        factors are :func:`~numpyro_ensemble.laplace_prior_precision`. The points
        stay the model's MAP points, as in Laplace Redux's post-hoc choice.
    :param sites: latent site names (e.g. a network's last layer): the Laplace
        approximation over those sites only, every other latent site held at each
        member's point (:mod:`numpyro_ensemble.use.laplace_sites`: the members' model
        observes them at the params ``{site}_held``, which the returned params
        hold); ``structure="auto"`` is then ``"full"``. Default: all latent sites.
    :param kwargs: the model's keyword arguments.
    :return: ``(laplace, laplace_params)``: an :class:`~numpyro_ensemble.EnsembleSVI`
        with the structure's guide (set up, ready for
        :func:`~numpyro_ensemble.sample_posterior` and the other functions, or for
        ``run(..., init_params=laplace_params)``) and its params: ``{prefix}_loc``
        ``(E, D)`` and ``{prefix}_scale_tril`` ``(E, D, D)`` (full),
        ``{prefix}_scale`` ``(E, D)`` (diagonal) or ``{prefix}_prec_factor``
        ``(E, D, rank)`` and ``{prefix}_prec_diag`` ``(E, D)`` (lowrank), with the
        model's own params. Members without a Laplace approximation have NaN params;
        :func:`~numpyro_ensemble.laplace_exclusions` says why.
    """
    check_ensemble(ensemble, "laplace_members")
    check_params(ensemble, params)
    if not callable(getattr(ensemble.guide, "median", None)):
        raise TypeError(
            f"laplace_members needs a guide with a median (an AutoGuide such as AutoDelta or "
            f"AutoLaplaceApproximation), got {type(ensemble.guide).__name__}."
        )
    check_choices(curvature, structure, rank, prior_precision)
    split = ensemble._split(args, kwargs)
    info = ensemble._inspect(split)
    sites = check_sites(sites, info.latent)
    held = tuple(name for name in info.latent if name not in sites) if sites else ()
    # the twin to set up first: the likely result, or the diagonal one (cheap at any D)
    guess = structure
    if guess == "auto":
        small = info.error is None and (info.size <= FULL_UP_TO or sites)
        guess = "full" if small else "diagonal"
    if getattr(ensemble.guide, "prototype_trace", None) is None:  # params from elsewhere
        _set_up(ensemble, args, kwargs)
    fitted = None if sites else ensemble.guide  # (another model: a prototype of its own)
    layout = _set_up(_twin(ensemble, guess, rank, sites, held), args, kwargs, fitted)
    dim = layout.guide.latent_dim
    curvature, structure = resolve_choices(
        curvature, structure, rank, dim, layout.guide.prototype_trace, prior_precision
    )
    if structure != guess:
        layout = _set_up(_twin(ensemble, structure, rank, sites, held), args, kwargs, fitted)
    twin = layout
    safe, finite = usable_params(params, "laplace_members")
    own = model_params(ensemble, safe, args, kwargs)
    evidence = prior_precision == "evidence"
    with validation_enabled(False):  # NumPyro's checks of constants run op by op as it traces
        found = apply_members_jitted(
            twin, ("laplace", info.plates, curvature, structure, evidence),
            lambda: _member(ensemble, twin, info.plates, curvature, structure, evidence),
            (safe, own), split,
        )
    found, at_points = found
    loc, factors, positive, decrement, converged, exact, scale = jax.tree.map(np.asarray, found)
    reasons = _reasons(loc, positive, decrement, converged, exact, finite)
    own = {**own, **at_points}  # with sites: the others' values at the members' points
    return twin, _params(twin, structure, loc, factors, reasons, own, scale)


def _member(ensemble, twin, plates, curvature, structure, evidence):
    """One member's pass (compiled for all at once): its unconstrained point, its
    precision's factors for ``structure``, whether they are usable (positive
    definite), the Newton decrement there, whether the mode search converged and
    whether the prior's diagonal is exact (see ``prior_diagonal``), and the factor of
    the prior precision (the evidence's optimum, or 1)."""
    model = full_data(twin.model, plates)
    guide, layout = ensemble.guide, twin.guide
    held = twin._laplace_held
    static_kwargs = ensemble.static_kwargs
    sites = layout._init_locs
    trace = layout.prototype_trace
    observed = likelihood_sites(trace)
    ranges = site_ranges(layout)
    laplace_guide = isinstance(guide, AutoLaplaceApproximation) and not held
    # The search moves a MAP point (the mode of the constrained density) to the mode of
    # the unconstrained one; they coincide where every support is the real line, and
    # beyond the full structure's size the search is skipped there.
    search = not laplace_guide and (structure == "full" or not real_supports(trace, sites))
    rank = getattr(layout, "rank", None)

    def member(m, args, kwargs):
        member_params, member_own = m
        at_points = {}
        if laplace_guide:
            u = member_params[f"{guide.prefix}_loc"]
        else:  # the member's point, constrained, sent to the unconstrained space
            point = guide.median(member_params)
            u, _ = _ravel_dict(  # in the layout of the guide's latent vector
                {name: biject_to(trace[name]["fn"].support).inv(point[name]) for name in sites}
            )
            at_points = {name + HELD_SUFFIX: point[name] for name in held}
        return laplace_at(u, {**member_own, **at_points}, args, kwargs), at_points

    def laplace_at(u, member_own, args, kwargs):
        kwargs = {**kwargs, **static_kwargs}
        potential = Potential(
            substitute(model, data=member_own), args, kwargs, layout._unpack_latent, observed
        )
        converged = jnp.array(True)
        if search:
            u, converged = _mode(potential, u)
        grad = jax.grad(potential)(u)
        one = jnp.ones((), u.dtype)
        if structure == "full":
            if curvature == "hessian":
                precision, scale = jax.hessian(potential)(u), one
            else:
                prior = jax.hessian(potential.prior)(u)
                likelihood = dense_ggn(potential, u) - prior
                scale = _full_scale(prior, likelihood, potential, u) if evidence else one
                precision = likelihood + scale * prior
            # The Cholesky factor exists (is finite) exactly where the precision is
            # positive definite. (No eigvalsh beside it: jaxlib 0.10's batched LAPACK
            # kernels each wait on the CPU thread pool, and two running at once on
            # two cores deadlock -- measured here with E = 8 members.)
            scale_tril = cholesky_of_inverse(precision)
            positive = jnp.isfinite(scale_tril).all()
            solved = scale_tril.T @ grad
            decrement = 0.5 * jnp.vdot(solved, solved)
            return u, (scale_tril,), positive, decrement, converged, jnp.array(True), scale
        if structure == "diagonal":
            if curvature == "hessian":
                diagonal, exact, scale = hessian_diagonal(potential, u), jnp.array(True), one
            else:
                prior, exact = prior_diagonal(potential, u, ranges)
                likelihood = ggn_likelihood_diagonal(potential, u)
                scale = one
                if evidence:
                    relative = likelihood / jnp.where(prior > 0, prior, 1.0)
                    scale = optimal_prior_scale(relative, _quadratic(potential, u, prior))
                diagonal = likelihood + scale * prior
            positive = (diagonal > 0).all() & exact
            safe = jnp.where(diagonal > 0, diagonal, 1.0)
            decrement = 0.5 * jnp.sum(grad**2 / safe)
            return u, (jax.lax.rsqrt(safe),), positive, decrement, converged, exact, scale
        # lowrank: precision c diag(prior) + W W^T, W from the likelihood GGN's top pairs
        lin = linearize_likelihood(potential, u)
        values, vectors = top_eigenpairs(lin.matvec, u.shape[0], rank, dtype=u.dtype)
        prec_factor = vectors * jnp.sqrt(jnp.maximum(values, 0.0))
        prior, exact = prior_diagonal(potential, u, ranges)
        safe = jnp.where(prior > 0, prior, 1.0)
        scale = one
        if evidence:  # the nonzero relative eigenvalues: those of W^T D^{-1} W
            relative = jnp.linalg.eigvalsh(prec_factor.T @ (prec_factor / safe[:, None]))
            scale = optimal_prior_scale(relative, _quadratic(potential, u, prior))
        safe = scale * safe
        positive = (prior > 0).all() & exact & jnp.isfinite(prec_factor).all()
        # Woodbury: P^{-1} g = D^{-1} g - D^{-1} W (I + W^T D^{-1} W)^{-1} W^T D^{-1} g
        dg = grad / safe
        wd = prec_factor.T / safe
        inner = jnp.eye(rank, dtype=u.dtype) + wd @ prec_factor
        solved = dg - wd.T @ jnp.linalg.solve(inner, prec_factor.T @ dg)
        decrement = 0.5 * jnp.vdot(grad, solved)
        return u, (prec_factor, safe), positive, decrement, converged, exact, scale

    return member


def _quadratic(potential, u, prior_diagonal):
    """:math:`g_0^\top P_0^{-1} g_0` for a diagonal prior precision (see
    :mod:`numpyro_ensemble.use.evidence`)."""
    g0 = jax.grad(potential.prior)(u)
    return jnp.sum(g0**2 / jnp.where(prior_diagonal > 0, prior_diagonal, 1.0))


def _full_scale(prior, likelihood, potential, u):
    """The evidence-optimal factor of a dense prior precision ``prior``: the
    likelihood's eigenvalues relative to it, by its Cholesky factor."""
    factor = jnp.linalg.cholesky(prior)
    inner = solve_triangular(factor, solve_triangular(factor, likelihood, lower=True).T, lower=True)
    g0 = solve_triangular(factor, jax.grad(potential.prior)(u), lower=True)
    return optimal_prior_scale(jnp.linalg.eigvalsh(0.5 * (inner + inner.T)), jnp.vdot(g0, g0))


def _mode(fn, u, max_iterations: int = MODE_ITERATIONS):
    """L-BFGS (optax's, zoom linesearch) on ``fn`` from ``u`` until the gradient's norm
    is below ``sqrt(eps) (1 + |fn|)`` (the float type's ``eps``) or ``max_iterations``;
    the point and whether it stopped before ``max_iterations`` at a finite value."""
    optimizer = optax.lbfgs()
    tolerance = float(np.sqrt(np.finfo(u.dtype).eps))
    value_and_grad = optax.value_and_grad_from_state(fn)

    def step(carry):
        z, state = carry
        value, grad = value_and_grad(z, state=state)
        updates, state = optimizer.update(grad, state, z, value=value, grad=grad, value_fn=fn)
        return optax.apply_updates(z, updates), state

    def moving(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        value = optax.tree.get(state, "value")
        small = optax.tree.norm(grad) <= tolerance * (1.0 + jnp.abs(value))
        return (count == 0) | ((count < max_iterations) & ~small & jnp.isfinite(value))

    z, state = jax.lax.while_loop(moving, step, (u, optimizer.init(u)))
    count = optax.tree.get(state, "count")
    value = optax.tree.get(state, "value")
    return z, (count < max_iterations) & jnp.isfinite(value) & jnp.isfinite(z).all()


def resolve(ensemble, params, args, kwargs, with_data: bool = True):
    """What the functions that draw from an ensemble use: for an
    ``AutoLaplaceApproximation`` ensemble its Laplace members (each member's own
    Hessian), for any other ensemble itself. Without the data (``with_data=False``:
    predictions at new inputs) the Hessians are NumPyro's own
    (``AutoLaplaceApproximation.get_transform``, on the data the guide was set up with)."""
    if not isinstance(ensemble.guide, AutoLaplaceApproximation):
        return ensemble, params
    if with_data:
        return laplace_members(
            ensemble, params, *args, curvature="hessian", structure="full", **kwargs
        )
    return _from_guide(ensemble, params, args, kwargs)


def _from_guide(ensemble, params, args, kwargs):
    check_params(ensemble, params)
    # New inputs may lack the observed data (y=None), which would make it a latent site
    # of a twin set up on them: the twin takes the fitted guide's layout.
    twin = _set_up(_twin(ensemble), args, kwargs, ensemble.guide)
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
    positive = (np.abs(np.diagonal(scale_tril, axis1=1, axis2=2)) > 0).all(axis=1)
    ones = np.ones_like(finite)
    reasons = _reasons(loc, positive, np.zeros(finite.shape), ones, ones, finite)
    own = model_params(ensemble, safe, args, kwargs)
    return twin, _params(twin, "full", loc, (scale_tril,), reasons, own)


def _reasons(loc, positive, decrement, converged, exact, finite) -> dict[int, str]:
    """``{member: why}`` for the members without a Laplace approximation."""
    reasons = {}
    for e in range(finite.size):
        if not finite[e]:
            reasons[e] = REASONS["diverged"]
        elif not np.isfinite(loc[e]).all() or (
            not converged[e]
            and (not positive[e] or not decrement[e] <= NO_MODE_DECREMENT * loc.shape[1])
        ):
            reasons[e] = REASONS["no_mode"]
        elif not exact[e]:
            reasons[e] = REASONS["prior"]
        elif not positive[e]:
            reasons[e] = REASONS["indefinite"]
    return reasons


_NAMES = {
    "full": ("loc", "scale_tril"),
    "diagonal": ("loc", "scale"),
    "lowrank": ("loc", "prec_factor", "prec_diag"),
}


def _params(twin, structure, loc, factors, reasons, own, prior_scale=None):
    """The twin's params; members without a Laplace approximation NaN, with a warning."""
    flagged = {}
    for e, why in reasons.items():
        if why != REASONS["diverged"]:
            flagged.setdefault(why, []).append(e)
    for why, members in flagged.items():
        warn(
            f"laplace_members: members {members} of {loc.shape[0]} have no Laplace "
            f"approximation: {why}. They are excluded (NaN params, weight 0).",
            RuntimeWarning,
        )
    bad = np.zeros(loc.shape[0], bool)
    bad[list(reasons)] = True
    prefix = twin.guide.prefix
    params = {}
    for name, value in zip(_NAMES[structure], (loc, *factors), strict=True):
        mask = bad.reshape((-1,) + (1,) * (value.ndim - 1))
        params[f"{prefix}_{name}"] = jax.device_put(np.where(mask, np.nan, value))
    params.update(own)
    if prior_scale is None:
        prior_scale = np.ones(loc.shape[0])
    prior_scale = np.where(bad, np.nan, prior_scale)
    mark_laplace(twin, params[f"{prefix}_loc"], reasons, prior_scale)
    return params


def resolve_result(ensemble, result, args, kwargs):
    """:func:`resolve` for a ``run`` result (its losses kept) or params."""
    if not isinstance(ensemble.guide, AutoLaplaceApproximation):
        return ensemble, result
    if isinstance(result, SVIRunResult):
        twin, params = resolve(ensemble, result.params, args, kwargs)
        return twin, result._replace(params=params)
    return resolve(ensemble, result, args, kwargs)
