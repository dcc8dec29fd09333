r"""A warm start for NumPyro's NUTS from a fitted ensemble: starts, metric, step size.

NUTS's default warm-up spends 1,000 iterations finding what a fitted ensemble
already knows: where the posterior is and its scale and correlations. From the
ensemble, :func:`nuts_warm_start` returns

- **starts**: with importance weights, draws resampled in proportion to their
  weights (without replacement, never a draw of weight below 1e-3 x the largest);
  otherwise one chain per member, members drawn in proportion to their weights and
  never one of weight below 1e-3; as many spare starts for restarts;
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
- **a guarded kinetic energy** (:func:`~numpyro_ensemble.use.nuts_run.guarded_kinetic_energy`):
  NumPyro's, :math:`+\infty` where it overflows, so a leapfrog step that lands where
  the gradient is huge is a divergence, not a proposal accepted at energy
  :math:`-\infty` that strands the chain.

Everything goes to NumPyro's own ``NUTS`` and ``MCMC``; nothing is re-implemented,
and every value can be overridden. :meth:`NUTSWarmStart.run` runs the warm-up,
checks every chain, restarts a stranded one and draws::

    warm = nuts_warm_start(ens, key, params, x, y, weights=weights)
    run = warm.run(model, key, x, y, num_samples=1000)
    nuts_summary(run)                       # R-hat, ESS, divergences, a verdict

or, by hand, with NumPyro only (no check)::

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
from numpyro.infer.util import potential_energy, unconstrain_fn

from numpyro_ensemble.engine.checks import check_key, check_positive_int
from numpyro_ensemble.engine.health import finite_members
from numpyro_ensemble.engine.inspection import inspect_model
from numpyro_ensemble.engine.members import merge_args, owner_program
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.fitted import check_params
from numpyro_ensemble.use.mcmc import NEGLIGIBLE_WEIGHT, host_rng, member_order
from numpyro_ensemble.use.nuts_run import WarmNUTSRun, guarded_kinetic_energy, run_warm_nuts
from numpyro_ensemble.use.posterior import guide_sites, sample_posterior
from numpyro_ensemble.use.weights import ImportanceWeights, member_weights_of

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
    spare_params: dict = {}
    """``num_chains`` more unconstrained starts, ``{site: (num_chains, ...)}``, drawn as
    ``init_params`` were: where :meth:`run` restarts a stranded chain."""
    reference_energy: float = np.inf
    """The 99th percentile of NumPyro's potential energy over the ensemble's
    (weighted) draws: :meth:`run` finds a chain stranded far above it."""

    def run(
        self,
        model,
        rng_key: PRNGKeyArray,
        *args,
        num_samples: int = 1000,
        num_warmup: int | None = None,
        chain_method: str = "sequential",
        progress_bar: bool = True,
        nuts_kwargs: dict | None = None,
        extra_fields: tuple = (),
        **kwargs,
    ) -> WarmNUTSRun:
        """
        NumPyro's ``NUTS`` from this warm start, checked: ``MCMC.warmup``, then every
        chain is checked for being stranded (divergent transitions, step size against
        the other chains', potential energy against the ensemble's draws'; see
        :mod:`numpyro_ensemble.use.nuts_run`), a stranded chain's warm-up is run again
        from a spare start with the metric re-adapted (a warning names the chain and
        why), then ``MCMC.run`` draws from all chains. A chain still stranded after
        two restarts is named in a warning and in the result's ``stranded``.

        **Example:**

        .. doctest::

            >>> import jax.numpy as jnp
            >>> from jax import random
            >>> import numpyro, numpyro.distributions as dist
            >>> from numpyro_ensemble import (EnsembleMAP, laplace_members,
            ...                               importance_weights, nuts_summary,
            ...                               nuts_warm_start)
            >>> def model(y):
            ...     loc = numpyro.sample("loc", dist.Normal(0.0, 10.0))
            ...     numpyro.sample("y", dist.Normal(loc, 1.0), obs=y)
            >>> y = jnp.array([1.0, 2.0, 0.5, 1.5])
            >>> ens = EnsembleMAP(model, ensemble_size=4)
            >>> result = ens.run(random.key(0), 200, y, progress_bar=False)
            >>> lap, lap_params = laplace_members(ens, result.params, y)
            >>> iw = importance_weights(lap, random.key(1), lap_params, y, num_samples=100)
            >>> warm = nuts_warm_start(lap, random.key(2), lap_params, y, weights=iw,
            ...                        num_chains=2)
            >>> run = warm.run(model, random.key(3), y, num_samples=500, progress_bar=False)
            >>> run.get_samples(group_by_chain=True)["loc"].shape
            (2, 500)
            >>> run.restarted, run.stranded
            ({}, {})
            >>> loc = run.get_samples()["loc"]       # the exact posterior: N(5 / 4.01, 4.01^-1/2)
            >>> bool(abs(loc.mean() - 5 / 4.01) < 0.1), bool(abs(loc.std() - 4.01**-0.5) < 0.1)
            (True, True)
            >>> nuts_summary(run).divergences
            array([0., 0.])

        :param model: the model (the ensemble's).
        :param jax.random.key rng_key: random number generator seed.
        :param args: the model's arguments, with the data.
        :param int num_samples: draws per chain.
        :param int num_warmup: warm-up iterations (default: this warm start's).
        :param str chain_method: ``MCMC``'s: ``"sequential"``, ``"vectorized"`` or
            ``"parallel"`` (one device per chain).
        :param bool progress_bar: NumPyro's progress bar.
        :param dict nuts_kwargs: ``NUTS`` arguments over this warm start's.
        :param tuple extra_fields: ``MCMC.run``'s (``"diverging"`` is always collected).
        :param kwargs: the model's keyword arguments.
        :return: :class:`~numpyro_ensemble.use.nuts_run.WarmNUTSRun`: the ``MCMC`` object,
            the restarted chains and the chains still stranded, each with why.
        """
        num_samples = check_positive_int(num_samples, "num_samples")
        if num_warmup is not None:
            num_warmup = check_positive_int(num_warmup, "num_warmup")
        check_key(rng_key)
        if chain_method not in ("sequential", "vectorized", "parallel"):
            raise ValueError(
                f"chain_method must be 'sequential', 'vectorized' or 'parallel', got "
                f"{chain_method!r}."
            )
        return run_warm_nuts(
            self, model, rng_key, args, kwargs, num_samples=num_samples,
            num_warmup=num_warmup, chain_method=chain_method, progress_bar=progress_bar,
            nuts_kwargs=nuts_kwargs, extra_fields=tuple(extra_fields),
        )


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
    mass matrix, a step size and a short warm-up (see :mod:`numpyro_ensemble.use.warmstart`).

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` or
        :class:`~numpyro_ensemble.EnsembleMAP` (points are made Gaussian with
        :func:`~numpyro_ensemble.laplace_members` first: pass its result instead).
    :param jax.random.key rng_key: random number generator seed.
    :param dict params: the ensemble's params.
    :param args: the model's arguments, with the data.
    :param int num_chains: chains (see the starts above).
    :param weights: member weights (an ``(E,)`` array, or the result of
        :func:`~numpyro_ensemble.importance_weights` /
        :func:`~numpyro_ensemble.stacking_weights`); importance weights with
        Pareto k < 0.5 make the metric trusted (kept, not re-adapted).
    :param bool dense_mass: a dense inverse mass matrix (else its diagonal); default:
        dense when the metric is trusted, else diagonal (see above).
    :param int num_samples: draws per member for the covariance of non-Gaussian members,
        the starts and the reference energy (without importance weights).
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
    check_params(ensemble, params)
    E = ensemble.ensemble_size
    usable = finite_members(params)
    given = None if weights is None else member_weights_of(weights, E)
    member_weights = np.where(usable, 1.0 if given is None else given, 0.0)
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
    choice_key, draw_key = jax.random.split(rng_key)
    pool, log_w, per_member_draws = _pool(
        ensemble, draw_key, params, weights, member_weights, num_samples,
        2 * num_chains, args, kwargs,
    )
    unconstrained = _to_unconstrained(ensemble, pool, args, kwargs, sites)
    rows = _rows(unconstrained, sites)
    ok = np.isfinite(rows).all(axis=1) & np.isfinite(log_w)
    if not ok.any():
        raise ValueError("nuts_warm_start: no draw of the ensemble is finite in the "
                         "unconstrained space; check the params and the data.")
    if isinstance(ensemble.guide, AutoMultivariateNormal):
        covariance = _mixture_covariance(ensemble, params, member_weights, sites)
    else:
        covariance = _shrunk_covariance(rows[ok], log_w[ok])
    trusted = isinstance(weights, ImportanceWeights) and weights.pareto_k < TRUSTED_PARETO_K
    if dense_mass is None:
        dense_mass = trusted
    dim = covariance.shape[0]
    matrix = covariance if dense_mass else np.diag(covariance)
    rng = host_rng(choice_key)
    if isinstance(weights, ImportanceWeights):
        chosen = _resample(rng, np.where(ok, log_w, -np.inf), 2 * num_chains)
    else:  # chains at distinct members, drawn in proportion to their weights
        order = member_order(choice_key, usable & ok.reshape(E, -1).all(axis=1),
                             given)
        if order.size == 0:
            raise ValueError("nuts_warm_start: no member has weight >= 1e-3 and finite draws.")
        chosen = np.array([order[c % order.size] * per_member_draws + c // order.size
                           for c in range(2 * num_chains)])
    starts = jax.tree.map(lambda leaf: np.asarray(leaf)[chosen], unconstrained)
    init_params = jax.tree.map(lambda leaf: leaf[:num_chains], starts)
    if num_chains == 1:
        init_params = jax.tree.map(lambda leaf: leaf[0], init_params)
    energy = _potential_energies(ensemble, unconstrained, args, kwargs)
    reference_energy = _weighted_quantile(energy[ok], log_w[ok], 0.99)
    nuts_kwargs = {
        "inverse_mass_matrix": {sites: jnp.asarray(matrix)},
        "dense_mass": [sites] if dense_mass else [],
        "step_size": float(min(1.0, 1.5 * dim**-0.25)),
        "adapt_mass_matrix": not trusted,
        "kinetic_fn": guarded_kinetic_energy,
    }
    return NUTSWarmStart(
        init_params=init_params,
        nuts_kwargs=nuts_kwargs,
        num_warmup=TRUSTED_WARMUP if trusted else ADAPTING_WARMUP,
        num_chains=num_chains,
        covariance=covariance,
        sites=sites,
        spare_params=jax.tree.map(lambda leaf: leaf[num_chains:], starts),
        reference_energy=reference_energy,
    )


def _pool(ensemble, key, params, weights, member_weights, num_samples, num_starts,
          args, kwargs):
    """The ensemble's draws ``{site: (E * S, ...)}``, their ``(E * S,)`` log weights and
    ``S``: the importance weights' own draws, else ``S`` draws per member, each with
    its member's weight."""
    E = ensemble.ensemble_size
    if isinstance(weights, ImportanceWeights):
        draws, log_w = weights.samples, np.asarray(weights.log_weights, np.float64)
    else:
        num_samples = max(num_samples, -(-num_starts // max(1, int((member_weights > 0).sum()))))
        draws = sample_posterior(ensemble, key, params, *args, num_samples=num_samples, **kwargs)
        with np.errstate(divide="ignore"):
            log_w = np.log(member_weights / member_weights.sum())[:, None] * np.ones(num_samples)
    S = log_w.shape[1]
    flat = {name: np.reshape(v, (E * S,) + np.shape(v)[2:]) for name, v in draws.items()}
    return flat, log_w.reshape(-1), S


def _resample(rng: np.random.Generator, log_w: np.ndarray, count: int) -> np.ndarray:
    """``count`` draws in proportion to their weights, without replacement (Gumbel
    top-k) among those of weight ``>= NEGLIGIBLE_WEIGHT`` x the largest, then with
    replacement if there are fewer."""
    eligible = np.flatnonzero(log_w >= log_w.max() + np.log(NEGLIGIBLE_WEIGHT))
    keys = log_w[eligible] + rng.gumbel(size=eligible.size)
    chosen = eligible[np.argsort(-keys, kind="stable")][:count]
    if chosen.size < count:
        p = np.exp(log_w[eligible] - log_w[eligible].max())
        extra = rng.choice(eligible, size=count - chosen.size, p=p / p.sum())
        chosen = np.concatenate([chosen, extra])
    return chosen


def _potential_energies(ensemble, unconstrained: dict, args, kwargs) -> np.ndarray:
    """NumPyro's potential energy (minus the log joint, Jacobians included) at each
    unconstrained draw: the scale a healthy chain's energy is compared with."""
    safe = jax.tree.map(lambda v: np.where(np.isfinite(v), v, 0.0), unconstrained)
    energy = _draws_program(ensemble, "potential_energy", potential_energy, args, kwargs)(safe)
    return np.asarray(energy, np.float64)


def _weighted_quantile(values: np.ndarray, log_w: np.ndarray, q: float) -> float:
    finite = np.isfinite(values)
    if not finite.any():
        return np.inf
    values, log_w = values[finite], log_w[finite]
    order = np.argsort(values)
    w = np.exp(log_w[order] - log_w.max())
    cumulative = np.cumsum(w) / w.sum()
    return float(values[order][min(np.searchsorted(cumulative, q), values.size - 1)])


def _sites(ensemble, params, args, kwargs):
    safe = jax.tree.map(lambda v: np.where(np.isfinite(v), v, 0), params)  # on the host
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


def _to_unconstrained(ensemble, draws: dict, args, kwargs, sites) -> dict:
    """Constrained draws ``{site: (N, ...)}`` in the unconstrained space, as NumPy."""
    unconstrained = _draws_program(ensemble, "unconstrain", unconstrain_fn, args, kwargs)(
        {name: draws[name] for name in sites}
    )
    return {name: np.asarray(unconstrained[name], np.float64) for name in sites}


def _draws_program(ensemble, name, fn, args, kwargs):
    """``draws -> vmap(fn(model, args, kwargs, draw))``, NumPyro's ``unconstrain_fn`` or
    ``potential_energy``, one program per ensemble and the arguments' static part."""
    split = ensemble._split(args, kwargs)
    static_kwargs = ensemble.static_kwargs

    def build():
        def program(draws, dynamic):
            model_args, model_kwargs = merge_args(dynamic, split.static)
            model_kwargs = {**model_kwargs, **static_kwargs}
            return jax.vmap(lambda z: fn(ensemble.model, model_args, model_kwargs, z))(draws)

        return program

    program = owner_program(ensemble, (name, split.axes, split.static), build)
    return lambda draws: program(draws, split.dynamic)


def _rows(unconstrained: dict, sites) -> np.ndarray:
    """``{site: (N, ...)}`` as ``(N, D)`` rows, sites in order, each flattened."""
    n = np.shape(unconstrained[sites[0]])[0]
    return np.concatenate([unconstrained[name].reshape(n, -1) for name in sites], axis=1)


def _shrunk_covariance(rows: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """The weighted covariance of ``(N, D)`` rows shrunk toward the diagonal as Stan does."""
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
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
    index = guide._unpack_latent(np.arange(loc.shape[1]))  # on the host
    order = np.concatenate([np.asarray(index[name]).reshape(-1) for name in sites]).astype(int)
    return covariance[np.ix_(order, order)]
