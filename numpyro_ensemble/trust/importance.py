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
from numpyro_ensemble.engine.health import usable_params
from numpyro_ensemble.engine.members import has_per_member, map_members, merge_args
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.fitted import check_params, model_params
from numpyro_ensemble.use.posterior import draw_guides, guide_sites
from numpyro_ensemble.use.weights import ImportanceWeights, psis

__all__ = ["importance_weights", "UnusableWeights"]


class UnusableWeights(ValueError):
    """No draw of any member has a usable importance weight (``ensemble_summary``
    reports it in its verdict instead of raising)."""


def checked_inputs(ensemble, params, args, kwargs, num_samples, name, per_member_why):
    """The checks shared by the weighting functions: ``num_samples``, the params of
    this ensemble, one data set for all members. Returns ``(num_samples, safe
    params, the guide's sites)``: params with non-finite members blanked
    (:func:`~numpyro_ensemble.engine.health.usable_params`) and the sites found on them."""
    num_samples = check_positive_int(num_samples, "num_samples")
    check_params(ensemble, params)
    if has_per_member((args, kwargs)):
        raise ValueError(f"{name}: the data differ between members (per_member), {per_member_why}")
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
    latent = tuple(s.name for s in sites if not s.auxiliary)
    fixed = frozenset(s.name for s in sites if not s.point)
    split = ensemble._split(args, kwargs)
    plates = ensemble._inspect(split).plates
    E, S = ensemble.ensemble_size, num_samples
    # One compiled scoring pass per ensemble and configuration, not one per call.
    programs = ensemble.__dict__.setdefault("_importance_programs", {})
    key = (latent, fixed, split.static, split.axes, plates, S)
    if key not in programs:
        programs[key] = _scoring_program(ensemble, latent, fixed, split, plates, S)
    own_params = model_params(ensemble, safe, args, kwargs)
    with validation_enabled(False):  # NumPyro's checks of constants run op by op as it traces
        found = programs[key](safe, own_params, draws, split.dynamic)
    log_p, log_qs = (np.asarray(v) for v in found)
    finite = finite & proper_densities(log_qs, finite, S)
    log_qs = np.where(finite[:, None], log_qs, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore"):  # in NumPy: nothing to compile
        log_q_mix = np.logaddexp.reduce(log_qs, axis=0) - np.log(finite.sum())
        raw = np.reshape(log_p - log_q_mix, (E, S)).astype(np.float64)
    raw = np.where(finite[:, None] & np.isfinite(raw), raw, -np.inf)
    valid = np.isfinite(raw)
    if not valid.any():
        raise UnusableWeights(
            "importance_weights: no draw has a finite log density under the model; "
            "check the data and the params."
        )
    smoothed, k = psis(raw[valid])
    kept = np.isfinite(smoothed)
    if not kept.all():  # a failed smoothing must not poison the other members' weights
        if not kept.any():
            raise UnusableWeights("importance_weights: PSIS gave no finite weight.")
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
