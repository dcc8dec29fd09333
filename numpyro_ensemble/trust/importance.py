r"""Importance weights of an SVI ensemble's draws, with the whole ensemble as the proposal.

A draw :math:`z` of member :math:`e` gets the raw log weight

.. math::

    \log w(z) = \log p(y, z) - \log q_{\text{mix}}(z), \qquad
    q_{\text{mix}}(z) = \frac{1}{E} \sum_{e'} q_{e'}(z),

so members that cover the same posterior mass share it instead of counting twice,
and a member far from the posterior gets almost nothing. Both densities are of the
constrained latent values (an AutoGuide's density includes the Jacobian of its
transform), the model is scored on the full data (subsampled plates take all
indices), and the weights are smoothed with ArviZ's PSIS, whose :math:`\hat k`
says whether they can be trusted (:math:`\hat k < 0.7`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray
import numpy as np
from numpyro.distributions.distribution import validation_enabled
from numpyro.handlers import substitute
from numpyro.infer.util import log_density

from numpyro_ensemble.engine.batching import full_data
from numpyro_ensemble.engine.checks import check_key, check_positive_int, warn
from numpyro_ensemble.engine.health import finite_members, usable_params
from numpyro_ensemble.engine.members import has_per_member, map_members, merge_args
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.fitted import check_params, is_laplace, laplace_exclusions, model_params
from numpyro_ensemble.use.posterior import blank_draws, draw_guides, guide_sites
from numpyro_ensemble.use.weights import ImportanceWeights, psis

__all__ = ["importance_weights", "UnusableWeights"]

# Why a member with non-finite params is unusable, when nothing more is known.
NOT_FINITE = "its params are not finite (the member diverged)"
NO_LAPLACE = "its Laplace params are not finite (no Laplace approximation at its point)"


class UnusableWeights(ValueError):
    """Members are usable but none of their draws has a usable importance weight
    (e.g. every draw lies where the model's density is 0); the message says which
    members and why (``ensemble_summary`` reports it in its verdict instead of
    raising). When no member is usable at all, ``importance_weights`` returns weights
    with a ``verdict`` instead."""


def exclusion_reasons(ensemble, params, finite: np.ndarray) -> dict[int, str]:
    """``{member: why}`` for the members with non-finite params: the reasons
    ``laplace_members`` recorded for its Laplace members
    (:func:`~numpyro_ensemble.use.fitted.laplace_exclusions`), else that the params
    are not finite."""
    recorded = laplace_exclusions(ensemble) if is_laplace(ensemble, params) else {}
    default = NO_LAPLACE if is_laplace(ensemble, params) else NOT_FINITE
    return {int(e): recorded.get(int(e), default) for e in np.flatnonzero(~finite)}


def grouped(reasons: dict[int, str]) -> str:
    """``{member: why}`` as ``"members [0, 1, 3]: why; members [2]: other why"``, the
    groups in the order of their first member."""
    groups: dict[str, list[int]] = {}
    for member in sorted(reasons):
        groups.setdefault(reasons[member], []).append(member)
    return "; ".join(f"members {members}: {why}" for why, members in groups.items())


def no_usable_member(ensemble, params, finite: np.ndarray) -> str:
    """The verdict for an ensemble none of whose members is usable (every member's
    params are non-finite): which members, why, and what works instead."""
    why = grouped(exclusion_reasons(ensemble, params, finite))
    if is_laplace(ensemble, params):
        return (
            f"no Laplace approximation exists at these points, so there is nothing to "
            f"weight or draw ({why}); what works instead: a variational fit, whose guides "
            "have a density everywhere (EnsembleSVI(model, AutoNormal(model), optim, "
            "Trace_ELBO(), ensemble_size=E), then importance_weights, or nuts_warm_start "
            "from it), or NUTS from its default start (MCMC(NUTS(model))); NUTS started at "
            "these points (mcmc_init_params) can stay stuck: where they put a scale at 0 "
            "(a funnel's neck) it does not move."
        )
    return (
        f"no member is usable, so there is nothing to weight or draw ({why}); refit "
        f"with stable_update=True or a smaller step size."
    )


def checked_inputs(ensemble, params, args, kwargs, num_samples, name, per_member_why):
    """The checks shared by the weighting functions: ``num_samples``, the params of
    this ensemble, one data set for all members. Returns ``(num_samples, safe
    params, the guide's sites)``: params with non-finite members blanked
    (:func:`~numpyro_ensemble.engine.health.usable_params`) and the sites found on them."""
    num_samples = check_positive_int(num_samples, "num_samples")
    check_params(ensemble, params)
    if has_per_member((args, kwargs)):
        raise ValueError(f"{name}: the data differ between members (per_member), {per_member_why}")
    if not finite_members(params).any():  # nothing to make safe; the sites are traced abstractly
        return num_samples, params, guide_sites(ensemble, params, *args, **kwargs)
    safe, _ = usable_params(params, name, quiet=True)
    return num_samples, safe, guide_sites(ensemble, safe, *args, **kwargs)


def proper_densities(log_qs: np.ndarray, finite: np.ndarray, num_samples: int) -> np.ndarray:
    """The ``(E,)`` mask of members whose guide log density is a number or ``-inf`` at
    every draw of the usable members. A member with a degenerate guide (a scale that
    collapsed to 0, e.g. a member stuck in a poor optimum) gives NaN or ``+inf``
    there, which would make the mixture density of every draw non-finite: it is left
    out of the mixture, with weight 0 and a warning naming it."""
    columns = np.repeat(finite, num_samples)
    with np.errstate(invalid="ignore"):
        bad = np.isnan(log_qs[:, columns]) | (log_qs[:, columns] == np.inf)
    proper = ~bad.any(axis=1)
    left_out = np.flatnonzero(finite & ~proper).tolist()
    if left_out:
        if not (finite & proper).any():
            raise UnusableWeights(
                f"importance_weights: the guide density of every member is NaN or +inf at "
                f"the ensemble's draws (members {left_out}); check the guide's scales."
            )
        warn(
            f"importance_weights: members {left_out} of {finite.size} have a guide density "
            f"that is NaN or +inf at the ensemble's draws (a degenerate scale); they are "
            f"left out of the mixture proposal and get weight 0.",
            RuntimeWarning,
        )
    return proper


def importance_weights(
    ensemble,
    rng_key: PRNGKeyArray,
    params: dict,
    *args,
    num_samples: int = 100,
    **kwargs,
) -> ImportanceWeights:
    r"""
    Importance weights of ``num_samples`` draws per member, with the equal mixture
    of all member guides as the proposal (see :mod:`numpyro_ensemble.trust.importance`).

    ``member_weights[e]`` is the share of posterior mass the weights give member
    ``e``'s draws: with members on two modes of masses 0.3 and 0.7, the members of
    each mode together get about 0.3 and 0.7, whatever their head count.
    Members with non-finite params are excluded (weight 0), and so are members whose
    guide density is NaN or ``+inf`` at the draws (a degenerate scale): they are left
    out of the mixture proposal, with a warning naming them. One jitted pass scores
    every draw under the model and under every member's guide
    (:math:`E^2 S` guide evaluations).

    When no member is usable (every member's params are NaN, e.g. Laplace members
    where no point has a Laplace approximation: a hierarchical model's MAP at a
    scale of 0) the result is a verdict, not an error: NaN member weights, ``-inf``
    log weights, :math:`\hat k = \infty`, ESS 0, NaN draws, and ``verdict`` saying
    which members are unusable and why (for Laplace members the reasons
    ``laplace_members`` gave, grouped) and what works instead; functions given these
    weights raise an error quoting it.

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI`; the guides
        must have a density (not point masses: for an
        :class:`~numpyro_ensemble.EnsembleMAP` use
        :func:`~numpyro_ensemble.stacking_weights`).
    :param jax.random.key rng_key: random number generator seed for the draws.
    :param dict params: the ensemble's params, e.g. ``run(...).params``.
    :param args: the model's arguments, with the data it was fit to.
    :param int num_samples: draws per member, ``S``.
    :param kwargs: the model's keyword arguments.
    :return: :class:`~numpyro_ensemble.ImportanceWeights`.
    :raises UnusableWeights: when members are usable but none of their draws has a
        finite weight (the message names the members and why).
    """
    check_ensemble(ensemble, "importance_weights")
    check_key(rng_key)
    ensemble, params = laplace.resolve(ensemble, params, args, kwargs)
    num_samples, safe, sites = checked_inputs(
        ensemble, params, args, kwargs, num_samples, "importance_weights",
        "so the members fit different posteriors; weight the members of one data set.",
    )
    if not sites:
        raise ValueError(
            "importance_weights: the guide samples no latent sites (every unknown of the "
            "model is a numpyro.param), so there is nothing to weight; use "
            "stacking_weights to weight the members by their predictions."
        )
    if all(site.point for site in sites):
        raise ValueError(
            f"importance_weights: the guide of this {type(ensemble).__name__} is a point "
            f"mass (EnsembleMAP / AutoDelta), which has no density to weight draws with; "
            f"use stacking_weights for point members."
        )
    E, S = ensemble.ensemble_size, num_samples
    latent = tuple(s.name for s in sites if not s.auxiliary)
    usable = finite_members(params)
    if not usable.any():  # a verdict, not an error: nothing to weight, and why
        draws = blank_draws(ensemble, params, args, kwargs, S, auxiliary=True)
        return ImportanceWeights(
            samples={name: draws[name] for name in latent},
            log_weights=jax.device_put(np.full((E, S), -np.inf)),
            member_weights=jax.device_put(np.full(E, np.nan)),
            pareto_k=float(np.inf),
            ess=0.0,
            verdict=no_usable_member(ensemble, params, usable),
        )
    draws, finite = draw_guides(
        ensemble,
        rng_key,
        params,
        args,
        kwargs,
        num_samples,
        "importance_weights",
        auxiliary=True,
    )
    fixed = frozenset(s.name for s in sites if not s.point)
    split = ensemble._split(args, kwargs)
    plates = ensemble._inspect(split).plates
    # One compiled scoring pass per ensemble and configuration, not one per call.
    programs = ensemble.__dict__.setdefault("_importance_programs", {})
    key = (latent, fixed, split.static, split.axes, plates, S)
    if key not in programs:
        programs[key] = _scoring_program(ensemble, latent, fixed, split, plates, S)
    own_params = model_params(ensemble, safe, args, kwargs)
    with validation_enabled(False):  # NumPyro's checks of constants run op by op as it traces
        found = programs[key](safe, own_params, draws, split.dynamic)
    log_p, log_qs = (np.asarray(v) for v in found)
    proper = proper_densities(log_qs, finite, S)
    finite = finite & proper
    log_qs = np.where(finite[:, None], log_qs, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):  # in NumPy: nothing to compile
        log_q_mix = np.logaddexp.reduce(log_qs, axis=0) - np.log(finite.sum())
        raw = np.reshape(log_p - log_q_mix, (E, S)).astype(np.float64)
    raw = np.where(finite[:, None] & np.isfinite(raw), raw, -np.inf)
    valid = np.isfinite(raw)
    if not valid.any():
        raise UnusableWeights(
            "importance_weights: no draw has a finite log density under the model: "
            + why_no_draw(
                ensemble,
                params,
                usable,
                proper,
                np.reshape(log_p, (E, S)),
                np.reshape(log_q_mix, (E, S)),
            )
        )
    smoothed, k = psis(raw[valid])
    kept = np.isfinite(smoothed)
    if not kept.all():  # a failed smoothing must not poison the other members' weights
        if not kept.any():
            raise UnusableWeights(
                f"importance_weights: PSIS smoothing gave no finite weight to any of the "
                f"{int(valid.sum())} draws with a finite raw log weight (members "
                f"{np.flatnonzero(valid.any(axis=1)).tolist()}; raw log weights from "
                f"{raw[valid].min():.4g} to {raw[valid].max():.4g}); use "
                f"stacking_weights, or more draws (num_samples)."
            )
        smoothed = np.where(kept, smoothed - np.logaddexp.reduce(smoothed[kept]), -np.inf)
        k = np.inf  # weights the smoothing could not handle are not to be trusted
    log_weights = np.full((E, S), -np.inf)
    log_weights[valid] = smoothed
    member = np.exp(np.logaddexp.reduce(log_weights, axis=1))
    return ImportanceWeights(
        samples={name: draws[name] for name in latent},
        log_weights=jax.device_put(log_weights),
        member_weights=jax.device_put(member / member.sum()),
        pareto_k=float(k),
        ess=float(1.0 / np.sum(np.exp(2 * smoothed))),
    )


def why_no_draw(ensemble, params, usable, proper, log_p, log_q_mix) -> str:
    """Which members have no draw with a finite importance weight, and why: params
    that are not finite (with the Laplace members' recorded reasons), a degenerate
    guide density, or draws where the model's log density (or the proposal's) is not
    finite. ``log_p`` and ``log_q_mix`` are ``(E, S)``."""
    reasons = exclusion_reasons(ensemble, params, usable)
    for e in np.flatnonzero(usable & ~proper):
        reasons[int(e)] = "its guide density is NaN or +inf at the draws (a degenerate scale)"
    for e in np.flatnonzero(usable & proper):
        if np.isneginf(log_p[e]).all():
            why = (
                "the model's log density is -inf at every one of its draws (its guide puts "
                "its mass where the model has none: outside a support, or a -inf factor)"
            )
        elif np.isnan(log_p[e]).all():
            why = "the model's log density is NaN at every one of its draws"
        elif not np.isfinite(log_p[e]).any():
            why = "the model's log density is -inf, +inf or NaN at every one of its draws"
        else:
            why = (
                "the proposal's (the guides' mixture's) log density is not finite at its "
                "draws where the model's is"
            )
        reasons[int(e)] = why
    return (
        f"{grouped(reasons)}; check the guides' locations and scales against the "
        f"model's supports, or weight the members by their predictions (stacking_weights)."
    )


def _scoring_program(ensemble, latent, fixed, split, plates, num_samples):
    """The jitted pass scoring every draw under the model and under every member's guide."""
    model = full_data(ensemble.model, plates)
    guide, static_kwargs = ensemble.guide, ensemble.static_kwargs
    E, S = ensemble.ensemble_size, num_samples

    @jax.jit
    def score(params, own_params, draws, dynamic):
        flat = jax.tree.map(lambda v: jnp.reshape(v, (E * S,) + v.shape[2:]), draws)
        args, kwargs = merge_args(dynamic, split.static)
        kwargs = {**kwargs, **static_kwargs}

        def log_joint(own, z):  # own: the member's values of the model's params
            return log_density(model, args, kwargs, {**own, **{n: z[n] for n in latent}})[0]

        def log_q(member_params, z):
            # Substitute the draw at the guide's non-point sites; its point sites (an
            # AutoGuide's Delta of the transformed value) follow from them and add the
            # transform's log-Jacobian.
            def given(site):
                if site["type"] == "sample" and site["name"] in fixed:
                    return z[site["name"]]
                return None

            guide_at_z = substitute(guide, substitute_fn=given)
            return log_density(guide_at_z, args, kwargs, member_params)[0]

        log_p = map_members(  # each member's draws, with the member's model params
            lambda member, _: jax.vmap(lambda one: log_joint(member[0], one))(member[1]),
            (own_params, jax.tree.map(lambda v: jnp.reshape(v, (E, S) + v.shape[1:]), flat)),
            members_per_chunk=ensemble.members_per_chunk,
        ).reshape(E * S)
        log_qs = map_members(
            lambda member, z: jax.vmap(lambda one: log_q(member, one))(z),
            params,
            flat,
            members_per_chunk=ensemble.members_per_chunk,
        )
        return log_p, log_qs

    return score
