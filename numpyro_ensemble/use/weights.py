"""Member weights: the two kinds of result, checking a user's weights, resampling.

Weights come from :func:`~numpyro_ensemble.importance_weights` (how much posterior
mass each member's guide covers) or :func:`~numpyro_ensemble.stacking_weights` (the
mixture of members that predicts held-out points best), or from the user as an
``(E,)`` array on the simplex. Everything that consumes the ensemble
(``sample_posterior``, ``ensemble_predictive``, ``to_arviz``, ``mcmc_init_params``)
takes any of the three as ``weights=``.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple
import warnings

import jax
from jax import random
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray
import numpy as np
from scipy.special import logsumexp

__all__ = ["ImportanceWeights", "StackingWeights"]


class ImportanceWeights(NamedTuple):
    """Self-normalised importance weights of the ensemble's draws (see
    :func:`~numpyro_ensemble.importance_weights`)."""

    samples: dict
    """The draws the weights refer to: ``{latent site: (E, S, *site_shape)}``."""
    log_weights: Float[Array, "E S"]
    """Pareto-smoothed log weights, normalised over all ``E * S`` draws (``-inf`` for
    excluded members)."""
    member_weights: Float[Array, " E"]
    """Each member's share of the weight; sums to 1 (NaN when no member is usable)."""
    pareto_k: float
    r"""Pareto :math:`\hat k` of the raw weights: below 0.7 the weighted draws can be
    trusted, above it the ensemble misses posterior mass."""
    ess: float
    """Effective sample size of the weighted draws, :math:`1 / \\sum w^2`."""
    verdict: str = ""
    """Empty for usable weights. When no member is usable (every member's params are
    NaN, e.g. no member has a Laplace approximation) the weights are NaN, the log
    weights ``-inf``, :math:`\\hat k = \\infty` and the ESS 0, and this says which
    members are unusable, why, and what to use instead; every function that takes
    ``weights=`` raises a ``ValueError`` quoting it."""


class StackingWeights(NamedTuple):
    """Stacking weights of the members' predictive distributions (see
    :func:`~numpyro_ensemble.stacking_weights`)."""

    member_weights: Float[Array, " E"]
    """Weights on the simplex that maximise the stacked leave-one-out score."""
    elpd_loo: float
    """Stacked leave-one-out log predictive density, :math:`\\sum_i \\log \\sum_e w_e p_e(y_i \\mid y_{-i})`."""
    elpd_loo_equal: float
    """The same with equal weights :math:`1/E` on the usable members."""
    pointwise: Float[Array, "E N"]
    """:math:`\\log p_e(y_i \\mid y_{-i})` for every member and observation."""


def member_weights_of(weights, ensemble_size: int, name: str = "weights") -> np.ndarray:
    """The ``(E,)`` member weights of ``weights`` (an array or either result), checked.

    :param weights: an ``(E,)`` array, an :class:`ImportanceWeights` or a
        :class:`StackingWeights`.
    :param int ensemble_size: ``E``.
    :param str name: the argument's name, for the errors.
    :return: the member weights, float64, finite, ``>= 0`` and summing to 1.
    :raises ValueError: for importance weights with a ``verdict`` (no member was
        usable), quoting it; for weights of the wrong shape, not finite, negative or
        not summing to 1.
    """
    if isinstance(weights, ImportanceWeights) and weights.verdict:
        raise ValueError(f"{name}: these importance weights are unusable: {weights.verdict}")
    if isinstance(weights, (ImportanceWeights, StackingWeights)):
        weights = weights.member_weights
    if isinstance(weights, (str, bytes, dict)):
        raise TypeError(
            f"{name} must be an (E,) array of member weights, an ImportanceWeights or a "
            f"StackingWeights, got {type(weights).__name__}."
        )
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be an (E,) array of member weights, an ImportanceWeights or a "
            f"StackingWeights, got {type(weights).__name__}."
        ) from None
    if w.shape != (ensemble_size,):
        raise ValueError(
            f"{name} must have shape (ensemble_size,) = ({ensemble_size},), got {w.shape}."
        )
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name} must be finite and >= 0, got {w.tolist()}.")
    if not np.isclose(w.sum(), 1.0, rtol=0, atol=1e-5):
        raise ValueError(f"{name} must sum to 1, got sum {w.sum():.6g}; normalise them.")
    return w


def draw_log_weights(weights, ensemble_size: int, num_samples: int) -> np.ndarray:
    """``(E, S)`` log weights of draws: the result's own for :class:`ImportanceWeights`,
    else member ``e``'s weight spread evenly over its ``S`` draws."""
    if isinstance(weights, ImportanceWeights):
        return np.asarray(weights.log_weights)
    w = member_weights_of(weights, ensemble_size)
    with np.errstate(divide="ignore"):
        return np.broadcast_to(
            np.log(w)[:, None] - np.log(num_samples), (ensemble_size, num_samples)
        )


@partial(jax.jit, static_argnames="num_draws")
def resample(rng_key: PRNGKeyArray, draws: dict, log_weights, num_draws: int) -> dict:
    """``num_draws`` draws picked from the ``(E, S, ...)`` draws with probabilities
    ``exp(log_weights)`` (with replacement): plain, unweighted draws ``(num_draws, ...)``
    (one compiled program per shapes and ``num_draws``)."""
    logits = jnp.ravel(jnp.asarray(log_weights))
    picked = random.categorical(rng_key, logits, shape=(num_draws,))
    return jax.tree.map(lambda leaf: jnp.reshape(leaf, (-1,) + jnp.shape(leaf)[2:])[picked], draws)


# Log weights that all lie within this many nats (weights within 1% of each other)
# are equal for every purpose: importance sampling with them is exact.
FLAT_LOG_WEIGHTS = 1e-2
# The largest float32 with a finite spacing (np.spacing(float32 max) is inf).
_FLOAT32_BELOW_MAX = float(np.nextafter(np.finfo(np.float32).max, np.float32(0)))


def psis(log_weights) -> tuple[np.ndarray, np.ndarray]:
    r"""Pareto-smoothed, normalised log weights along the last axis and their
    Pareto :math:`\hat k`, with the installed ArviZ's PSIS (0.x ``az.psislw``,
    1.x ``arviz_stats``).

    The log densities come in float32, which rounds weights that are nearly equal
    (a guide close to the posterior) to a few tied values; ties in the tail leave
    PSIS too few distinct points to fit (:math:`\hat k = \infty`). A fixed
    sub-rounding dither (half a float32 unit in the last place) breaks the ties.
    Weights that are constant even so, or within ``FLAT_LOG_WEIGHTS`` of each other (a
    guide equal to the posterior, up to rounding: the tail fit of such weights is
    meaningless), are returned unsmoothed with :math:`\hat k = -\infty`; weights whose
    tail fit fails otherwise, unsmoothed with :math:`\hat k = \infty`. With fewer than
    five draws in the tail (fewer than 25 draws in all) the tail cannot be fitted: the
    weights are returned unsmoothed with :math:`\hat k = \infty` (ArviZ 0.x's convention;
    ArviZ 1.x raises).
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    # Capped one step below float32's largest value, whose spacing is infinite: log
    # weights beyond float32's range (finite in float64, e.g. -1e71 at draws where a
    # member's recursion explodes) got a dither of +-inf, and every weight became NaN.
    magnitude = np.minimum(np.abs(log_weights), _FLOAT32_BELOW_MAX)
    ulp = np.spacing(magnitude.astype(np.float32)).astype(np.float64)
    log_weights = log_weights + np.random.default_rng(0).uniform(-0.5, 0.5, log_weights.shape) * ulp
    raw = log_weights - logsumexp(log_weights, axis=-1, keepdims=True)
    # (Nearly) constant weights, e.g. a guide equal to the posterior, leave the tail fit
    # undefined (NaN): nothing needs smoothing there, the raw weights are bounded.
    flat = np.ptp(log_weights, axis=-1) < FLAT_LOG_WEIGHTS
    # Both ArviZ versions fit a tail of at least 5 draws: ArviZ 0.x from 21 draws on
    # (ceil(n / 5)), arviz_stats from 25 (floor(n / 5)); fewer give k = inf in 0.x.
    if log_weights.shape[-1] < 25:
        return raw, np.where(flat, -np.inf, np.inf)
    with warnings.catch_warnings():  # the tail fit of near-constant weights divides by 0
        warnings.simplefilter("ignore", RuntimeWarning)
        smoothed, k = _arviz_psis(log_weights)
    smoothed, k = np.asarray(smoothed), np.asarray(k, dtype=np.float64)
    failed = ~np.isfinite(smoothed).all(axis=-1) | np.isnan(k) | flat
    if failed.any():
        smoothed = np.where(failed[..., None], raw, smoothed)
        # flat: exact (k = -inf); a tail fit that failed otherwise: not to be trusted
        k = np.where(flat, -np.inf, np.where(failed, np.inf, k))
    return smoothed, k


def _arviz_psis(log_weights):
    with warnings.catch_warnings():
        # ArviZ's once-a-day notice of its refactor (a FutureWarning whose message starts
        # with a newline) on its first import, here inside importance / stacking weights:
        # it is about ArviZ's API, which this PSIS call does not pass on to the user.
        warnings.filterwarnings(
            "ignore", message=r"\s*ArviZ is undergoing a major refactor", category=FutureWarning
        )
        import arviz as az

    if int(az.__version__.split(".")[0]) >= 1:
        from arviz_stats.base import array_stats

        # arviz_stats smooths the weights exp(-ary), as for -log-likelihood ratios.
        return array_stats.psislw(-log_weights, r_eff=1.0, axis=-1)
    return az.psislw(log_weights, reff=1.0)
