"""What to trust in a fitted ensemble: per-member fit, weights, modes and a verdict.

:func:`ensemble_summary` puts, for each member, its final loss, the loss trend
over the last 10% of steps, whether it diverged, its weight, the distance to the
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

from numpyro_ensemble import laplace
from numpyro_ensemble._checks import check_ensemble, check_key, check_positive_int
from numpyro_ensemble.health import finite_members, usable_params
from numpyro_ensemble.importance import importance_weights
from numpyro_ensemble.posterior import _check_params, draw_guides, guide_sites
from numpyro_ensemble.stacking import stacking_weights
from numpyro_ensemble.weights import ImportanceWeights, StackingWeights, member_weights_of

__all__ = ["EnsembleSummary", "ensemble_summary"]

# Relative tolerance within which two point members count as the same mode.
_POINT_TOLERANCE = 1e-2


class EnsembleSummary(NamedTuple):
    """The result of :func:`ensemble_summary`; ``print`` it for a table."""

    final_loss: np.ndarray
    """``(E,)`` each member's last loss (NaN without losses)."""
    loss_trend: np.ndarray
    """``(E,)`` change of the loss over the last 10% of steps (least-squares line);
    clearly negative: still improving, more steps would help."""
    diverged: np.ndarray
    """``(E,)`` a non-finite loss at any step, or non-finite params."""
    weight: np.ndarray
    """``(E,)`` the member weights used (importance, stacking or given)."""
    weight_kind: str
    """``"importance"``, ``"stacking"`` or ``"given"``."""
    nearest: np.ndarray
    """``(E,)`` distance to the nearest other member, in posterior sds (SVI) or
    relative units (points); see :func:`ensemble_summary`."""
    mode: np.ndarray
    """``(E,)`` mode label (members closer than 1 are in one mode; -1: diverged)."""
    num_modes: int
    r_hat: float
    """Largest split R-hat over all latent coordinates, members as chains (NaN for points)."""
    ess: float
    """Smallest effective sample size over the latent coordinates (NaN for points)."""
    pareto_k: float
    """Pareto k of the importance weights (NaN when not computed)."""
    verdict: str

    def __str__(self) -> str:
        head = f"{'member':>8} {'final loss':>12} {'trend':>10} {'diverged':>9} "
        head += f"{self.weight_kind + ' w':>14} {'nearest':>9} {'mode':>5}"
        lines = [head]
        for e in range(self.final_loss.shape[0]):
            lines.append(
                f"{e:>8} {self.final_loss[e]:>12.4g} {self.loss_trend[e]:>10.3g} "
                f"{'yes' if self.diverged[e] else 'no':>9} {self.weight[e]:>14.3f} "
                f"{self.nearest[e]:>9.3g} {self.mode[e]:>5}"
            )
        lines.append("")
        lines.append(
            f"modes: {self.num_modes}   r_hat (max, members as chains): {self.r_hat:.3f}   "
            f"ess (min): {self.ess:.1f}   pareto k: {self.pareto_k:.2f}"
        )
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def _trend(losses: np.ndarray) -> np.ndarray:
    """Least-squares change of each row over its last 10% of steps (NaN if too short)."""
    T = losses.shape[1]
    window = max(T // 10, 2)
    if T < 2:
        return np.full(losses.shape[0], np.nan)
    tail = losses[:, -window:]
    t = np.arange(tail.shape[1]) - (tail.shape[1] - 1) / 2
    slope = (tail * t).sum(axis=1) / (t * t).sum()
    return slope * (tail.shape[1] - 1)


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


def _verdict(diverged, num_modes, r_hat, pareto_k, weight_kind, weight) -> str:
    parts = []
    if diverged.any():
        parts.append(f"members {np.flatnonzero(diverged).tolist()} diverged and are excluded")
    if num_modes == 1 and (np.isnan(r_hat) or r_hat <= 1.01):
        parts.append("the members agree (one mode)")
    elif num_modes > 1:
        parts.append(
            f"{num_modes} distinct modes: pooled draws mix them, use the weights "
            f"(weights=) or look at the modes separately"
        )
    else:
        parts.append(f"one mode but r_hat {r_hat:.2f} > 1.01: members differ in spread")
    if weight_kind == "importance":
        if pareto_k < 0.7:
            parts.append(f"importance-weighted draws can be trusted (k {pareto_k:.2f} < 0.7)")
        else:
            parts.append(
                f"importance weights are unreliable (k {pareto_k:.2f} >= 0.7): the ensemble "
                f"misses posterior mass, check against NUTS (mcmc_init_params)"
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
    _check_params(ensemble, params)
    E = ensemble.ensemble_size
    if losses is not None and (losses.ndim != 2 or losses.shape[0] != E):
        raise ValueError(
            f"result.losses must have shape (E, num_steps) with E={E}, got {losses.shape}."
        )
    usable = finite_members(params)
    diverged = ~usable
    if losses is not None:
        diverged |= ~np.isfinite(losses).all(axis=1)
    draw_key, weight_key = jax.random.split(rng_key)
    draws, _ = draw_guides(
        ensemble, draw_key, params, args, kwargs, num_samples, "ensemble_summary"
    )
    safe, _ = usable_params(params, "ensemble_summary", quiet=True)
    point = all(site.point for site in guide_sites(ensemble, safe, *args, **kwargs))
    if not jax.tree.leaves(draws):  # no latent sites (e.g. a network's params): members are points
        draws = jax.tree.map(lambda v: np.asarray(v)[:, None], safe)
    pareto_k = np.nan
    if weights is None:
        weights = (
            stacking_weights(ensemble, weight_key, params, *args, num_samples=num_samples, **kwargs)
            if point
            else importance_weights(
                ensemble, weight_key, params, *args, num_samples=num_samples, **kwargs
            )
        )
    kind = (
        "importance"
        if isinstance(weights, ImportanceWeights)
        else "stacking"
        if isinstance(weights, StackingWeights)
        else "given"
    )
    if isinstance(weights, ImportanceWeights):
        pareto_k = weights.pareto_k
    weight = np.where(diverged, 0.0, member_weights_of(weights, E))
    nearest, mode = _modes(draws, usable, point)
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
    trend = np.full(E, np.nan) if losses is None else _trend(losses)
    return EnsembleSummary(
        final_loss=final,
        loss_trend=trend,
        diverged=diverged,
        weight=weight,
        weight_kind=kind,
        nearest=nearest,
        mode=mode,
        num_modes=num_modes,
        r_hat=r_hat,
        ess=ess,
        pareto_k=float(pareto_k),
        verdict=_verdict(diverged, num_modes, r_hat, pareto_k, kind, weight),
    )
