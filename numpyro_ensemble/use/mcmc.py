"""Start NUTS chains of the same model from the members of a fitted ensemble."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray
import numpy as np
from numpyro.infer.util import unconstrain_fn

from numpyro_ensemble.engine.checks import check_key, check_positive_int
from numpyro_ensemble.engine.health import finite_members
from numpyro_ensemble.engine.members import has_per_member
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.posterior import sample_posterior
from numpyro_ensemble.use.weights import member_weights_of

__all__ = ["mcmc_init_params"]

NEGLIGIBLE_WEIGHT = 1e-3
"""A member whose normalized weight is below this never starts a chain."""


def mcmc_init_params(
    ensemble,
    rng_key: PRNGKeyArray,
    params: dict,
    *args,
    num_chains: int | None = None,
    resample: bool = False,
    weights=None,
    **kwargs,
) -> dict:
    """
    Initial values for ``MCMC(NUTS(model), num_chains=K).run(..., init_params=...)``,
    one ensemble member per chain.

    Each chain starts at one member: its point for an
    :class:`~numpyro_ensemble.EnsembleMAP`, one draw from its guide for an
    :class:`~numpyro_ensemble.EnsembleSVI`. The values are mapped to the
    unconstrained space that MCMC expects (``numpyro.infer.util.unconstrain_fn``).
    With ``K < E`` the first ``K`` members are used (members are exchangeable),
    or with ``weights`` ``K`` distinct members drawn in proportion to their weights
    (without replacement, seeded by ``rng_key``); members of weight below
    ``NEGLIGIBLE_WEIGHT`` (1e-3) and members with non-finite params are never used.
    More chains than usable members need ``resample=True``, which takes several
    guide draws per member (for a MAP ensemble, repeated points).

    **Example:**

    .. doctest::

        >>> import jax.numpy as jnp
        >>> from jax import random
        >>> import numpyro, numpyro.distributions as dist, optax
        >>> from numpyro.infer import MCMC, NUTS
        >>> from numpyro_ensemble import EnsembleMAP, mcmc_init_params
        >>> def model(y):
        ...     scale = numpyro.sample("scale", dist.HalfNormal(2.0))
        ...     numpyro.sample("y", dist.Normal(0.0, scale), obs=y)
        >>> y = jnp.array([1.0, -2.0, 0.5])
        >>> ens = EnsembleMAP(model, optax.adam(0.05), ensemble_size=4)
        >>> result = ens.run(random.key(0), 500, y, progress_bar=False)
        >>> init = mcmc_init_params(ens, random.key(1), result.params, y, num_chains=2)
        >>> init["scale"].shape                   # unconstrained: log(scale)
        (2,)
        >>> mcmc = MCMC(NUTS(model), num_warmup=50, num_samples=50, num_chains=2,
        ...             chain_method="vectorized", progress_bar=False)
        >>> mcmc.run(random.key(2), y, init_params=init)
        >>> mcmc.get_samples(group_by_chain=True)["scale"].shape
        (2, 50)

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` or ``EnsembleMAP``.
    :param jax.random.key rng_key: random number generator seed (for guide draws).
    :param dict params: the ensemble's params, e.g. ``run(...).params``.
    :param args: arguments to the model.
    :param int num_chains: ``K``, the number of chains; defaults to ``E``.
    :param bool resample: allow ``K > E`` by drawing several starts per member.
    :param weights: member weights (an ``(E,)`` array, or the result of
        :func:`~numpyro_ensemble.importance_weights` /
        :func:`~numpyro_ensemble.stacking_weights`): members drawn in proportion to
        them, never one of weight below 1e-3.
    :param kwargs: keyword arguments to the model.
    :return: ``{latent site name: unconstrained array of shape (K, *site_shape)}``;
        for ``K = 1`` without the leading axis, as ``MCMC`` expects for one chain.
    """
    check_ensemble(ensemble, "mcmc_init_params")
    check_key(rng_key)
    ensemble, params = laplace.resolve(ensemble, params, args, kwargs)
    if has_per_member((args, kwargs)):
        raise ValueError(
            "mcmc_init_params: the data differ between members (per_member), but MCMC "
            "runs the model on one data set; pass that data set's arrays, unwrapped."
        )
    E = ensemble.ensemble_size
    K = E if num_chains is None else check_positive_int(num_chains, "num_chains")
    usable = finite_members(params)
    order = member_order(rng_key, usable, None if weights is None else member_weights_of(
        weights, E))
    if K > order.size and not resample:
        raise ValueError(
            f"num_chains={K} is larger than the {order.size} usable members (of "
            f"ensemble_size={E}; weight >= {NEGLIGIBLE_WEIGHT:g} and finite params): pass "
            f"resample=True to "
            f"start several chains from draws of the same members, or use fewer chains."
        )
    per_member = math.ceil(K / order.size)
    draws = sample_posterior(ensemble, rng_key, params, *args, num_samples=per_member, **kwargs)
    # (E, S, ...) -> the usable members in order -> (S * n, ...) draw-major, so the
    # first K chains cycle over the members.
    starts = {
        name: jnp.swapaxes(value[order], 0, 1).reshape((-1,) + value.shape[2:])[:K]
        for name, value in draws.items()
    }
    model_kwargs = {**kwargs, **ensemble.static_kwargs}
    unconstrained = jax.vmap(lambda z: unconstrain_fn(ensemble.model, args, model_kwargs, z))(starts)
    return jax.tree.map(lambda leaf: leaf[0], unconstrained) if K == 1 else unconstrained



def host_rng(rng_key: PRNGKeyArray) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key, for choices made on the host."""
    return np.random.default_rng(np.asarray(jax.random.key_data(rng_key)).ravel().tolist())


def member_order(rng_key, usable: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """The usable members in the order chains start from them: all of them in index
    order without weights; with ``(E,)`` weights, the members of normalized weight
    ``>= NEGLIGIBLE_WEIGHT`` drawn in proportion to their weights without
    replacement (Gumbel top-k)."""
    if weights is None:
        return np.flatnonzero(usable)
    weights = np.asarray(weights, np.float64)
    if weights.sum() <= 0:
        return np.zeros(0, int)
    w = weights / weights.sum()  # negligible as given, not after dropping unusable ones
    eligible = np.flatnonzero(usable & (w >= NEGLIGIBLE_WEIGHT))
    keys = np.log(w[eligible]) + host_rng(rng_key).gumbel(size=eligible.size)
    return eligible[np.argsort(-keys, kind="stable")]
