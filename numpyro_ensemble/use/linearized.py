r"""The linearized (GLM) predictive of Laplace members.

Member :math:`e`'s Laplace approximation :math:`q_e = \mathcal N(u_e, \Sigma_e)` is a
Gaussian over the unconstrained latent vector :math:`z`. Pushing its draws through
the model, as :func:`~numpyro_ensemble.ensemble_predictive` does, underfits and
over-disperses for neural networks: the curvature behind :math:`\Sigma_e` (the
generalized Gauss-Newton matrix's exactly) is that of the model *linearized* at
:math:`u_e`, and far from :math:`u_e` the network is not that model. The linearized
predictive (Immer, Korzepa & Bauer 2021, *Improving predictions of Bayesian neural
nets via local linearization*) samples the linear model instead:

.. math::

    g_{\mathrm{lin}}(z) = g(u_e) + J_g(u_e)\,(z - u_e), \qquad z_s \sim q_e,

for every deterministic site and every parameter :math:`\eta` of every observed
site's distribution, :math:`g(z)` the model run with the latent sites at
:math:`T(z)` (the transform to their supports) and the member's own values of the
model's ``numpyro.param`` sites. An observed site's value is then drawn from its
family with the linearized parameters: :math:`y_s \sim p(y \mid \eta_{\mathrm{lin}}(z_s))`.
Each family's parameters are linearized where they are unconstrained, the
parameters the network's last layer usually is: a ``Normal``'s ``loc`` and the
logarithm of its ``scale``, logits (a ``Bernoulli`` or ``Categorical`` given
``probs`` is linearized in ``logit(probs)`` / ``log(probs)``) and a ``Poisson``'s
log rate, so every draw of the linear model is a valid distribution. For a model
linear in :math:`z` (a linear regression) the linearization is exact and this is
the posterior predictive of :math:`q_e` itself.

The families are those the GGN knows (:data:`numpyro_ensemble.use.curvature.FAMILIES`:
``Normal``, ``Bernoulli``, ``Categorical``, ``Poisson``, under ``Independent``,
``expand`` and ``mask``). Each member costs one model run and one linearization
(``jax.linearize``), then one Jacobian-vector product per draw; all members run in one
jitted program.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
from jax import random
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray
import numpyro.distributions as dist
from numpyro.distributions.distribution import (
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
    Unit,
    validation_enabled,
)
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal

from numpyro_ensemble.engine.checks import check_key, check_positive_int
from numpyro_ensemble.engine.health import blank, usable_params
from numpyro_ensemble.engine.members import apply_members_jitted, has_per_member, member_args
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.use.curvature import FAMILIES, family
from numpyro_ensemble.use.fitted import check_params, is_laplace, model_params
from numpyro_ensemble.use.laplace import resolve as resolve_laplace
from numpyro_ensemble.use.laplace_guides import AutoLowRankPrecisionNormal
from numpyro_ensemble.use.weights import draw_log_weights, member_weights_of, resample

__all__ = ["linearized_predictive"]

# The guides of Laplace members (see laplace_members' structures).
GUIDES = (AutoMultivariateNormal, AutoDiagonalNormal, AutoLowRankPrecisionNormal)


def _natural_normal(raw):
    return {"loc": raw["loc"], "log_scale": jnp.log(raw["scale"])}


def _natural_logits(raw):
    return {"logits": raw["logits"]}


# family -> (its parameters, as FAMILIES names them, to the unconstrained ones that are
# linearized; those back to the family that draws the value)
NATURAL = {
    "Normal": (_natural_normal, lambda p: dist.Normal(p["loc"], jnp.exp(p["log_scale"]))),
    "BernoulliLogits": (_natural_logits, lambda p: dist.BernoulliLogits(p["logits"])),
    "BernoulliProbs": (
        lambda raw: {"logits": jax.scipy.special.logit(raw["probs"])},
        lambda p: dist.BernoulliLogits(p["logits"]),
    ),
    "CategoricalLogits": (_natural_logits, lambda p: dist.CategoricalLogits(p["logits"])),
    "CategoricalProbs": (
        lambda raw: {"logits": jnp.log(raw["probs"])},
        lambda p: dist.CategoricalLogits(p["logits"]),
    ),
    "Poisson": (
        lambda raw: {"log_rate": jnp.log(raw["rate"])},
        lambda p: dist.Poisson(jnp.exp(p["log_rate"])),
    ),
}


class OutputSite(NamedTuple):
    """A site of the model run on the predictive's inputs."""

    name: str
    kind: str
    """``"latent"`` (in the guide's latent vector), ``"deterministic"`` or ``"observed"``
    (every other sample site: drawn from its family)."""
    family: str | None
    """The observed site's family (see :data:`FAMILIES`), None if unsupported or not observed."""
    distribution: str
    """The observed site's distribution under its wrappers, for errors."""
    linear: bool
    """Whether the site is computed by the linear model: deterministic sites of a
    floating type and observed sites (an integer deterministic site is computed at each
    draw, as the model gives it)."""


def base_distribution(fn):
    """The distribution under ``Independent`` / ``expand`` / ``mask``."""
    while isinstance(fn, (Independent, ExpandedDistribution, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def constrain(guide, z) -> dict:
    """``{latent site: value}`` of an ``AutoContinuous`` guide's latent vector ``z``
    (set up), constrained to each site's support as the guide's draws are."""
    unpacked = guide._unpack_latent(z)
    prototype = guide.prototype_trace
    return {name: biject_to(prototype[name]["fn"].support)(v) for name, v in unpacked.items()}


def linearized_params(fn, shape: tuple) -> dict:
    """An observed site's family parameters where they are unconstrained (see
    :data:`NATURAL`), each broadcast to the site's value ``shape`` (and classes)."""
    name = family(fn)
    base = base_distribution(fn)
    raw = {param: getattr(base, param) for param in FAMILIES[name][1]}
    natural = NATURAL[name][0](raw)
    categorical = name.startswith("Categorical")
    return {
        param: jnp.broadcast_to(v, shape + jnp.shape(v)[-1:] if categorical else shape)
        for param, v in natural.items()
    }


def _model_trace(laplace, z, own, key, args, kwargs):
    """The model's trace with the latent sites at ``T(z)`` and the model's params at
    ``own`` (observed sites absent from the inputs are drawn with ``key``)."""
    data = {**own, **constrain(laplace.guide, z)}
    model = seed(substitute(laplace.model, data=data), key)
    return trace(model).get_trace(*args, **kwargs, **laplace.static_kwargs)


def output_sites(laplace, params, own, args, kwargs) -> dict[str, OutputSite]:
    """The sites of the model run at member 0's point on ``args`` / ``kwargs``, by
    tracing abstractly (``jax.eval_shape``: nothing runs, nothing compiles)."""
    latents = set(laplace.guide._init_locs)
    prefix = laplace.guide.prefix
    args, kwargs = member_args(args, kwargs, 0)
    found = {}

    def sites(params, own, args, kwargs):
        z = params[f"{prefix}_loc"][0]
        member_own = jax.tree.map(lambda leaf: leaf[0], own)
        model_trace = _model_trace(laplace, z, member_own, random.key(0), args, kwargs)
        for name, site in model_trace.items():
            if site["type"] == "deterministic":
                floating = jnp.issubdtype(jnp.result_type(site["value"]), jnp.inexact)
                found[name] = OutputSite(name, "deterministic", None, "", floating)
            elif site["type"] == "sample" and name in latents:
                found[name] = OutputSite(name, "latent", None, "", False)
            elif site["type"] == "sample" and not isinstance(base_distribution(site["fn"]), Unit):
                base = type(base_distribution(site["fn"])).__name__
                found[name] = OutputSite(name, "observed", family(site["fn"]), base, True)

    with validation_enabled(False):
        jax.eval_shape(sites, params, own, args, kwargs)
    return found


def _chosen(sites: dict, return_sites) -> tuple[OutputSite, ...]:
    """The sites to return: by default the observed and deterministic ones (NumPyro's
    ``Predictive``'s choice), checked: names of the model's sites, observed ones of a
    supported family."""
    if return_sites is None:
        chosen = [s for s in sites.values() if s.kind != "latent"]
    else:
        if isinstance(return_sites, str):
            raise TypeError(
                f"linearized_predictive: return_sites must be a sequence of site names, "
                f"got the string {return_sites!r} (write [{return_sites!r}])."
            )
        names = list(return_sites)
        unknown = [n for n in names if n not in sites]
        if unknown:
            raise ValueError(
                f"linearized_predictive: return_sites {unknown} are not sample or "
                f"deterministic sites of the model on these inputs; its sites are "
                f"{list(sites)}."
            )
        chosen = [sites[n] for n in dict.fromkeys(names)]
    unsupported = [s for s in chosen if s.kind == "observed" and s.family is None]
    if unsupported:
        found = ", ".join(f"{s.name!r} ({s.distribution})" for s in unsupported)
        raise ValueError(
            f"linearized_predictive: observed sites {found} are of a family it cannot "
            f"linearize; it knows Normal, Bernoulli, Categorical and Poisson (under "
            f"Independent, expand and mask). Leave them out with return_sites, or use "
            f"ensemble_predictive."
        )
    return tuple(chosen)


def _check_laplace(laplace, params):
    """``(laplace, params)`` are Laplace members, as ``laplace_members`` returned them."""
    check_params(laplace, params)
    if isinstance(laplace.guide, GUIDES) and is_laplace(laplace, params):
        return
    got = type(laplace.guide).__name__
    if getattr(laplace, "_laplace_loc", None) is not None:
        why = (
            "these params are not the laplace_params that laplace_members returned with "
            "this ensemble (e.g. params of a fit started from them)"
        )
    else:
        why = f"this ensemble's guide is {got}, not the guide of Laplace members"
    raise ValueError(
        f"linearized_predictive needs Laplace members: {why}. Pass what "
        f"laplace_members returns: laplace, laplace_params = laplace_members(ensemble, "
        f"params, *data), then linearized_predictive(laplace, rng_key, laplace_params, "
        f"x_new)."
    )


def linearized_predictive(
    laplace,
    rng_key: PRNGKeyArray,
    laplace_params: dict,
    *args,
    num_samples: int = 100,
    weights=None,
    return_sites: Sequence[str] | None = None,
    **kwargs,
) -> dict[str, Array]:
    """
    The linearized (GLM) posterior predictive of Laplace members (see
    :mod:`numpyro_ensemble.use.linearized`): each member's model linearized at its
    point, its draws from the member's Gaussian.

    Draw ``[e, s]`` of every returned site comes from latent draw ``[e, s]`` of member
    ``e``: deterministic sites and the observed sites' distribution parameters are the
    linear model's at that draw, an observed site's value a draw from its family with
    those parameters (always drawn, also where ``args`` / ``kwargs`` hold
    observations: then a posterior predictive of that data), a latent site the draw
    itself, constrained. Members draw with their own keys, from ``rng_key``: the same
    key gives the same draws.
    Members without a Laplace approximation (NaN params) give NaN draws (integer
    sites: the first usable member's); the others are unaffected.

    **Example** (a network's predictive band at new inputs)::

        ens = EnsembleMAP(net, ensemble_size=8)
        result = ens.run(random.key(0), 1000, x, y)
        laplace, laplace_params = laplace_members(ens, result.params, x, y, curvature="ggn")
        draws = linearized_predictive(laplace, random.key(1), laplace_params, x_new,
                                      num_samples=200)
        band = jnp.quantile(draws["y"].reshape(-1, x_new.shape[0]), jnp.array([0.025, 0.975]), 0)

    :param laplace: the ensemble that :func:`~numpyro_ensemble.laplace_members` returned
        (or an ``AutoLaplaceApproximation`` ensemble: then NumPyro's Hessians, as in
        :func:`~numpyro_ensemble.ensemble_predictive`).
    :param jax.random.key rng_key: random number generator seed.
    :param dict laplace_params: the params that :func:`~numpyro_ensemble.laplace_members`
        returned with it.
    :param args: arguments to the model, e.g. new inputs ``x_new``.
    :param int num_samples: draws per member, ``S``.
    :param weights: member weights (an ``(E,)`` array, or the result of
        :func:`~numpyro_ensemble.importance_weights` /
        :func:`~numpyro_ensemble.stacking_weights`, of which the member weights are
        used: importance weights' per-draw weights are those of the draws pushed
        through the model, not of the linear model's): the predictive of the weighted
        mixture of the members, ``E * S`` draws resampled from the members' in
        proportion to the weights.
    :param return_sites: names of the sites to return; by default the observed and
        deterministic sites (as :class:`numpyro.infer.Predictive`). Latent sites may be
        named.
    :param kwargs: keyword arguments to the model.
    :return: ``{site name: array of shape (E, S, *site_shape)}``; with ``weights``,
        ``(E * S, *site_shape)``.
    :raises ValueError: for params that are not Laplace members, for unknown
        ``return_sites``, or for an observed site to return of a family the
        linearization does not know (naming the site and its distribution).
    """
    check_ensemble(laplace, "linearized_predictive")
    check_key(rng_key)
    num_samples = check_positive_int(num_samples, "num_samples")
    laplace, laplace_params = resolve_laplace(
        laplace, laplace_params, args, kwargs, with_data=False
    )
    _check_laplace(laplace, laplace_params)
    E = laplace.ensemble_size
    if weights is not None:
        if has_per_member((args, kwargs)):
            raise ValueError(
                "linearized_predictive: weights pool the members' draws, but the data "
                "differ between members (per_member); predict each data set separately."
            )
        member_weights = member_weights_of(weights, E)
    draw_key, resample_key = random.split(rng_key)
    safe, finite = usable_params(laplace_params, "linearized_predictive")
    own = model_params(laplace, safe, args, kwargs)
    split = laplace._split(args, kwargs)
    sites = _chosen(output_sites(laplace, safe, own, args, kwargs), return_sites)
    keys = random.split(draw_key, E)
    with validation_enabled(False):  # NumPyro's checks of constants run op by op as it traces
        draws = apply_members_jitted(
            laplace, ("linearized", num_samples, sites),
            lambda: _member(laplace, split, num_samples, sites), (safe, own, keys), split,
        )
    draws = blank(draws, finite)
    if weights is None:
        return draws
    log_weights = draw_log_weights(member_weights, E, num_samples)
    return resample(resample_key, draws, log_weights, E * num_samples)


def _member(laplace, split, num_samples, sites):
    """One jitted pass over the members: ``num_samples`` draws of the ``sites`` of the
    model linearized at each member's point."""
    guide = laplace.guide
    prefix = guide.prefix
    linear = [s for s in sites if s.linear]
    exact = [s.name for s in sites if s.kind == "deterministic" and not s.linear]
    latent = [s.name for s in sites if s.kind == "latent"]

    def member(m, args, kwargs):
        member_params, own, key = m
        draw_key, model_key, value_key = random.split(key, 3)
        u = member_params[f"{prefix}_loc"]
        zs = guide.get_posterior(member_params).sample(draw_key, (num_samples,))

        def run(z):
            return _model_trace(laplace, z, own, model_key, args, kwargs)

        def outputs(z):
            model_trace = run(z)
            found = {}
            for site in linear:
                at = model_trace[site.name]
                if site.kind == "deterministic":
                    found[site.name] = at["value"]
                else:
                    found[site.name] = linearized_params(at["fn"], jnp.shape(at["value"]))
            return found

        result = {}
        if linear:
            at, jvp = jax.linearize(outputs, u)
            moved = jax.vmap(jvp)(zs - u)
            lin = jax.tree.map(lambda a, t: a + t, at, moved)
            for i, site in enumerate(linear):
                if site.kind == "deterministic":
                    result[site.name] = lin[site.name]
                else:
                    drawn = NATURAL[site.family][1](lin[site.name])
                    result[site.name] = drawn.sample(random.fold_in(value_key, i))
        if exact:
            at_draws = jax.vmap(lambda z: {n: run(z)[n]["value"] for n in exact})(zs)
            result.update(at_draws)
        if latent:
            constrained = jax.vmap(lambda z: constrain(guide, z))(zs)
            result.update({name: constrained[name] for name in latent})
        return {s.name: result[s.name] for s in sites}

    return member
