"""What ``laplace_members``' ``curvature``, ``structure``, ``rank`` and
``prior_precision`` may be, and what ``"auto"`` stands for on a given model: checked
before anything compiles."""

from __future__ import annotations

import numpy as np
from numpyro.distributions import constraints

from numpyro_ensemble.use.curvature import EXACT_DIAGONAL_MAX, likelihood_sites, unsupported_sites

__all__: list[str] = []

CURVATURES = ("auto", "hessian", "ggn")
STRUCTURES = ("auto", "full", "diagonal", "lowrank")
PRIOR_PRECISIONS = ("model", "evidence")
# curvature="auto" takes the GGN above this many latent values (where the model allows)
GGN_ABOVE = 100
# structure="auto" is "full" up to this many latent values, "lowrank" above
FULL_UP_TO = 1000


def _not_ggn(unsupported: dict) -> str:
    """Why the GGN cannot take a model's likelihood: its unsupported sites, or none."""
    if not unsupported:
        return "the model has no observed site"
    found = ", ".join(f"{site!r} ({fn})" for site, fn in unsupported.items())
    return f"the model's observed sites {found} are not"


def check_choices(curvature, structure, rank, prior_precision):
    if curvature not in CURVATURES:
        raise ValueError(
            f"laplace_members: curvature must be one of {CURVATURES}, got {curvature!r}."
        )
    if structure not in STRUCTURES:
        raise ValueError(
            f"laplace_members: structure must be one of {STRUCTURES}, got {structure!r}."
        )
    if prior_precision not in PRIOR_PRECISIONS:
        raise ValueError(
            f"laplace_members: prior_precision must be one of {PRIOR_PRECISIONS}, got "
            f"{prior_precision!r}."
        )
    if prior_precision == "evidence" and curvature == "hessian":
        raise ValueError(
            "laplace_members: prior_precision='evidence' needs curvature='ggn' (the "
            "likelihood's curvature must be positive semi-definite)."
        )
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"laplace_members: rank must be a positive integer, got {rank!r}.")


def resolve_choices(curvature, structure, rank, dim, prototype_trace, prior_precision):
    """The curvature and structure ``"auto"`` stands for, checked against the model
    (``dim`` its number of latent values) before anything compiles."""
    unsupported = unsupported_sites(prototype_trace)
    observed = likelihood_sites(prototype_trace)
    if curvature == "auto":
        ggn_ok = bool(observed) and not unsupported
        large = dim > GGN_ABOVE or structure == "lowrank" or prior_precision == "evidence"
        curvature = "ggn" if ggn_ok and large else "hessian"
    elif curvature == "ggn" and (unsupported or not observed):
        raise ValueError(
            "laplace_members: curvature='ggn' needs likelihood sites of a family it knows "
            f"(Normal, Bernoulli, Categorical, Poisson), but {_not_ggn(unsupported)}. "
            "Use curvature='hessian'."
        )
    if prior_precision == "evidence" and curvature == "hessian":
        raise ValueError(
            "laplace_members: prior_precision='evidence' needs the GGN, whose likelihood "
            f"families are Normal, Bernoulli, Categorical and Poisson; {_not_ggn(unsupported)}."
        )
    if structure == "auto":
        if curvature == "hessian":
            structure = "full" if dim <= EXACT_DIAGONAL_MAX else "diagonal"
        else:
            structure = "full" if dim <= FULL_UP_TO else "lowrank"
    if curvature == "hessian" and structure == "lowrank":
        raise ValueError(
            "laplace_members: structure='lowrank' needs curvature='ggn' (the exact Hessian "
            "of a network's loss is indefinite, so its top eigenpairs make no precision)."
        )
    if curvature == "hessian" and dim > EXACT_DIAGONAL_MAX:
        raise ValueError(
            f"laplace_members: curvature='hessian' takes one Hessian-vector product per "
            f"latent value (here {dim}); above {EXACT_DIAGONAL_MAX} use curvature='ggn' "
            f"with structure='diagonal' or 'lowrank'."
        )
    if structure == "lowrank" and rank >= dim:
        raise ValueError(
            f"laplace_members: rank must be below the number of latent values ({dim}), "
            f"got {rank}; use structure='full'."
        )
    return curvature, structure


def real_supports(prototype_trace, sites) -> bool:
    """Whether every latent site is unconstrained (its transform the identity)."""
    for name in sites:
        support = prototype_trace[name]["fn"].support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        if support is not constraints.real:
            return False
    return True
