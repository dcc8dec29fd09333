r"""The top eigenpairs of a symmetric positive semi-definite operator, by Lanczos.

For a low-rank Laplace approximation the curvature :math:`G` (``D x D``) is known
only through products :math:`v \mapsto G v`. :func:`top_eigenpairs` runs
:math:`m` Lanczos steps from a fixed start, with full reorthogonalization (each new
direction made orthogonal to all earlier ones, twice, so the basis stays orthogonal in
floating point), and returns the Ritz pairs of the tridiagonal matrix
:math:`T = Q^\top G Q` with the :math:`k` largest values. It holds the basis,
:math:`(m + 1) \times D`, never a :math:`D \times D` array. A breakdown (an invariant
subspace found before :math:`m` steps, as for an operator of rank below :math:`m`)
restarts from a new direction orthogonal to the basis, so the result stays finite.
Written with ``jax.lax`` (no JAX library of Lanczos is installable here), so it
runs under ``jit`` and ``vmap`` (one operator per member).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__: list[str] = []


def default_iterations(dim: int, k: int) -> int:
    """``min(D, 2k + 20)`` Lanczos steps: enough for the top ``k`` pairs of a
    curvature whose spectrum decays, as a network's does."""
    return min(dim, 2 * k + 20)


def _orthogonalize(w, basis, active):
    """``w`` minus its projection on the active rows of ``basis``, twice."""
    for _ in range(2):
        w = w - basis.T @ (active * (basis @ w))
    return w


def top_eigenpairs(
    matvec: Callable[[Float[Array, " D"]], Float[Array, " D"]],
    dim: int,
    k: int,
    *,
    num_iterations: int | None = None,
    dtype=None,
    start: Float[Array, " D"] | None = None,
) -> tuple[Float[Array, " k"], Float[Array, "D k"]]:
    """
    The ``k`` largest eigenvalues of a symmetric operator and their eigenvectors.

    :param matvec: ``v -> G v`` for a symmetric ``G`` of size ``dim``.
    :param int dim: the operator's size ``D``.
    :param int k: how many pairs, ``1 <= k <= dim``.
    :param int num_iterations: Lanczos steps ``m``, ``k <= m <= dim``; by default
        :func:`default_iterations`.
    :param dtype: the floating type; by default ``start``'s, else JAX's default.
    :param start: the first direction (normalized here); by default a fixed
        pseudo-random one, so the result is deterministic.
    :return: ``(eigenvalues, eigenvectors)``: ``(k,)`` in decreasing order and
        ``(D, k)`` with orthonormal columns.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"top_eigenpairs: k must be in [1, dim={dim}], got {k}.")
    m = default_iterations(dim, k) if num_iterations is None else int(num_iterations)
    if not k <= m <= dim:
        raise ValueError(f"top_eigenpairs: num_iterations must be in [k={k}, dim={dim}], got {m}.")
    if dtype is None:
        dtype = start.dtype if start is not None else jnp.zeros(()).dtype
    if start is None:
        start = jax.random.normal(jax.random.key(0), (dim,), dtype)
    start = jnp.asarray(start, dtype)
    tiny = jnp.finfo(dtype).eps

    def fresh(j, basis, active):  # a unit direction orthogonal to the basis
        v = jax.random.normal(jax.random.fold_in(jax.random.key(1), j), (dim,), dtype)
        v = _orthogonalize(v, basis, active)
        return v / jnp.linalg.norm(v)

    basis = jnp.zeros((m + 1, dim), dtype).at[0].set(start / jnp.linalg.norm(start))

    def step(j, carry):
        basis, alphas, betas, scale = carry
        active = (jnp.arange(m + 1) <= j).astype(dtype)
        q = basis[j]
        w = matvec(q)
        alpha = jnp.vdot(q, w)
        w = _orthogonalize(w, basis, active)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        broke = beta <= 1e3 * tiny * scale
        nxt = jnp.where(broke, fresh(j, basis, active), w / jnp.where(broke, 1.0, beta))
        return (
            basis.at[j + 1].set(nxt),
            alphas.at[j].set(alpha),
            betas.at[j].set(jnp.where(broke, 0.0, beta)),
            scale,
        )

    init = (basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.zeros((), dtype))
    basis, alphas, betas, _ = lax.fori_loop(0, m, step, init)
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    values, vectors = jnp.linalg.eigh(tridiagonal)
    top = jnp.arange(m - 1, m - 1 - k, -1)
    return values[top], basis[:m].T @ vectors[:, top]
