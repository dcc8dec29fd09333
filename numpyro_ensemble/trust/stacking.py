r"""Stacking of the members' predictive distributions (Yao, Vehtari, Simpson & Gelman 2018).

Each member ``e`` gives a leave-one-out predictive density of every observation,
:math:`p_e(y_i \mid y_{-i})`: PSIS-LOO over the member's own draws for an SVI
member (ArviZ's PSIS), the likelihood at its point for a point member
(``EnsembleMAP``; an in-sample score, not leave-one-out). Stacking picks the weights
on the simplex that maximise

.. math::

    \sum_i \log \sum_e w_e \, p_e(y_i \mid y_{-i}),

a concave problem, solved with SciPy's L-BFGS-B on softmax logits. A member that
predicts nothing better than the others gets weight near 0, however many draws it has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import PRNGKeyArray
import numpy as np
from numpyro.handlers import seed, substitute, trace
from scipy.optimize import minimize
from scipy.special import logsumexp

from numpyro_ensemble.engine.batching import full_data
from numpyro_ensemble.engine.checks import check_key
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.trust.importance import checked_inputs
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.fitted import model_params
from numpyro_ensemble.use.posterior import draw_guides, pointwise_log_likelihoods
from numpyro_ensemble.use.weights import StackingWeights, psis

__all__ = ["stacking_weights", "pointwise_log_likelihood"]


def pointwise_log_likelihood(ensemble, params: dict, draws: dict, args, kwargs) -> np.ndarray:
    """``log p(y_i | z_es)`` of every observation (observed sites flattened and
    concatenated, ``numpyro.factor`` sites left out) at ``(E, S)`` draws, with each
    member's own model params: ``(E, S, N)``."""
    split = ensemble._split(args, kwargs)
    plates = ensemble._inspect(split).plates
    model = full_data(ensemble.model, plates)
    own_params = model_params(ensemble, params, args, kwargs)
    observed = []

    def find_observed(one, own):  # which sites are real observations (abstractly)
        model_trace = trace(substitute(seed(model, 0), {**own, **one})).get_trace(
            *args, **kwargs, **ensemble.static_kwargs
        )
        observed.extend(
            name
            for name, site in model_trace.items()
            if site["type"] == "sample"
            and site["is_observed"]
            and not site["infer"].get("is_auxiliary", False)
        )

    jax.eval_shape(
        find_observed,
        jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v)[2:], v.dtype), draws),
        jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v)[1:], v.dtype), own_params),
    )
    if not observed:
        raise ValueError(
            "stacking_weights: the model has no observed sites, so there is no "
            "predictive density to stack; use importance_weights."
        )
    pointwise = pointwise_log_likelihoods(
        ensemble, model, params, draws, args, kwargs, ("stacking", plates)
    )
    E, S = np.shape(pointwise[observed[0]])[:2]
    return np.concatenate(
        [np.asarray(pointwise[name], np.float64).reshape(E, S, -1) for name in observed], axis=-1
    )


def _stack(lpd: np.ndarray) -> np.ndarray:
    """Weights on the simplex maximising ``sum_i log sum_e w_e exp(lpd[e, i])``."""
    E, N = lpd.shape
    if E == 1:
        return np.ones(1)

    def objective(logits):
        log_w = logits - logsumexp(logits)
        mix = logsumexp(lpd + log_w[:, None], axis=0)
        resp = np.exp(lpd + log_w[:, None] - mix).sum(axis=1)  # d/d log w_e
        w = np.exp(log_w)
        return -mix.sum() / N, -(resp - w * N) / N

    found = minimize(objective, np.zeros(E), jac=True, method="L-BFGS-B", options={"gtol": 1e-9})
    return np.exp(found.x - logsumexp(found.x))


def stacking_weights(
    ensemble,
    rng_key: PRNGKeyArray,
    params: dict,
    *args,
    num_samples: int = 100,
    **kwargs,
) -> StackingWeights:
    r"""
    Stacking weights of the members (see :mod:`numpyro_ensemble.trust.stacking`).

    Works for SVI members (PSIS-LOO over ``num_samples`` draws of each member) and
    point members (:class:`~numpyro_ensemble.EnsembleMAP`: the pointwise
    log-likelihood at the point). Members with non-finite params get weight 0.

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` or ``EnsembleMAP``.
    :param jax.random.key rng_key: random number generator seed for the draws.
    :param dict params: the ensemble's params, e.g. ``run(...).params``.
    :param args: the model's arguments, with the observed data it was fit to.
    :param int num_samples: draws per member, ``S`` (1 is used for point members).
    :param kwargs: the model's keyword arguments.
    :return: :class:`~numpyro_ensemble.StackingWeights`.
    """
    check_ensemble(ensemble, "stacking_weights")
    check_key(rng_key)
    ensemble, params = laplace.resolve(ensemble, params, args, kwargs)
    num_samples, _, sites = checked_inputs(
        ensemble, params, args, kwargs, num_samples, "stacking_weights",
        "but stacking scores every member on the same observations; stack the members "
        "of one data set.",
    )
    point = all(site.point for site in sites)
    draws, finite = draw_guides(
        ensemble, rng_key, params, args, kwargs, 1 if point else num_samples, "stacking_weights"
    )
    loglik = pointwise_log_likelihood(ensemble, params, draws, args, kwargs)  # (E, S, N)
    E = ensemble.ensemble_size
    lpd = np.full((E, loglik.shape[-1]), -np.inf)
    for e in np.flatnonzero(finite):
        if point:
            lpd[e] = loglik[e, 0]
        else:
            log_w, _ = psis(-loglik[e].T)  # (N, S): leave-one-out weights 1 / p(y_i | z)
            lpd[e] = logsumexp(log_w + loglik[e].T, axis=-1)
    usable = finite & np.isfinite(lpd).all(axis=1)
    weights = np.zeros(E)
    weights[usable] = _stack(lpd[usable])
    with np.errstate(divide="ignore"):
        stacked = logsumexp(lpd[usable] + np.log(weights[usable])[:, None], axis=0).sum()
    equal = (logsumexp(lpd[usable], axis=0) - np.log(usable.sum())).sum()
    return StackingWeights(
        member_weights=jnp.asarray(weights),
        elpd_loo=float(stacked),
        elpd_loo_equal=float(equal),
        pointwise=jnp.asarray(lpd),
    )
