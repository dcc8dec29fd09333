r"""The curvature of a member's potential energy at its point, for its Laplace
approximation: the exact Hessian or the generalized Gauss-Newton (GGN) matrix, as a
dense matrix, its diagonal, or products with vectors.

With :math:`U(u) = -\log p(y \mid \eta(u)) + R(u)` the potential energy in the
unconstrained space, :math:`\eta(u)` the parameters of the model's likelihood sites'
distributions (e.g. a ``Normal``'s ``loc`` and ``scale``) and
:math:`R(u) = -\log p(T(u)) - \log |\det J_T(u)|` the rest (the prior, with the
transform's log-Jacobian), the GGN is

.. math::

    G(u) = J_\eta(u)^\top F(\eta(u))\, J_\eta(u) + \nabla^2_u R(u),

:math:`F` the Fisher information of each likelihood family in its parameters. The
first term is positive semi-definite by construction, where the exact Hessian of a
network's loss is indefinite almost everywhere; the two coincide when :math:`\eta`
is linear in :math:`u` and the family's Fisher is its Hessian (a linear-Gaussian
model). Supported families: ``Normal`` (loc and scale), ``Bernoulli`` and
``Categorical`` (logits or probs) and ``Poisson``, under ``Independent``, ``expand``
and ``mask``; a site's ``scale`` (``numpyro.handlers.scale``) scales its Fisher.

Products :math:`G v` use one linearization of :math:`\eta` (``jax.linearize`` and its
transpose), so Lanczos on them never forms a :math:`D \times D` array; the diagonal of
the first term is exact, from rows of :math:`J_\eta` (one product per likelihood
output) or its columns (one per coordinate), whichever are fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
from jaxtyping import Array, Float
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions.distribution import (
    ExpandedDistribution,
    Independent,
    MaskedDistribution,
)
from numpyro.distributions.transforms import biject_to
from numpyro.handlers import block, substitute, trace
from numpyro.infer.util import potential_energy

__all__: list[str] = []

# family -> (its class, the parameters the GGN differentiates)
FAMILIES = {
    "Normal": (dist.Normal, ("loc", "scale")),
    "BernoulliLogits": (dist.BernoulliLogits, ("logits",)),
    "BernoulliProbs": (dist.BernoulliProbs, ("probs",)),
    "CategoricalLogits": (dist.CategoricalLogits, ("logits",)),
    "CategoricalProbs": (dist.CategoricalProbs, ("probs",)),
    "Poisson": (dist.Poisson, ("rate",)),
}
# Diagonals from columns (one product per coordinate) at most this dimension when the
# diagonal of the prior's Hessian cannot be read from its sites' blocks.
EXACT_DIAGONAL_MAX = 2048
_CHUNK = 32


# The ``infer`` flag of a latent site held at a member's point (observed at it) by a
# Laplace over other sites: part of the prior, not of the likelihood.
HELD = "laplace_held"


def likelihood_sites(prototype_trace) -> list[str]:
    """The observed sample sites of a guide's prototype trace, in trace order (sites
    held at a point, :data:`HELD`, left out)."""
    return [
        name
        for name, site in prototype_trace.items()
        if site["type"] == "sample" and site["is_observed"] and not site["infer"].get(HELD)
    ]


def site_ranges(guide) -> list[tuple[int, int]]:
    """Each latent site's ``(start, stop)`` in an ``AutoContinuous`` guide's latent
    vector (set up), from the shapes of its unconstrained initial values (no array
    operation)."""
    ranges, start = [], 0
    for value in guide._init_locs.values():
        stop = start + int(np.prod(np.shape(value), dtype=int))
        ranges.append((start, stop))
        start = stop
    return ranges


def _unwrap(fn):
    """The family under ``Independent`` / ``expand`` / ``mask``, and the mask."""
    mask = True
    while True:
        if isinstance(fn, (Independent, ExpandedDistribution)):
            fn = fn.base_dist
        elif isinstance(fn, MaskedDistribution):
            mask = jnp.logical_and(mask, fn._mask)
            fn = fn.base_dist
        else:
            return fn, mask


def family(fn) -> str | None:
    """The name of a supported likelihood family (see :data:`FAMILIES`), or None."""
    base, _ = _unwrap(fn)
    for name, (cls, _) in FAMILIES.items():
        if type(base) is cls:
            return name
    return None


def unsupported_sites(prototype_trace) -> dict[str, str]:
    """``{site: distribution}`` for likelihood sites the GGN cannot take."""
    found = {}
    for name in likelihood_sites(prototype_trace):
        fn = prototype_trace[name]["fn"]
        if family(fn) is None:
            found[name] = type(_unwrap(fn)[0]).__name__
    return found


def _outputs(site):
    """The site's family parameters, each broadcast to one entry per observation
    (and class), with the Fisher weight multiplying each (mask and scale)."""
    base, mask = _unwrap(site["fn"])
    name = family(site["fn"])
    shape = jnp.shape(site["value"])
    weight = jnp.ones(shape) if site["scale"] is None else jnp.broadcast_to(site["scale"], shape)
    mask = jnp.asarray(mask)
    mask = jnp.reshape(mask, mask.shape + (1,) * (len(shape) - mask.ndim))
    weight = jnp.where(mask, weight, 0.0)
    params = {}
    for param in FAMILIES[name][1]:
        value = getattr(base, param)
        full = shape + jnp.shape(value)[-1:] if name.startswith("Categorical") else shape
        params[param] = jnp.broadcast_to(value, full)
    return name, params, weight


def _fisher_product(name, at, weight, v):
    """``F v`` for one site's parameters: ``at`` their values, ``v`` a tangent."""
    if name == "Normal":
        precision = weight / at["scale"] ** 2
        return {"loc": precision * v["loc"], "scale": 2.0 * precision * v["scale"]}
    if name == "BernoulliLogits":
        p = jax.nn.sigmoid(at["logits"])
        return {"logits": weight * p * (1 - p) * v["logits"]}
    if name == "BernoulliProbs":
        p = at["probs"]
        return {"probs": weight * v["probs"] / (p * (1 - p))}
    if name == "CategoricalLogits":
        p = jax.nn.softmax(at["logits"], axis=-1)
        pv = p * v["logits"]
        return {"logits": weight[..., None] * (pv - p * jnp.sum(pv, -1, keepdims=True))}
    if name == "CategoricalProbs":
        return {"probs": weight[..., None] * v["probs"] / at["probs"]}
    return {"rate": weight * v["rate"] / at["rate"]}  # Poisson


class Potential:
    """The pieces of one member's potential energy over its unconstrained latent
    vector ``z``: the whole (``__call__``), the prior part :math:`R` and the
    likelihood parameters :math:`\\eta`.

    :param model: the model, with the member's own params substituted.
    :param unpack: the guide's ``_unpack_latent`` (``z`` to ``{site: unconstrained}``).
    :param observed: the likelihood sites (:func:`likelihood_sites`).
    """

    def __init__(self, model, args, kwargs, unpack: Callable, observed):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.unpack, self.observed = unpack, tuple(observed)

    def __call__(self, z):
        return potential_energy(self.model, self.args, self.kwargs, self.unpack(z))

    def prior(self, z):
        hidden = block(self.model, hide=list(self.observed))
        return potential_energy(hidden, self.args, self.kwargs, self.unpack(z))

    def likelihood_params(self, z) -> dict:
        unconstrained = self.unpack(z)

        def constrained(site):
            if site["type"] == "sample" and site["name"] in unconstrained:
                return biject_to(site["fn"].support)(unconstrained[site["name"]])
            return None

        model = substitute(self.model, substitute_fn=constrained)
        sites = trace(model).get_trace(*self.args, **self.kwargs)
        return {name: _outputs(sites[name]) for name in self.observed}


class LinearizedLikelihood(NamedTuple):
    r"""The likelihood's parameters :math:`\eta` linearized at one point."""

    jvp: Callable
    """``v -> J v`` (a dict of the sites' family parameters)."""
    vjp: Callable
    """``t -> (J^T t,)``."""
    fisher: Callable
    """``t -> F t`` at the point, for ``t`` shaped as ``jvp``'s output."""
    at: dict
    """The parameters at the point."""
    families: dict
    """``{site: family}`` (see :data:`FAMILIES`)."""

    def matvec(self, v):
        r""":math:`J^\top F J v`."""
        (g,) = self.vjp(self.fisher(self.jvp(v)))
        return g

    def quadratic(self, v):
        r""":math:`v^\top J^\top F J v`."""
        t = self.jvp(v)
        return sum(
            jnp.vdot(a, b)
            for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(self.fisher(t)), strict=True)
        )


def linearize_likelihood(potential: Potential, z) -> LinearizedLikelihood:
    """The likelihood's parameters at ``z`` and their linearization (one
    ``jax.linearize``; the transpose gives ``J^T``)."""
    found = potential.likelihood_params(z)
    families = {site: name for site, (name, _, _) in found.items()}
    weights = jax.lax.stop_gradient({site: w for site, (_, _, w) in found.items()})

    def params_of(z):
        return {site: p for site, (_, p, _) in potential.likelihood_params(z).items()}

    at, jvp = jax.linearize(params_of, z)
    at = jax.lax.stop_gradient(at)
    vjp = jax.linear_transpose(jvp, z)

    def fisher(t):
        return {
            site: _fisher_product(families[site], at[site], weights[site], t[site]) for site in t
        }

    return LinearizedLikelihood(jvp, vjp, fisher, at, families)


def dense_ggn(potential: Potential, z) -> Float[Array, "D D"]:
    r""":math:`J^\top F J + \nabla^2 R` at ``z``, dense (small ``D``)."""
    lin = linearize_likelihood(potential, z)
    eye = jnp.eye(z.shape[0], dtype=z.dtype)
    t = jax.vmap(lin.jvp)(eye)
    ft = jax.vmap(lin.fisher)(t)
    ggn = sum(
        a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T
        for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(ft), strict=True)
    )
    return ggn + jax.hessian(potential.prior)(z)


def _by_columns(fn, dim: int, dtype) -> Float[Array, " D"]:
    """``[fn(e_0), ..., fn(e_{D-1})]`` in chunks of basis vectors."""
    chunks = -(-dim // _CHUNK)
    index = jnp.arange(chunks * _CHUNK).reshape(chunks, _CHUNK)

    def chunk(idx):
        basis = jax.nn.one_hot(jnp.minimum(idx, dim - 1), dim, dtype=dtype)
        return jax.vmap(fn)(basis)

    return jax.lax.map(chunk, index).reshape(-1)[:dim]


def ggn_likelihood_diagonal(potential: Potential, z) -> Float[Array, " D"]:
    r"""The exact diagonal of :math:`J^\top F J` at ``z``: from ``J``'s rows when the
    outputs are fewer than ``D`` and every family's Fisher is diagonal, else from its
    columns."""
    lin = linearize_likelihood(potential, z)
    flat_at, unravel = ravel_pytree(lin.at)
    dim, outputs = z.shape[0], flat_at.shape[0]
    categorical = any(name == "CategoricalLogits" for name in lin.families.values())
    if categorical or outputs >= dim:
        return _by_columns(lin.quadratic, dim, z.dtype)
    # F is diagonal: its entries are F applied to the ones vector
    flat_f, _ = ravel_pytree(lin.fisher(unravel(jnp.ones_like(flat_at))))
    chunks = -(-outputs // _CHUNK)
    index = jnp.arange(chunks * _CHUNK).reshape(chunks, _CHUNK)

    def chunk(total, idx):
        cot = jax.nn.one_hot(idx, outputs, dtype=flat_at.dtype)  # zero rows past the end
        rows = jax.vmap(lambda c: lin.vjp(unravel(c))[0])(cot)
        f = jnp.where(idx < outputs, flat_f[jnp.minimum(idx, outputs - 1)], 0.0)
        return total + jnp.sum(f[:, None] * rows**2, axis=0), None

    total, _ = jax.lax.scan(chunk, jnp.zeros_like(z), index)
    return total


def _hvp(fn, z):
    grad = jax.grad(fn)
    return lambda v: jax.jvp(grad, (z,), (v,))[1]


def prior_diagonal(potential: Potential, z, site_ranges):
    r"""The diagonal of :math:`\nabla^2 R` at ``z`` and whether it is exact.

    Up to :data:`EXACT_DIAGONAL_MAX` coordinates from the Hessian's columns (exact);
    beyond, from each latent site's own block applied to the ones vector, which is
    its diagonal when the block is diagonal (the site's entries independent given the
    other sites, as a network's weights under a ``Normal`` prior are) -- checked on a
    pseudo-random probe: the flag is False where a block is not diagonal.
    ``site_ranges``: each latent site's ``(start, stop)`` in ``z``."""
    hvp = _hvp(potential.prior, z)
    dim = z.shape[0]
    if dim <= EXACT_DIAGONAL_MAX:
        return _by_columns(lambda e: jnp.vdot(e, hvp(e)), dim, z.dtype), jnp.array(True)
    index = jnp.arange(dim)
    site_masks = [((index >= a) & (index < b)).astype(z.dtype) for a, b in site_ranges]

    def blocks(v):  # sum over sites of the site's block applied to v on the site
        return sum(m * hvp(m * v) for m in site_masks)

    diagonal = blocks(jnp.ones_like(z))
    probe = jax.random.normal(jax.random.key(0), z.shape, z.dtype)
    got, want = blocks(probe), diagonal * probe
    scale = jnp.max(jnp.abs(want)) + jnp.finfo(z.dtype).tiny
    exact = jnp.max(jnp.abs(got - want)) <= 1e-4 * scale
    return diagonal, exact


def hessian_diagonal(potential: Potential, z) -> Float[Array, " D"]:
    """The exact diagonal of the potential energy's Hessian, from its columns."""
    hvp = _hvp(potential, z)
    return _by_columns(lambda e: jnp.vdot(e, hvp(e)), z.shape[0], z.dtype)
