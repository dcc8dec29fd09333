"""What to trust in a fitted ensemble: per-member fit, weights, modes and a verdict.

:func:`ensemble_summary` puts, for each member, its final loss, the loss trend
over the last 10% of steps, how much a Newton step would still lower the loss
(:mod:`numpyro_ensemble.trust.convergence`), whether it converged and whether it diverged, its weight, the distance to the
nearest other member and a mode label next to the ensemble's R-hat and ESS across
members (members as chains, NumPyro's own diagnostics), the importance weights'
Pareto k, the number of distinct modes and a one-line verdict.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jaxtyping import PRNGKeyArray
import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer.svi import SVIRunResult
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from numpyro_ensemble.engine.checks import check_key, check_positive_int
from numpyro_ensemble.engine.health import finite_members, usable_params
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.trust.convergence import newton_decrement
from numpyro_ensemble.trust.importance import (
    UnusableWeights,
    exclusion_reasons,
    grouped,
    importance_weights,
    no_usable_member,
)
from numpyro_ensemble.trust.stacking import stacking_weights
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.fitted import check_params, is_laplace
from numpyro_ensemble.use.posterior import draw_guides, guide_sites
from numpyro_ensemble.use.weights import ImportanceWeights, StackingWeights, member_weights_of

__all__ = ["EnsembleSummary", "ensemble_summary"]

# Relative tolerance within which two point members count as the same mode.
_POINT_TOLERANCE = 1e-2
# Above this many latent values per draw, importance weights with Pareto k >= 0.7 are
# called not meaningful (a network's weights), not a sign of a poor guide family.
IMPORTANCE_DIM_MAX = 1000


class EnsembleSummary(NamedTuple):
    """The result of :func:`ensemble_summary`; ``print`` it for a table."""

    final_loss: np.ndarray
    """``(E,)`` each member's last loss (NaN without losses)."""
    loss_trend: np.ndarray
    """``(E,)`` change of the loss over the last 10% of steps (least-squares line);
    clearly negative: still improving, more steps would help."""
    diverged: np.ndarray
    """``(E,)`` a non-finite loss at any step, or non-finite params."""
    converged: np.ndarray | None
    """``(E,)`` the member's loss has stopped falling and is within
    ``CONVERGENCE_TOLERANCE`` of the optimum its Newton step predicts (see
    :func:`ensemble_summary`); None without the losses (params passed instead of
    ``run``'s result)."""
    to_go: np.ndarray
    """``(E,)`` how much a Newton step would still lower the member's loss, in nats
    (:mod:`numpyro_ensemble.trust.convergence`; NaN where not computed, and for the Laplace
    members of :func:`~numpyro_ensemble.laplace_members`, which fit no loss of their
    own: their points' losses are checked by their trend)."""
    weight: np.ndarray
    """``(E,)`` the member weights used (importance, stacking or given)."""
    weight_kind: str
    """``"importance"``, ``"stacking"`` or ``"given"``."""
    nearest: np.ndarray
    """``(E,)`` distance to the nearest other member, in posterior sds (SVI) or
    relative units (points); see :func:`ensemble_summary`."""
    mode: np.ndarray
    """``(E,)`` mode label among the converged members (members closer than 1 are in
    one mode; -1: diverged or not converged)."""
    num_modes: int
    r_hat: float
    """Largest split R-hat over all latent coordinates, members as chains (NaN for points)."""
    ess: float
    """Smallest effective sample size over the latent coordinates (NaN for points)."""
    pareto_k: float
    """Pareto k of the importance weights (NaN when not computed)."""
    verdict: str

    def __str__(self) -> str:
        head = f"{'member':>8} {'final loss':>12} {'trend':>10} {'to go':>9} {'converged':>10} "
        head += f"{'diverged':>9} "
        head += f"{self.weight_kind + ' w':>14} {'nearest':>9} {'mode':>5}"
        lines = [head]
        for e in range(self.final_loss.shape[0]):
            converged = "?" if self.converged is None else "yes" if self.converged[e] else "no"
            lines.append(
                f"{e:>8} {self.final_loss[e]:>12.4g} {self.loss_trend[e]:>10.3g} "
                f"{self.to_go[e]:>9.3g} {converged:>10} {'yes' if self.diverged[e] else 'no':>9} "
                f"{self.weight[e]:>14.3f} {self.nearest[e]:>9.3g} {self.mode[e]:>5}"
            )
        lines.append("")
        lines.append(
            f"modes: {self.num_modes}   r_hat (max, members as chains): {self.r_hat:.3f}   "
            f"ess (min): {self.ess:.1f}   pareto k: {self.pareto_k:.2f}"
        )
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


# A member whose loss still falls by more than this (in nats) over the last 10% of
# its steps, and by more than twice the standard error of that fall, has not converged.
# (For a point, a loss 0.05 above the optimum is about 0.3 posterior sds away from it.)
CONVERGENCE_TOLERANCE = 0.05


def _trend(losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares change of each row over its last 10% of steps (at least 10), and
    the standard error of that change from the scatter around the line (NaN if too short)."""
    E, T = losses.shape
    if T < 10:
        return np.full(E, np.nan), np.full(E, np.nan)
    tail = losses[:, -max(T // 10, 10):]
    n = tail.shape[1]
    t = np.arange(n) - (n - 1) / 2
    slope = (tail * t).sum(axis=1) / (t * t).sum()
    residual = tail - tail.mean(axis=1, keepdims=True) - slope[:, None] * t
    scatter = np.sqrt((residual**2).sum(axis=1) / (n - 2))
    return slope * (n - 1), scatter / np.sqrt((t * t).sum()) * (n - 1)


def _converged(change, error, to_go, to_go_error) -> np.ndarray:
    """A member has converged unless its loss still falls, clearly (beyond twice the
    standard error of the fall) and by more than ``CONVERGENCE_TOLERANCE``, or a Newton
    step would still lower it clearly by more than that (a member creeping along a
    ridge, whose loss falls by less than its noise per window). Too few steps to tell
    count as not converged."""
    with np.errstate(invalid="ignore"):
        falling = change < -np.maximum(2 * error, CONVERGENCE_TOLERANCE)
        far = to_go > np.maximum(2 * to_go_error, CONVERGENCE_TOLERANCE)
    return ~falling & ~far & np.isfinite(change)


def _modes(draws: dict, usable: np.ndarray, point: bool) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest other member and single-linkage mode labels."""
    E = usable.size
    flat = np.concatenate(
        [np.asarray(v, np.float64).reshape(E, v.shape[1], -1) for v in jax.tree.leaves(draws)],
        axis=-1,
    )
    means = flat.mean(axis=1)
    if point:
        scale = _POINT_TOLERANCE * (1.0 + np.abs(np.median(means[usable], axis=0)))
    else:
        scale = flat[usable].std(axis=1).mean(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
    z = means / scale
    dist = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).mean(axis=-1))
    nearest = np.full(E, np.nan)
    mode = np.full(E, -1)
    idx = np.flatnonzero(usable)
    if idx.size == 1:
        mode[idx] = 0
        return nearest, mode
    sub = dist[np.ix_(idx, idx)]
    nearest[idx] = np.where(np.eye(idx.size, dtype=bool), np.inf, sub).min(axis=1)
    labels = fcluster(linkage(squareform(sub, checks=False), "single"), 1.0, "distance")
    _, first = np.unique(labels, return_index=True)
    relabel = {labels[i]: rank for rank, i in enumerate(sorted(first))}
    mode[idx] = [relabel[label] for label in labels]
    return nearest, mode


def _verdict(
    diverged,
    converged,
    num_modes,
    r_hat,
    pareto_k,
    weight_kind,
    weight,
    unusable="",
    no_laplace=None,
    dim=0,
) -> str:
    """Causes in order: diverged members and members without a Laplace approximation
    (``no_laplace``: ``{member: why}``), members not converged (nothing about their
    draws is trusted), then modes, spread and weights among the converged members."""
    parts = []
    no_laplace = no_laplace or {}
    ran_off = diverged.copy()
    ran_off[list(no_laplace)] = False
    if ran_off.any():
        parts.append(f"members {np.flatnonzero(ran_off).tolist()} diverged and are excluded")
    if no_laplace:
        parts.append(
            f"members {sorted(no_laplace)} have no Laplace approximation and are excluded "
            f"({grouped(no_laplace)})"
        )
    waiting = np.zeros_like(diverged) if converged is None else ~diverged & ~converged
    if waiting.any():
        parts.append(
            f"members {np.flatnonzero(waiting).tolist()} have not converged (their loss still "
            f"falls over the last 10% of steps, or a Newton step would lower it further: "
            f"'to go'): do not use their draws yet; run more steps, "
            f"or start from L-BFGS points (EnsembleMAP's default optimizer) or their Laplace "
            f"approximations (laplace_members), or rescale the model's inputs"
        )
        if waiting.sum() == (~diverged).sum():
            return "; ".join(parts) + "."
    among = " among the converged members" if waiting.any() else ""
    if num_modes == 1 and (np.isnan(r_hat) or r_hat <= 1.01):
        parts.append(f"the members agree (one mode{among})")
    elif num_modes > 1:
        parts.append(
            f"{num_modes} distinct modes{among}: pooled draws mix them, use the weights "
            f"(weights=) or look at the modes separately"
        )
    else:
        parts.append(
            f"one mode but r_hat {r_hat:.2f} > 1.01: members differ in spread; NUTS "
            f"warm-started from the ensemble (nuts_warm_start) settles it"
        )
    if weight_kind == "importance":
        if unusable:
            parts.append(f"no importance weights ({unusable}): do not use weighted draws")
        elif waiting.any():
            parts.append("recompute the importance weights once every member has converged")
        elif pareto_k < 0.7:
            trust = "can be trusted" if converged is not None else (
                "can be trusted if the members have converged (pass run's result to check)"
            )
            parts.append(f"importance-weighted draws {trust} (k {pareto_k:.2f} < 0.7)")
        elif dim > IMPORTANCE_DIM_MAX:
            parts.append(
                f"importance weights are not meaningful at this dimension ({dim} latent "
                f"values, k {pareto_k:.2f} >= 0.7: in high dimension a few draws carry the "
                f"weight whatever the proposal): weigh the members by their held-out "
                f"predictions (stacking_weights) or equally, and check the predictive on "
                f"held-out data"
            )
        else:
            parts.append(
                f"importance weights are unreliable (k {pareto_k:.2f} >= 0.7): the ensemble "
                f"misses posterior mass (the guide's family does not fit): use a richer guide, "
                f"or NUTS warm-started from the ensemble (nuts_warm_start)"
            )
    heavy = weight.max()
    if heavy > 0.9 and weight.size > 1:
        parts.append(f"one member carries {heavy:.0%} of the weight")
    return "; ".join(parts) + "."


def ensemble_summary(
    ensemble,
    rng_key: PRNGKeyArray,
    result: SVIRunResult | dict,
    *args,
    num_samples: int = 100,
    weights=None,
    **kwargs,
) -> EnsembleSummary:
    """
    Diagnostics of a fitted ensemble, per member and overall (print the result for
    a table in the style of ``MCMC.print_summary``).

    Weights default to :func:`~numpyro_ensemble.importance_weights` for SVI members
    and :func:`~numpyro_ensemble.stacking_weights` for point members. Distances
    compare member means: for SVI members in units of the members' average
    posterior sd per coordinate (RMS over coordinates), for points relative to
    ``1% * (1 + |median point|)``; members closer than 1 are one mode
    (single-linkage clustering, SciPy).

    With ``run``'s result, a member has converged when its loss no longer falls
    over the last 10% of steps and a Newton step from its params would not lower
    the loss by more than 0.05 nats (``to go``; for a point, 0.05 nats is about 0.3
    posterior sds from the optimum), either beyond twice the noise of the estimate.
    Modes, spread and weights are judged among the converged members only.

    Laplace members without a Laplace approximation are named with the reasons
    ``laplace_members`` gave. When no member is usable (every member's params are
    non-finite, e.g. no point has a Laplace approximation) nothing is drawn or
    weighted: weights, distances, R-hat and ESS are NaN, and the verdict says why and
    what works instead (the same as the ``verdict`` of
    :func:`~numpyro_ensemble.importance_weights`).

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` or ``EnsembleMAP``.
    :param jax.random.key rng_key: random number generator seed.
    :param result: ``run(...)``'s :data:`~numpyro.infer.svi.SVIRunResult` (for the
        losses), or the params.
    :param args: the model's arguments with the data it was fit to.
    :param int num_samples: draws per member for weights, R-hat and ESS.
    :param weights: weights already computed (an ``(E,)`` array or a weights result).
    :param kwargs: the model's keyword arguments.
    :return: :class:`EnsembleSummary`.
    """
    check_ensemble(ensemble, "ensemble_summary")
    check_key(rng_key)
    ensemble, result = laplace.resolve_result(ensemble, result, args, kwargs)
    num_samples = check_positive_int(num_samples, "num_samples")
    params, losses = result, None
    if isinstance(result, SVIRunResult):
        params, losses = result.params, np.asarray(result.losses, np.float64)
    check_params(ensemble, params)
    E = ensemble.ensemble_size
    if losses is not None and (losses.ndim != 2 or losses.shape[0] != E):
        raise ValueError(
            f"result.losses must have shape (E, num_steps) with E={E}, got {losses.shape}."
        )
    usable = finite_members(params)
    diverged = ~usable
    if losses is not None:
        diverged |= ~np.isfinite(losses).all(axis=1)
    if not usable.any():
        return _nothing_usable(ensemble, params, losses, weights, diverged, args, kwargs)
    draw_key, weight_key = jax.random.split(rng_key)
    draws, _ = draw_guides(
        ensemble, draw_key, params, args, kwargs, num_samples, "ensemble_summary"
    )
    safe, _ = usable_params(params, "ensemble_summary", quiet=True)
    point = all(site.point for site in guide_sites(ensemble, safe, *args, **kwargs))
    if not jax.tree.leaves(draws):  # no latent sites (e.g. a network's params): members are points
        draws = jax.tree.map(lambda v: np.asarray(v)[:, None], safe)
    pareto_k = np.nan
    unusable = ""
    if weights is None and point:
        weights = stacking_weights(
            ensemble, weight_key, params, *args, num_samples=num_samples, **kwargs
        )
    elif weights is None:
        try:
            weights = importance_weights(
                ensemble, weight_key, params, *args, num_samples=num_samples, **kwargs
            )
        except UnusableWeights as error:  # a verdict, not an error
            unusable = str(error).removeprefix("importance_weights: ").rstrip(".")
    if isinstance(weights, ImportanceWeights) and weights.verdict:  # weights of no member
        unusable = weights.verdict.rstrip(".")
    kind = (
        "importance"
        if unusable or isinstance(weights, ImportanceWeights)
        else "stacking"
        if isinstance(weights, StackingWeights)
        else "given"
    )
    if isinstance(weights, ImportanceWeights):
        pareto_k = weights.pareto_k
    weight = (
        np.full(E, np.nan) if unusable else np.where(diverged, 0.0, member_weights_of(weights, E))
    )
    change, error = (np.full(E, np.nan),) * 2 if losses is None else _trend(losses)
    to_go, to_go_error = np.full(E, np.nan), np.full(E, np.nan)
    # Laplace members are not fits of their ensemble's loss (an ELBO): a Newton step on
    # it would measure how far a Laplace Gaussian is from the ELBO's best one, not
    # convergence. Their centres are modes by construction; the losses given (their
    # points' run) are checked by their trend alone.
    if losses is not None and not is_laplace(ensemble, params):
        to_go, to_go_error = newton_decrement(
            ensemble, jax.random.fold_in(rng_key, 3), safe, args, kwargs, point
        )
        to_go = np.where(diverged, np.nan, to_go)
    converged = None if losses is None else _converged(change, error, to_go, to_go_error)
    counted = usable & ~diverged if converged is None else usable & ~diverged & converged
    if not counted.any():
        counted = usable  # nothing converged: the modes of all, for the table only
    nearest, mode = _modes(draws, counted, point)
    mode[diverged] = -1
    r_hat = ess = np.nan
    if not point and usable.sum() > 1 and num_samples >= 4:
        chains = np.concatenate(
            [
                np.asarray(v, np.float64)[usable].reshape(int(usable.sum()), num_samples, -1)
                for v in jax.tree.leaves(draws)
            ],
            axis=-1,
        )
        r_hat = float(np.nanmax(split_gelman_rubin(chains)))
        ess = float(np.nanmin(effective_sample_size(chains)))
    num_modes = int(len(set(mode[mode >= 0].tolist())))
    final = np.full(E, np.nan) if losses is None else losses[:, -1]
    return EnsembleSummary(
        final_loss=final,
        loss_trend=change,
        diverged=diverged,
        converged=converged,
        to_go=to_go,
        weight=weight,
        weight_kind=kind,
        nearest=nearest,
        mode=mode,
        num_modes=num_modes,
        r_hat=r_hat,
        ess=ess,
        pareto_k=float(pareto_k),
        verdict=_verdict(
            diverged,
            converged,
            num_modes,
            r_hat,
            pareto_k,
            kind,
            weight,
            unusable,
            exclusion_reasons(ensemble, params, usable) if is_laplace(ensemble, params) else None,
            sum(int(np.prod(np.shape(v)[2:])) for v in jax.tree.leaves(draws)),
        ),
    )


def _nothing_usable(ensemble, params, losses, weights, diverged, args, kwargs) -> EnsembleSummary:
    """The summary of an ensemble none of whose members is usable (every member's
    params are non-finite, e.g. no Laplace approximation at any point): nothing to
    draw or weight; the losses' trend is still shown, and the verdict says why and
    what works instead (:func:`~numpyro_ensemble.trust.importance.no_usable_member`)."""
    E = ensemble.ensemble_size
    if weights is not None and not (isinstance(weights, ImportanceWeights) and weights.verdict):
        member_weights_of(weights, E)  # weights given are still checked
    point = all(site.point for site in guide_sites(ensemble, params, *args, **kwargs))
    with np.errstate(invalid="ignore", over="ignore"):  # the losses may be inf
        change, error = (np.full(E, np.nan),) * 2 if losses is None else _trend(losses)
        nan = np.full(E, np.nan)
        converged = None if losses is None else _converged(change, error, nan, nan)
    if isinstance(weights, ImportanceWeights) or (weights is None and not point):
        kind = "importance"
    elif isinstance(weights, StackingWeights) or weights is None:
        kind = "stacking"
    else:
        kind = "given"
    return EnsembleSummary(
        final_loss=np.full(E, np.nan) if losses is None else losses[:, -1],
        loss_trend=change,
        diverged=diverged,
        converged=converged,
        to_go=np.full(E, np.nan),
        weight=np.full(E, np.nan),
        weight_kind=kind,
        nearest=np.full(E, np.nan),
        mode=np.full(E, -1),
        num_modes=0,
        r_hat=np.nan,
        ess=np.nan,
        pareto_k=np.inf if kind == "importance" else np.nan,
        verdict=no_usable_member(ensemble, params, np.zeros(E, bool)),
    )
