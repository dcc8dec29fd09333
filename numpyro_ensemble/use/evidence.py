r"""The prior precision that maximizes a member's Laplace evidence (marginal likelihood).

With the member's point :math:`u` fixed, a Gaussian prior of precision :math:`P_0`
scaled by :math:`c > 0` and :math:`H` the likelihood's curvature (the GGN's first
term), the Laplace approximation of the log evidence is, up to terms free of
:math:`c`,

.. math::

    \log Z(c) = \tfrac{D}{2} \log c - \tfrac{c}{2} q - \tfrac12 \sum_i \log(\lambda_i + c),
    \qquad q = (u - \mu_0)^\top P_0 (u - \mu_0) = g_0^\top P_0^{-1} g_0,

:math:`\lambda_i \ge 0` the eigenvalues of :math:`H` relative to :math:`P_0`
(:math:`P_0^{-1/2} H P_0^{-1/2}`; zero outside a low-rank curvature's span) and
:math:`g_0` the prior's gradient at :math:`u`. Its derivative vanishes where

.. math::

    \gamma(c) = \sum_i \frac{\lambda_i}{\lambda_i + c} = c\, q,

MacKay's effective number of parameters against the prior's pull: :math:`\gamma`
falls and :math:`c q` rises in :math:`c`, so the root is unique and bisection in
:math:`\log c` finds it (Laplace Redux's post-hoc prior precision, here in closed
form per member instead of by gradient steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__: list[str] = []

# log c is searched in [-LOG_RANGE, LOG_RANGE]
LOG_RANGE = 25.0
BISECTIONS = 80


def optimal_prior_scale(
    eigenvalues: Float[Array, " k"], quadratic: Float[Array, ""]
) -> Float[Array, ""]:
    """The factor :math:`c` of the prior precision that maximizes the Laplace
    evidence, given the likelihood curvature's eigenvalues relative to the prior
    (negative rounding errors clipped to 0) and :math:`q` (see the module); at the
    ends of the searched range where the root lies beyond it."""
    lam = jnp.maximum(eigenvalues, 0.0)

    def excess(log_c):  # gamma(c) - c q: decreasing in c
        c = jnp.exp(log_c)
        return jnp.sum(lam / (lam + c)) - c * quadratic

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = excess(mid) > 0
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    dtype = lam.dtype
    bounds = (jnp.array(-LOG_RANGE, dtype), jnp.array(LOG_RANGE, dtype))
    lo, hi = jax.lax.fori_loop(0, BISECTIONS, halve, bounds)
    return jnp.exp(0.5 * (lo + hi))
