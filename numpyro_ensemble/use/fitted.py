"""What every function that uses a fit checks and reads first: the params are this
ensemble's, the model's own params among them, and whether they are Laplace members.

The lowest module of the layer that uses a fit: the draws (``posterior``), the
Laplace members (``laplace``) and the weights above them all start here.
"""

from __future__ import annotations

import numpy as np

from numpyro_ensemble.engine.checks import check_param_names, check_params_tree
from numpyro_ensemble.engine.inspection import inspect_model

__all__ = ["laplace_exclusions", "laplace_prior_precision"]


def check_params(ensemble, params) -> None:
    """``params`` are a tree with the ensemble's ``(E,)`` axis on every leaf and the
    names of this ensemble's params (with a hint for Laplace members)."""
    check_params_tree(params, ensemble.ensemble_size)
    check_param_names(params, ensemble, hint=params_hint(ensemble))


def model_params(ensemble, params: dict, args, kwargs) -> dict:
    """The members' values of the model's own ``numpyro.param`` sites (e.g. a
    ``flax_module``'s weights), each with its ``(E,)`` axis: whatever runs the model
    after the fit substitutes them, member by member."""
    # inspect_model, not ensemble._inspect: new inputs must not re-key an EnsembleMAP's guide.
    info = inspect_model(ensemble.model, ensemble._split(args, kwargs), ensemble.static_kwargs)
    names = info.params if info.error is None else tuple(params)  # unknown: all of them
    return {name: params[name] for name in names if name in params}


def mark_laplace(twin, loc, excluded: dict | None = None, prior_scale=None) -> None:
    """Remembers ``loc``, the Laplace members' ``{prefix}_loc`` that
    ``laplace_members`` returned with ``twin`` (see :func:`is_laplace`), and why
    members were left without a Laplace approximation (see :func:`laplace_exclusions`)."""
    twin._laplace_loc = loc
    twin._laplace_excluded = dict(excluded or {})
    twin._laplace_prior_scale = None if prior_scale is None else np.asarray(prior_scale)


def laplace_prior_precision(ensemble) -> np.ndarray:
    """The factor ``(E,)`` by which the last ``laplace_members`` call that returned
    ``ensemble`` scaled each member's prior precision: the maximizer of the member's
    Laplace evidence with ``prior_precision="evidence"``, 1 with ``"model"``, NaN
    for a member without a Laplace approximation."""
    scale = getattr(ensemble, "_laplace_prior_scale", None)
    if scale is None:
        raise ValueError(
            "laplace_prior_precision: ensemble is not one that laplace_members returned."
        )
    return scale.copy()


def laplace_exclusions(ensemble) -> dict[int, str]:
    """``{member: why}`` for the members the last ``laplace_members`` call that
    returned ``ensemble`` left without a Laplace approximation (NaN params): e.g.
    a point that is not finite (the member diverged), a curvature that is not
    positive definite, or no mode near the member's point; empty for any other
    ensemble."""
    return dict(getattr(ensemble, "_laplace_excluded", {}))


def is_laplace(ensemble, params: dict) -> bool:
    """Whether ``params`` are the Laplace members that ``laplace_members`` returned
    with ``ensemble`` (the very arrays; not params of a fit started from them)."""
    loc = getattr(ensemble, "_laplace_loc", None)
    prefix = getattr(ensemble.guide, "prefix", "auto")
    return loc is not None and params.get(f"{prefix}_loc") is loc


def params_hint(ensemble) -> str:
    """What to pass as params to the ensemble that ``laplace_members`` returned
    (empty for any other ensemble)."""
    if getattr(ensemble, "_laplace_loc", None) is None:
        return ""
    return (
        "these are Laplace members: pass the laplace_params that laplace_members "
        "returned with them (with the points' run result: "
        "result._replace(params=laplace_params))"
    )
