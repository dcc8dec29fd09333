r"""A warm start for NumPyro's NUTS from a fitted ensemble: starts, metric, step size.

NUTS's default warm-up spends 1,000 iterations finding what a fitted ensemble
already knows: where the posterior is and its scale and correlations. From the
ensemble, :func:`nuts_warm_start` returns

- **starts**: one chain per member, heaviest members first when weights are given
  (:func:`~numpyro_ensemble.mcmc_init_params`);
- **an inverse mass matrix**: the covariance of the (weighted) ensemble in the
  unconstrained space. For Gaussian members
  (``AutoMultivariateNormal``, Laplace members) it is the mixture's covariance,
  :math:`\sum_e w_e (\Sigma_e + \mu_e \mu_e^\top) - \bar\mu \bar\mu^\top`; for other
  members the covariance of their pooled draws, shrunk toward the diagonal as Stan
  does, :math:`\frac{n}{n + 5}\,\hat\Sigma + 10^{-3} \frac{5}{n + 5} I` (``n`` the
  effective number of draws);
- **a step size** for that metric, :math:`1.5\, D^{-1/4}` (a unit Gaussian in
  ``D`` dimensions), which NUTS's dual averaging then tunes;
- **a warm-up schedule**, by whether the ensemble can be trusted with a margin
  (importance weights with Pareto :math:`\hat k < 0.5`, where PSIS estimates
  converge quickly).

  *Trusted*: its covariance is the posterior's. The metric is dense and kept
  (NumPyro's windowed adaptation would replace it by estimates from windows of
  25-100 draws, noisier than the ensemble's), and a warm-up of 150 iterations tunes
  the step size only.

  *Not trusted*: the ensemble gives the starts and the metric's start, and NUTS
  adapts as it does by default, a diagonal metric, in 500 iterations instead of
  1,000 (NumPyro's windows of 25, 50, 100 and 200 draws). Diagonal because a dense
  metric re-estimated from a few hundred warm-up draws is noisy: on a Poisson GP
  (posteriordb's ``gp_pois_regr``, 13 dimensions, a funnel) with Laplace members at
  :math:`\hat k = 0.60`, the kept dense metric gave R-hat 1.020, a re-adapted dense one
  (300 or 500 iterations, target acceptance up to 0.95, three seeds) 1.004-1.024, a
  diagonal one over 500 iterations 1.003-1.004 (default NUTS: 1.003). On a strongly
  correlated posterior whose ensemble is not trusted this costs the dense metric's
  gain; ``dense_mass=True`` asks for it (see the posteriordb page).
Everything goes to NumPyro's own ``NUTS`` and ``MCMC``; nothing is re-implemented,
and every value can be overridden::

    warm = nuts_warm_start(ens, key, params, x, y, weights=weights)
    mcmc = MCMC(NUTS(model, **warm.nuts_kwargs), num_warmup=warm.num_warmup,
                num_samples=1000, num_chains=warm.num_chains)
    mcmc.run(key, x, y, init_params=warm.init_params)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray
import numpy as np
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.util import unconstrain_fn

from numpyro_ensemble import laplace
from numpyro_ensemble._checks import check_ensemble, check_key, check_positive_int
from numpyro_ensemble.health import finite_members
from numpyro_ensemble.inspection import inspect_model
from numpyro_ensemble.mcmc import mcmc_init_params
from numpyro_ensemble.posterior import _check_params, sample_posterior
from numpyro_ensemble.weights import ImportanceWeights, draw_log_weights, member_weights_of

__all__ = ["NUTSWarmStart", "nuts_warm_start"]

TRUSTED_WARMUP = 150
# Importance weights with a Pareto k below this keep the ensemble's metric (PSIS's
# "good" range; 0.7, the limit for trusting weighted draws, is too close: see above).
TRUSTED_PARETO_K = 0.5
ADAPTING_WARMUP = 500


class NUTSWarmStart(NamedTuple):
    """What :func:`nuts_warm_start` returns: arguments for NumPyro's ``NUTS``,
    ``MCMC`` and ``MCMC.run``."""

    init_params: dict
    """Unconstrained starts, one per chain: ``MCMC.run(..., init_params=...)``."""
    nuts_kwargs: dict
    """``NUTS(model, **nuts_kwargs)``: ``inverse_mass_matrix`` (``{sites: matrix}``),
    ``dense_mass``, ``step_size`` and ``adapt_mass_matrix``."""
    num_warmup: int
    """``MCMC(..., num_warmup=...)``: 150 with a trusted metric, else 500."""
    num_chains: int
    """``MCMC(..., num_chains=...)``."""
    covariance: np.ndarray
    """The ensemble's ``(D, D)`` covariance in the unconstrained space, in the order of
    ``sites`` (each site's values flattened)."""
    sites: tuple
    """The latent sites, in the order of the mass matrix block."""


def nuts_warm_start(
    ensemble,
    rng_key: PRNGKeyArray,
    params: dict,
    *args,
    num_chains: int = 4,
    weights=None,
    dense_mass: bool | None = None,
    num_samples: int = 200,
    model=None,
    **kwargs,
) -> NUTSWarmStart:
    """
    A warm start for NumPyro's ``NUTS`` on the ensemble's model: starts, an inverse
    mass matrix, a step size and a short warm-up (see :mod:`numpyro_ensemble.warmstart`).

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` or
        :class:`~numpyro_ensemble.EnsembleMAP` (points are made Gaussian with
        :func:`~numpyro_ensemble.laplace_members` first: pass its result instead).
    :param jax.random.key rng_key: random number generator seed.
    :param dict params: the ensemble's params.
    :param args: the model's arguments, with the data.
    :param int num_chains: chains, started at distinct members (heaviest first).
    :param weights: member weights (an ``(E,)`` array, or the result of
        :func:`~numpyro_ensemble.importance_weights` /
        :func:`~numpyro_ensemble.stacking_weights`); importance weights with
        Pareto k < 0.5 make the metric trusted (kept, not re-adapted).
    :param bool dense_mass: a dense inverse mass matrix (else its diagonal); default:
        dense when the metric is trusted, else diagonal (see above).
    :param int num_samples: draws per member for the covariance of non-Gaussian members.
    :param model: the model NUTS will run, checked to have the ensemble's latent sites.
    :param kwargs: the model's keyword arguments.
    :return: :class:`NUTSWarmStart`.
    """
    check_ensemble(ensemble, "nuts_warm_start")
    check_key(rng_key)
    num_chains = check_positive_int(num_chains, "num_chains")
    num_samples = check_positive_int(num_samples, "num_samples")
    ensemble._check_initialized("nuts_warm_start")
    ensemble, params = laplace.resolve(ensemble, params, args, kwargs)
    _check_params(ensemble, params)
    E = ensemble.ensemble_size
    usable = finite_members(params)
    member_weights = np.where(usable, 1.0, 0.0) if weights is None else np.where(
        usable, member_weights_of(weights, E), 0.0
    )
    if member_weights.sum() <= 0:
        raise ValueError("nuts_warm_start: no member has weight > 0 and finite params.")
    if all(s.point for s in _sites(ensemble, params, args, kwargs)):
        raise ValueError(
            "nuts_warm_start: the members are points (EnsembleMAP / AutoDelta), which have "
            "no covariance; pass their Laplace approximations: laplace, laplace_params = "
            "laplace_members(ens, params, *data), then nuts_warm_start(laplace, key, "
            "laplace_params, *data)."
        )
    sites = _latent_sites(ensemble, args, kwargs, model)
    init_key, draw_key = jax.random.split(rng_key)
    if isinstance(ensemble.guide, AutoMultivariateNormal):
        covariance = _mixture_covariance(ensemble, params, member_weights, sites)
    else:
        covariance = _draws_covariance(
            ensemble, draw_key, params, weights, num_samples, sites, args, kwargs
        )
    trusted = isinstance(weights, ImportanceWeights) and weights.pareto_k < TRUSTED_PARETO_K
    if dense_mass is None:
        dense_mass = trusted
    dim = covariance.shape[0]
    matrix = covariance if dense_mass else np.diag(covariance)
    init_params = mcmc_init_params(
        ensemble, init_key, params, *args, num_chains=num_chains,
        resample=num_chains > int(usable.sum()),
        weights=None if weights is None else member_weights, **kwargs,
    )
    nuts_kwargs = {
        "inverse_mass_matrix": {sites: jnp.asarray(matrix)},
        "dense_mass": [sites] if dense_mass else [],
        "step_size": float(min(1.0, 1.5 * dim**-0.25)),
        "adapt_mass_matrix": not trusted,
    }
    return NUTSWarmStart(
        init_params=init_params,
        nuts_kwargs=nuts_kwargs,
        num_warmup=TRUSTED_WARMUP if trusted else ADAPTING_WARMUP,
        num_chains=num_chains,
        covariance=covariance,
        sites=sites,
    )


def _sites(ensemble, params, args, kwargs):
    from numpyro_ensemble.posterior import guide_sites

    safe = jax.tree.map(lambda v: jnp.where(jnp.isfinite(v), v, 0.0), params)
    return guide_sites(ensemble, safe, *args, **kwargs)


def _latent_sites(ensemble, args, kwargs, model) -> tuple:
    """The model's latent sites, sorted (NumPyro's order for a block of the metric)."""
    split = ensemble._split(args, kwargs)
    info = inspect_model(ensemble.model, split, ensemble.static_kwargs)
    if info.error is not None:
        raise ValueError(f"nuts_warm_start: the model could not be traced ({info.error}).")
    if model is not None and model is not ensemble.model:
        other = inspect_model(model, split, ensemble.static_kwargs)
        if other.error is not None or sorted(other.latent) != sorted(info.latent):
            raise ValueError(
                f"nuts_warm_start: model has the latent sites "
                f"{sorted(other.latent) if other.error is None else '(not traceable)'}, but "
                f"the ensemble's model has {sorted(info.latent)}: pass the model the "
                f"ensemble was fitted to."
            )
    return tuple(sorted(info.latent))


def _to_unconstrained(ensemble, draws: dict, args, kwargs, sites) -> np.ndarray:
    """Constrained draws ``{site: (N, ...)}`` as ``(N, D)`` unconstrained rows, sites in order."""
    model_kwargs = {**kwargs, **ensemble.static_kwargs}
    unconstrained = jax.vmap(lambda z: unconstrain_fn(ensemble.model, args, model_kwargs, z))(
        {name: draws[name] for name in sites}
    )
    n = np.shape(unconstrained[sites[0]])[0]
    return np.concatenate(
        [np.asarray(unconstrained[name], np.float64).reshape(n, -1) for name in sites], axis=1
    )


def _draws_covariance(ensemble, key, params, weights, num_samples, sites, args, kwargs):
    E = ensemble.ensemble_size
    if isinstance(weights, ImportanceWeights):  # its own draws, each with its weight
        draws, log_w = weights.samples, np.asarray(weights.log_weights, np.float64)
        num_samples = log_w.shape[1]
    else:
        draws = sample_posterior(ensemble, key, params, *args, num_samples=num_samples, **kwargs)
        log_w = np.where(finite_members(params)[:, None], 0.0, -np.inf) * np.ones(num_samples)
        if weights is not None:
            log_w = log_w + np.asarray(draw_log_weights(weights, E, num_samples), np.float64)
    flat = {name: jnp.reshape(v, (E * num_samples,) + v.shape[2:]) for name, v in draws.items()}
    rows = _to_unconstrained(ensemble, flat, args, kwargs, sites)
    log_w = log_w.reshape(-1)
    ok = np.isfinite(rows).all(axis=1) & np.isfinite(log_w)
    w = np.exp(log_w[ok] - log_w[ok].max())
    w /= w.sum()
    rows = rows[ok]
    mean = w @ rows
    centred = rows - mean
    covariance = (centred * w[:, None]).T @ centred
    n = 1.0 / np.sum(w**2)  # the effective number of draws
    return (n / (n + 5.0)) * covariance + 1e-3 * (5.0 / (n + 5.0)) * np.eye(rows.shape[1])


def _mixture_covariance(ensemble, params, member_weights, sites):
    """The covariance of the weighted mixture of Gaussian members, in ``sites`` order."""
    guide = ensemble.guide
    prefix = guide.prefix
    loc = np.asarray(params[f"{prefix}_loc"], np.float64)
    scale_tril = np.asarray(params[f"{prefix}_scale_tril"], np.float64)
    w = member_weights / member_weights.sum()
    keep = w > 0
    covs = scale_tril @ np.swapaxes(scale_tril, -1, -2)
    mean = (w[keep, None] * loc[keep]).sum(axis=0)
    second = (w[keep, None, None] * (covs[keep] + loc[keep, :, None] * loc[keep, None, :])).sum(0)
    covariance = second - np.outer(mean, mean)
    # the guide's latent layout -> NumPyro's: the sites sorted, each flattened
    index = guide._unpack_latent(jnp.arange(loc.shape[1]))
    order = np.concatenate([np.asarray(index[name]).reshape(-1) for name in sites]).astype(int)
    return covariance[np.ix_(order, order)]
