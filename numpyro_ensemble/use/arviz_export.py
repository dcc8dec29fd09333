"""Export a fitted ensemble to ArviZ: members as chains, draws per member as draws."""

from __future__ import annotations

import jax
from jaxtyping import PRNGKeyArray
import numpy as np
from numpyro.handlers import seed, substitute, trace
from numpyro.infer.svi import SVIRunResult

from numpyro_ensemble.engine.checks import check_key
from numpyro_ensemble.engine.health import finite_members
from numpyro_ensemble.engine.members import has_per_member
from numpyro_ensemble.fit.svi import check_ensemble
from numpyro_ensemble.use import laplace
from numpyro_ensemble.use.fitted import model_params
from numpyro_ensemble.use.posterior import (
    ensemble_predictive,
    pointwise_log_likelihoods,
    sample_posterior,
)
from numpyro_ensemble.use.weights import ImportanceWeights, member_weights_of

__all__ = ["to_arviz"]


def _plate_dims(model_trace) -> dict[str, list[str]]:
    """Dim names of every sample/deterministic site from its plates (NumPyro's own
    names); dims no plate covers get ArviZ's default ``{site}_dim_{i}``."""
    dims = {}
    for name, site in model_trace.items():
        if site["type"] not in ("sample", "deterministic"):
            continue
        shape = np.shape(site["value"])
        event_dim = site["fn"].event_dim if site["type"] == "sample" else 0
        batch_ndim = len(shape) - event_dim
        names = [f"{name}_dim_{i}" for i in range(len(shape))]
        for frame in site.get("cond_indep_stack", ()):
            axis = batch_ndim + frame.dim
            if 0 <= axis < batch_ndim:
                names[axis] = frame.name
        if any(not n.startswith(f"{name}_dim_") for n in names):
            dims[name] = names
    return dims


def _observed_sites(model_trace) -> dict:
    return {
        name: site["value"]
        for name, site in model_trace.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not site["infer"].get("is_auxiliary", False)  # numpyro.factor
    }


def _arviz_major() -> int:
    import arviz

    return int(arviz.__version__.split(".")[0])


def to_arviz(
    ensemble,
    rng_key: PRNGKeyArray,
    result: SVIRunResult | dict,
    *args,
    num_samples: int = 100,
    constant_data: dict | None = None,
    coords: dict | None = None,
    dims: dict | None = None,
    weights=None,
    **kwargs,
):
    """
    Converts a fitted ensemble to the data structure of the installed ArviZ.

    Chain ``e`` is ensemble member ``e``; its draws are ``num_samples`` draws from
    member ``e``'s guide (for an :class:`~numpyro_ensemble.EnsembleMAP`, its point
    repeated). Groups:

    - ``posterior``: the latent sites and the model's deterministic sites;
    - ``posterior_predictive``: the observed sites, drawn given each posterior draw;
    - ``log_likelihood``: pointwise log-likelihood of each observed site at each
      draw (so ``az.loo`` / ``az.waic`` / ``az.compare`` work);
    - ``observed_data``, and ``constant_data`` when given;
    - ``sample_stats``: ``member`` (the member index) and, given a run result,
      ``loss`` (the member's final loss), per chain and draw; with ``weights``,
      ``member_weight`` and, for importance weights, the draws' ``log_weight``.

    Members with non-finite params are left out (with a warning); the ``chain``
    coordinate holds the member index of every chain.

    Dim names come from the model's plates; ``coords`` and ``dims`` work as in
    ``az.from_numpyro`` (``dims`` maps a site name to the names of its dims after
    ``chain, draw``) and take precedence.

    With ArviZ 0.x the result is an ``arviz.InferenceData``; with ArviZ >= 1.0 an
    ``xarray.DataTree``.

    .. note:: The draws of an ``EnsembleMAP`` member are all its one point, so
        importance-sampling diagnostics (``az.loo``, ``az.compare``) have nothing
        to work with: ArviZ 1.x refuses ("All tail values are the same") and
        ArviZ 0.x warns. Use them on SVI ensembles.

    :param ensemble: a fitted :class:`~numpyro_ensemble.EnsembleSVI` or ``EnsembleMAP``.
    :param jax.random.key rng_key: random number generator seed.
    :param result: ``run(...)``'s :data:`~numpyro.infer.svi.SVIRunResult`, or the params.
    :param args: the model's arguments with the observed data (as used for fitting).
    :param int num_samples: draws per member.
    :param dict constant_data: values for the ``constant_data`` group (e.g. inputs).
    :param dict coords: coordinate values by dim name.
    :param dict dims: dim names by site name.
    :param weights: member weights (an ``(E,)`` array, or the result of
        :func:`~numpyro_ensemble.importance_weights` /
        :func:`~numpyro_ensemble.stacking_weights`). For importance weights the
        posterior holds the draws they refer to (``num_samples`` is ignored).
    :param kwargs: the model's keyword arguments.
    """
    check_ensemble(ensemble, "to_arviz")
    check_key(rng_key)
    ensemble, result = laplace.resolve_result(ensemble, result, args, kwargs)
    if has_per_member((args, kwargs)):
        raise ValueError(
            "to_arviz: the data differ between members (per_member), but ArviZ's "
            "observed_data and log_likelihood groups hold one data set; export the "
            "members of each data set separately."
        )
    losses = None
    params = result
    if isinstance(result, SVIRunResult):
        params, losses = result.params, result.losses
    post_key, pred_key = jax.random.split(rng_key)
    E = ensemble.ensemble_size
    model_kwargs = {**kwargs, **ensemble.static_kwargs}
    prior_trace = trace(seed(ensemble.model, 0)).get_trace(*args, **model_kwargs)
    stats = ["member"] + (["loss"] if losses is not None else [])
    stats += ["member_weight"] if weights is not None else []
    stats += ["log_weight"] if isinstance(weights, ImportanceWeights) else []
    all_dims = _check_dims(prior_trace, dims or {}, coords or {}, constant_data or {}, stats)
    member_weights = None if weights is None else member_weights_of(weights, E)
    if isinstance(weights, ImportanceWeights):
        draws = weights.samples
        finite = finite_members(draws)
    else:
        draws = sample_posterior(
            ensemble, post_key, params, *args, num_samples=num_samples, **kwargs
        )
        finite = finite_members(params)
    leaves = jax.tree.leaves(draws)
    S = leaves[0].shape[1] if leaves else num_samples  # no latent sites: S model runs
    kept = np.flatnonzero(finite)

    one_draw = jax.tree.map(lambda v: v[kept[0], 0], draws)
    one_draw |= jax.tree.map(lambda v: v[kept[0]], model_params(ensemble, params, args, kwargs))
    model_trace = trace(substitute(seed(ensemble.model, 0), one_draw)).get_trace(
        *args, **model_kwargs
    )
    observed = _observed_sites(model_trace)
    deterministic = [n for n, s in model_trace.items() if s["type"] == "deterministic"]

    predicted = ensemble_predictive(
        ensemble,
        pred_key,
        params,
        *args,
        posterior_samples=draws,
        num_samples=S,
        resample_observed=True,
        return_sites=list(observed) + deterministic,
        **kwargs,
    )
    posterior = {**draws, **{n: predicted[n] for n in deterministic}}
    posterior_predictive = {n: predicted[n] for n in observed}
    pointwise = pointwise_log_likelihoods(
        ensemble, ensemble.model, params, draws, args, kwargs, ("arviz",)
    )
    pointwise = {
        n: np.broadcast_to(v, (E, S) + np.shape(v)[2:]) for n, v in pointwise.items() if n in observed
    }

    member = np.broadcast_to(np.arange(E)[:, None], (E, S))
    sample_stats = {"member": member}
    if losses is not None:
        sample_stats["loss"] = np.broadcast_to(np.asarray(losses)[:, -1:], (E, S))
    if member_weights is not None:
        sample_stats["member_weight"] = np.broadcast_to(member_weights[:, None], (E, S))
    if isinstance(weights, ImportanceWeights):
        sample_stats["log_weight"] = np.asarray(weights.log_weights)

    groups = {
        "posterior": posterior,
        "posterior_predictive": posterior_predictive,
        "log_likelihood": pointwise,
        "observed_data": observed,
        "sample_stats": sample_stats,
    }
    groups = {
        g: {k: np.asarray(v)[kept] for k, v in data.items()}
        for g, data in groups.items()
        if g != "observed_data"
    } | {"observed_data": {k: np.asarray(v) for k, v in observed.items()}}
    if constant_data:
        groups["constant_data"] = {k: np.asarray(v) for k, v in constant_data.items()}

    return _from_dict(groups, coords={"chain": kept, **(coords or {})}, dims=all_dims)


def _check_dims(model_trace, dims, coords, constant_data, stats) -> dict:
    """The dim names of every exported site (the plates', then ``dims``), with ``dims``
    and ``coords`` checked against the sites' shapes from a prior trace (before drawing)."""
    shapes = {
        name: np.shape(site["value"])
        for name, site in model_trace.items()
        if site["type"] in ("sample", "deterministic")
        and not site.get("infer", {}).get("is_auxiliary", False)
    }
    shapes.update({name: () for name in stats})
    shapes.update({name: np.shape(value) for name, value in constant_data.items()})
    unknown = sorted(set(dims) - set(shapes))
    if unknown:
        raise ValueError(
            f"dims names unknown sites {unknown}; the exported sites are {sorted(shapes)}."
        )
    all_dims = {k: list(v) for k, v in _plate_dims(model_trace).items()}
    for name, names in dims.items():
        if isinstance(names, str):
            raise TypeError(f"dims[{name!r}] must be a list of dim names, got the string {names!r}.")
        if len(names) > len(shapes[name]):
            raise ValueError(
                f"dims[{name!r}] names {len(names)} dims {list(names)}, but the site has "
                f"shape {shapes[name]} after (chain, draw)."
            )
        all_dims[name] = list(names)
    all_dims = {k: v for k, v in all_dims.items() if k in shapes}
    lengths = {}
    for name, names in all_dims.items():
        for dim, size in zip(names, shapes[name], strict=False):
            lengths.setdefault(dim, set()).add(size)
    unused = sorted(set(coords) - set(lengths))
    if unused:
        raise ValueError(
            f"coords names dims {unused} that no site uses; the dims are {sorted(lengths)}."
        )
    for dim, values in coords.items():
        if len(values) not in lengths[dim] or len(lengths[dim]) > 1:
            raise ValueError(
                f"coords[{dim!r}] has {len(values)} values, but dim {dim!r} has length "
                f"{sorted(lengths[dim])}."
            )
    return all_dims


def _from_dict(groups, *, coords, dims):
    import arviz as az

    if _arviz_major() >= 1:
        return az.from_dict(groups, coords=coords, dims=dims)
    return az.from_dict(**groups, coords=coords, dims=dims)
