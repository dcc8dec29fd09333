"""Draws from a fitted ensemble: posterior samples, posterior predictive, ``ensemble_predict``.

Every result keeps the ensemble as its leading axis and the draws of one member
as the second: ``(E, S, *site_shape)``, the ``(chain, draw)`` layout of
``MCMC.get_samples(group_by_chain=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax import random
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree
import numpyro.distributions as dist
from numpyro.distributions.distribution import validation_enabled
from numpyro.handlers import seed, substitute, trace
from numpyro.infer import Predictive, log_likelihood
from numpyro.infer.svi import SVIRunResult
from numpyro.primitives import Messenger

from numpyro_ensemble.engine.checks import (
    check_key,
    check_positive_int,
    leading_sizes,
)
from numpyro_ensemble.engine.health import blank, usable_params
from numpyro_ensemble.engine.members import (
    apply_members,
    apply_members_jitted,
    check_per_member,
    has_per_member,
    member_args,
    split_args,
)
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.fitted import check_params, model_params
from numpyro_ensemble.use.weights import (
    ImportanceWeights,
    draw_log_weights,
    member_weights_of,
)
from numpyro_ensemble.use.weights import (
    resample as resample_draws,
)

__all__ = ["ensemble_predict", "ensemble_predictive", "sample_posterior"]


class GuideSite(NamedTuple):
    name: str
    auxiliary: bool
    """An ``is_auxiliary`` site (e.g. an AutoGuide's unconstrained draw)."""
    point: bool
    """A point mass (``Delta``): its value is a function of the other sites."""


def _is_point(fn) -> bool:
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    return isinstance(fn, dist.Delta)


def guide_sites(ensemble, params, *args, **kwargs) -> list[GuideSite]:
    """The guide's sample sites, traced with member 0's params (params must be finite):
    abstractly (``jax.eval_shape``: nothing runs, nothing compiles) once the guide is
    set up, concretely otherwise (a first call sets an AutoGuide up, which must not
    happen under a trace)."""
    args, kwargs = member_args(args, kwargs, 0)
    found = []

    def sites(params, args, kwargs):
        member = jax.tree.map(lambda leaf: leaf[0], params)
        guide_trace = trace(substitute(seed(ensemble.guide, 0), member)).get_trace(
            *args, **kwargs, **ensemble.static_kwargs
        )
        found[:] = [
            GuideSite(name, bool(site["infer"].get("is_auxiliary", False)), _is_point(site["fn"]))
            for name, site in guide_trace.items()
            if site["type"] == "sample"
        ]

    if getattr(ensemble.guide, "prototype_trace", True) is None:
        sites(params, args, kwargs)
    else:
        with validation_enabled(False):  # NumPyro checks concrete values eagerly
            jax.eval_shape(sites, params, args, kwargs)
    return list(found)


def latent_sites(ensemble, params, *args, **kwargs) -> list[str]:
    """Names of the model's latent sites that the guide samples (auxiliary sites left out)."""
    return [s.name for s in guide_sites(ensemble, params, *args, **kwargs) if not s.auxiliary]


def draw_guides(ensemble, rng_key, params, args, kwargs, num_samples, caller, auxiliary=False):
    """``num_samples`` draws of every member's guide, ``(E, S, ...)``, and the ``(E,)``
    mask of usable members (members with non-finite params get NaN draws)."""
    params, finite = usable_params(params, caller)
    draw, names = _guide_draw(ensemble, params, args, kwargs, num_samples, auxiliary)
    keys = random.split(rng_key, ensemble.ensemble_size)
    with validation_enabled(False):  # its checks of concrete values run op by op
        draws = _map(ensemble, draw, (params, keys), args, kwargs, ("draw", names, num_samples))
    return blank(draws, finite), finite


def blank_draws(ensemble, params, args, kwargs, num_samples, auxiliary=False) -> dict:
    """NaN draws ``(E, S, ...)`` of the sites and shapes :func:`draw_guides` gives, for an
    ensemble none of whose members is usable (nothing runs: the shapes come from
    ``jax.eval_shape``; non-floating sites are 0)."""
    draw, _ = _guide_draw(ensemble, params, args, kwargs, num_samples, auxiliary)
    keys = random.split(random.key(0), ensemble.ensemble_size)
    with validation_enabled(False):
        shapes = jax.eval_shape(
            lambda p, k: _map(ensemble, draw, (p, k), args, kwargs), params, keys
        )
    return jax.tree.map(
        lambda s: jnp.full(
            s.shape, jnp.nan if jnp.issubdtype(s.dtype, jnp.inexact) else 0, s.dtype
        ),
        shapes,
    )


def _guide_draw(ensemble, params, args, kwargs, num_samples, auxiliary):
    """One member's ``num_samples`` guide draws of the guide's sites (auxiliary ones
    with ``auxiliary``), as :func:`_map` calls it, and the names of those sites."""
    sites = guide_sites(ensemble, params, *args, **kwargs)
    names = [s.name for s in sites if auxiliary or not s.auxiliary]

    def draw(member, args, kwargs):
        member_params, key = member
        predictive = Predictive(
            ensemble.guide, params=member_params, num_samples=num_samples, return_sites=names
        )
        return predictive(key, *args, **kwargs, **ensemble.static_kwargs)

    return draw, tuple(names)


def pointwise_log_likelihoods(ensemble, model, params: dict, draws: dict, args, kwargs, key=None):
    """``{observed site: log p(y | z, params_e)}`` at every draw, ``(E, S, ...)``, with
    member ``e``'s model params (a model with no latent sites: ``S = 1``); with a
    ``key`` (what ``model`` is made from) one program compiled once per key."""

    def member(m, args, kwargs):
        own_params, own_draws = m
        at = substitute(model, data=own_params)
        kwargs = {**kwargs, **ensemble.static_kwargs}
        if own_draws:
            return log_likelihood(at, own_draws, *args, batch_ndims=1, **kwargs)
        return jax.tree.map(lambda v: v[None], log_likelihood(at, {}, *args, batch_ndims=0, **kwargs))

    own = model_params(ensemble, params, args, kwargs)
    return _map(ensemble, member, (own, draws), args, kwargs, key and ("loglik", key))


def sample_posterior(
    ensemble,
    rng_key: PRNGKeyArray,
    params: dict,
    *args,
    num_samples: int = 1,
    weights=None,
    resample: bool | None = None,
    **kwargs,
) -> dict[str, Array]:
    """
    Draws ``num_samples`` latent values from each member's guide.

    For an :class:`~numpyro_ensemble.EnsembleMAP` every draw of member ``e`` is its
    point. Member ``e`` uses key ``random.split(rng_key, E)[e]``, so results are
    reproducible. Members whose params are not finite are excluded: their draws
    are NaN (with a warning naming them), the others are unaffected.

    With ``weights`` the draws are resampled (with replacement) in proportion to
    the weights, giving ``E * S`` plain, equally weighted draws for tools that need
    them (e.g. :class:`numpyro.infer.Predictive`). For an
    :class:`~numpyro_ensemble.ImportanceWeights` its own draws are resampled with
    their draw weights (``num_samples`` is then its ``S``).

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` (or ``EnsembleMAP``).
    :param jax.random.key rng_key: random number generator seed.
    :param dict params: the ensemble's params, e.g. ``run(...).params``.
    :param args: arguments to the guide (the model's arguments).
    :param int num_samples: draws per member, ``S``.
    :param weights: member weights: an ``(E,)`` array on the simplex, or the result
        of :func:`~numpyro_ensemble.importance_weights` /
        :func:`~numpyro_ensemble.stacking_weights`.
    :param bool resample: return ``E * S`` resampled draws; defaults to
        ``weights is not None`` (``resample=True`` without weights resamples the
        usable members equally).
    :param kwargs: keyword arguments to the guide.
    :return: ``{latent site name: array of shape (E, S, *site_shape)}``, constrained;
        with ``resample``, ``(E * S, *site_shape)``.
    """
    check_ensemble(ensemble, "sample_posterior")
    check_key(rng_key)
    ensemble, params = laplace.resolve(ensemble, params, args, kwargs)
    num_samples = check_positive_int(num_samples, "num_samples")
    check_params(ensemble, params)
    E = ensemble.ensemble_size
    resample = weights is not None if resample is None else bool(resample)
    if weights is not None and not resample:
        raise ValueError(
            "sample_posterior: weights are applied by resampling; pass resample=True "
            "(the default with weights), or use the weights directly with the "
            "unweighted (E, S, ...) draws."
        )
    if weights is not None:
        member_weights_of(weights, E)
    draw_key, resample_key = random.split(rng_key)
    if isinstance(weights, ImportanceWeights):
        draws = weights.samples
        num_samples = next(iter(jax.tree.leaves(draws))).shape[1]
    else:
        draws, finite = draw_guides(
            ensemble, draw_key, params, args, kwargs, num_samples, "sample_posterior"
        )
    if not resample:
        return draws
    if weights is None:
        weights = finite / finite.sum()
    log_weights = draw_log_weights(weights, E, num_samples)
    return resample_draws(resample_key, draws, log_weights, E * num_samples)


def _map(ensemble, fn, mapped, args, kwargs, key=None):
    """``fn`` for every member, with the member's own slice of per-member data; with
    a ``key`` (the settings ``fn`` depends on) as one program compiled once per key."""
    split = ensemble._split(args, kwargs)
    if key is not None:
        return apply_members_jitted(ensemble, key, lambda: fn, mapped, split)
    return apply_members(
        fn, mapped, split, mesh=ensemble.mesh, members_per_chunk=ensemble.members_per_chunk
    )


class _unobserved(Messenger):
    """Draw observed sites instead of conditioning on them (``numpyro.factor`` sites
    stay as they are), for a posterior predictive of the data the model was fit to."""

    def process_message(self, msg):
        if (
            msg["type"] == "sample"
            and msg["is_observed"]
            and not msg["infer"].get("is_auxiliary", False)
        ):
            msg["value"] = None
            msg["is_observed"] = False


def ensemble_predictive(
    ensemble,
    rng_key: PRNGKeyArray,
    params: dict,
    *args,
    num_samples: int = 1,
    return_sites: Sequence[str] | None = None,
    posterior_samples: dict | None = None,
    resample_observed: bool = False,
    weights=None,
    **kwargs,
) -> dict[str, Array]:
    """
    The ensemble's posterior predictive, with :class:`numpyro.infer.Predictive`.

    Draws ``num_samples`` latent values per member (:func:`sample_posterior`, or
    the given ``posterior_samples``) and runs the model on each, so draw
    ``[e, s]`` of every returned site comes from latent draw ``[e, s]`` of member ``e``.

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` (or ``EnsembleMAP``).
    :param jax.random.key rng_key: random number generator seed.
    :param dict params: the ensemble's params, e.g. ``run(...).params``.
    :param args: arguments to the model, e.g. new inputs ``x_new``.
    :param int num_samples: draws per member, ``S`` (ignored with ``posterior_samples``).
    :param return_sites: sites to return; by default NumPyro's choice: the observed
        and deterministic sites.
    :param dict posterior_samples: latent draws of shape ``(E, S, ...)`` to use
        instead of drawing from the guides.
    :param bool resample_observed: draw observed sites even where ``args`` /
        ``kwargs`` hold observations (a posterior predictive of the training data).
    :param weights: member weights (an ``(E,)`` array, or the result of
        :func:`~numpyro_ensemble.importance_weights` /
        :func:`~numpyro_ensemble.stacking_weights`): the predictive of the weighted
        ensemble, from ``E * S`` latent draws resampled by
        ``sample_posterior(..., weights=weights)``.
    :param kwargs: keyword arguments to the model.
    :return: ``{site name: array of shape (E, S, *site_shape)}``; with ``weights``,
        ``(E * S, *site_shape)``.
    """
    check_ensemble(ensemble, "ensemble_predictive")
    check_key(rng_key)
    if posterior_samples is None:  # Laplace members: args may be new inputs, not the data
        ensemble, params = laplace.resolve(ensemble, params, args, kwargs, with_data=False)
    post_key, pred_key = random.split(rng_key)
    model = _unobserved(ensemble.model) if resample_observed else ensemble.model
    return_sites = None if return_sites is None else list(return_sites)
    own_params = model_params(ensemble, params, args, kwargs)
    if weights is not None:
        if posterior_samples is not None:
            raise ValueError(
                "ensemble_predictive: pass either weights or posterior_samples; for "
                "weighted draws of your own, resample them first."
            )
        if has_per_member((args, kwargs)):
            raise ValueError(
                "ensemble_predictive: weights pool the members' draws, but the data "
                "differ between members (per_member); predict each data set separately."
            )
        member_weights_of(weights, ensemble.ensemble_size)
        if own_params:  # the model's params differ by member: predict, then resample
            if isinstance(weights, ImportanceWeights):
                posterior_samples = weights.samples
                num_samples = next(iter(jax.tree.leaves(posterior_samples))).shape[1]
            predicted = ensemble_predictive(
                ensemble, rng_key, params, *args, num_samples=num_samples,
                return_sites=return_sites, posterior_samples=posterior_samples,
                resample_observed=resample_observed, **kwargs,
            )
            log_weights = draw_log_weights(weights, ensemble.ensemble_size, num_samples)
            return resample_draws(
                random.fold_in(rng_key, 1), predicted, log_weights,
                ensemble.ensemble_size * num_samples,
            )
        pooled = sample_posterior(
            ensemble, post_key, params, *args, num_samples=num_samples, weights=weights, **kwargs
        )
        predictive = Predictive(model, posterior_samples=pooled, return_sites=return_sites)
        return predictive(pred_key, *args, **kwargs, **ensemble.static_kwargs)
    if posterior_samples is None:
        posterior_samples = sample_posterior(
            ensemble, post_key, params, *args, num_samples=num_samples, **kwargs
        )
    elif posterior_samples and leading_sizes(posterior_samples) != {ensemble.ensemble_size}:
        raise ValueError(
            f"posterior_samples must have shape (E, S, ...) with E=ensemble_size="
            f"{ensemble.ensemble_size} on every site."
        )

    def predict(member, args, kwargs):
        samples, own, key = member
        predictive = Predictive(
            model,
            posterior_samples=samples or None,
            params=own,
            num_samples=None if samples else num_samples,  # a model with no latent sites
            return_sites=return_sites,
        )
        return predictive(key, *args, **kwargs, **ensemble.static_kwargs)

    keys = random.split(pred_key, ensemble.ensemble_size)
    settings = ("predict", resample_observed, None if return_sites is None else tuple(return_sites), num_samples)
    return _map(ensemble, predict, (posterior_samples, own_params, keys), args, kwargs, settings)


def ensemble_predict(
    params: PyTree,
    predict_fn: Callable[..., Any],
    *inputs,
) -> Any:
    """
    Applies a deterministic ``predict_fn(params, *inputs)`` to every member.

    :param params: params or points with a leading ``(E,)`` axis on every leaf.
    :param predict_fn: ``(one member's params, *inputs) -> prediction``.
    :param inputs: inputs shared by all members, or wrapped in
        :func:`~numpyro_ensemble.per_member` (a leading ``(E,)`` axis; member ``e``
        gets ``inputs[e]``), e.g. each member's own test fold.
    :return: predictions with a leading ``(E,)`` axis.
    """
    if not callable(predict_fn):
        raise TypeError(
            f"predict_fn must be a callable (params, *inputs) -> prediction, got "
            f"{type(predict_fn).__name__}."
        )
    if isinstance(params, SVIRunResult):
        raise TypeError("params must be the params or points, got a whole SVIRunResult: pass result.params.")
    sizes = leading_sizes(params)
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"params must have the same leading (member) axis on every leaf, got leading "
            f"sizes {sorted(s for s in sizes if s is not None)}."
        )
    split = split_args(inputs, {})
    check_per_member(split, sizes.pop())
    return apply_members(lambda member, args, _: predict_fn(member, *args), params, split)
