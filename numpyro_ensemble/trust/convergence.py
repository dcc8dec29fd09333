r"""How far each member's loss still is from its optimum: the Newton decrement.

A loss that has stopped falling is not an optimum: on an ill-conditioned posterior
(a regression on unscaled inputs) Adam creeps along a ridge, and the loss changes
by less than its noise per window while the member is many posterior sds away. The
local quadratic model of the loss says how much is left. With :math:`g` the
gradient and :math:`H` the Hessian of member :math:`e`'s loss in its unconstrained
params, a Newton step would lower the loss by

.. math::

    \Delta_e = \tfrac12\, g^\top |H|^{-1} g ,

(:math:`|H|` with the absolute values of :math:`H`'s eigenvalues, so a saddle counts
by its steepness). For a point member (``EnsembleMAP``, ``AutoDelta``) the loss is
deterministic and :math:`\Delta_e` exact for a quadratic loss: a member
:math:`\delta` posterior sds from the mode along the worst direction has
:math:`\Delta_e = \delta^2 / 2`. For a Monte Carlo ELBO, :math:`g` is the mean of
per-draw gradients :math:`g_s` over ``num_particles`` draws of the member's guide
(fixed draws, so :math:`H` is the Hessian of that sample average), and the noise in
:math:`\hat g` is taken out: :math:`\hat\Delta_e = \tfrac12(\hat g^\top A \hat g -
\operatorname{tr}(A \hat C))` with :math:`A = |H|^{-1}` and :math:`\hat C` the
covariance of :math:`\hat g`, with its standard error
:math:`\tfrac12 (4 \hat g^\top A \hat C A \hat g + 2 \operatorname{tr}((A \hat C)^2))^{1/2}`
(a Gaussian :math:`\hat g`). A member has not converged when :math:`\hat\Delta_e`
exceeds both ``tolerance`` and twice its standard error.

Computed on the full data with each member's own loss (its hyperparameters, its
per-member data), one jitted pass; skipped (NaN) where the model subsamples a plate
(a mini-batch loss) or a member has more than :data:`MAX_PARAMS` params (the
Hessian is :math:`d \times d`). A member whose Hessian is zero (a loss that does not
curve in any direction of its params) has no Newton step: NaN where its gradient is
zero too (nothing to measure), ``inf`` where it is not (a loss with no optimum in
reach); a non-finite gradient or Hessian gives NaN.
"""

from __future__ import annotations

import jax
from jax import random
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from numpyro_ensemble.engine.members import apply_members_jitted

__all__ = ["newton_decrement"]

# Members with more params than this are not checked (a d x d Hessian per member).
MAX_PARAMS = 200
# Draws of the guide per member for a Monte Carlo ELBO's gradient and Hessian.
NUM_PARTICLES = 64


def newton_decrement(ensemble, rng_key, params, args, kwargs, point: bool):
    """``(decrement, standard_error)``, each ``(E,)`` in nats (NaN where not
    computed; see :mod:`numpyro_ensemble.trust.convergence`). ``point``: every latent site
    is a point of the guide, so the loss is deterministic (one evaluation)."""
    E = ensemble.ensemble_size
    missing = np.full(E, np.nan), np.full(E, np.nan)
    split = ensemble._split(args, kwargs)
    transforms = getattr(ensemble.constrain_fn, "args", (None,))[0]
    if ensemble._inspect(split).plates or not isinstance(transforms, dict):
        return missing
    dim = sum(int(np.prod(np.shape(v)[1:])) for v in jax.tree.leaves(params))
    if dim > MAX_PARAMS:
        return missing
    unconstrained = {
        name: transforms[name].inv(value) if name in transforms else value
        for name, value in params.items()
    }
    particles = 1 if point else NUM_PARTICLES
    keys = random.split(rng_key, E)
    found = apply_members_jitted(
        ensemble, ("newton", particles), lambda: _member(ensemble, particles),
        (unconstrained, ensemble._hyperparams, keys), split,
    )
    return _decrement(*found)


def _member(ensemble, particles):
    def member(m, args, kwargs):
        unconstrained, hyperparams, key = m
        svi = ensemble._member(hyperparams=hyperparams)
        flat, unravel = ravel_pytree(unconstrained)

        def loss(f, k):
            return svi.loss.loss(
                k, svi.constrain_fn(unravel(f)), svi.model, svi.guide,
                *args, **kwargs, **svi.static_kwargs,
            )

        # One draw and one direction at a time (scans), not vmapped: XLA:CPU was seen
        # to hang, using no CPU, running a GP's Cholesky batched over draws x members
        # (posteriordb's GP regression) and over directions x members (its Poisson GP
        # with AutoMultivariateNormal members, 104 params: 832 at once). The
        # Hessian's columns are the gradient's derivatives along each axis (as
        # jax.hessian), and their primal is the gradient: one program for both.
        def one(carry, k):
            def column(direction):
                return jax.jvp(lambda f: jax.grad(loss)(f, k), (flat,), (direction,))

            grads, hessian = jax.lax.map(column, jnp.eye(flat.size, dtype=flat.dtype))
            return carry + hessian, grads[0]

        zero = jnp.zeros((flat.size, flat.size), flat.dtype)
        hessian, grads = jax.lax.scan(one, zero, random.split(key, particles))
        return _moments(grads, hessian / particles)

    return member


def _moments(grads, hessian):
    """The mean gradient, its covariance (of the mean, from the per-draw gradients
    ``(S, d)``) and the symmetrised Hessian ``(d, d)``."""
    num = grads.shape[0]
    g = grads.mean(axis=0)
    centred = grads - g
    covariance = centred.T @ centred / max(num - 1, 1) / num
    return g, covariance, 0.5 * (hessian + hessian.T)


def _decrement(g, covariance, hessian):
    """The noise-corrected Newton decrement and its standard error per member (see the
    module's docstring), in float64 NumPy: ``g`` ``(E, d)``, the others ``(E, d, d)``.
    (On the host: small matrices, and no batched LAPACK calls in the program.)"""
    g, covariance, hessian = (np.asarray(v, np.float64) for v in (g, covariance, hessian))
    decrement, error = np.full(g.shape[0], np.nan), np.full(g.shape[0], np.nan)
    for e in range(g.shape[0]):
        if not (np.isfinite(hessian[e]).all() and np.isfinite(g[e]).all()):
            continue
        eigenvalues, vectors = np.linalg.eigh(hessian[e])
        magnitude = np.abs(eigenvalues)
        largest = magnitude.max(initial=0.0)
        if not largest > 0:  # no curvature: no Newton step (see the module's docstring)
            if (g[e] != 0).any():
                decrement[e], error[e] = np.inf, 0.0
            continue
        floor = np.finfo(np.float32).eps * largest
        # (a curvature near float64's smallest can overflow: inf, or NaN, is the finding)
        with np.errstate(over="ignore", invalid="ignore"):
            inverse = (vectors / np.maximum(magnitude, floor)) @ vectors.T  # |H|^-1
            ac = inverse @ covariance[e]
            decrement[e] = 0.5 * (g[e] @ inverse @ g[e] - np.trace(ac))
            variance = 4.0 * g[e] @ ac @ inverse @ g[e] + 2.0 * np.trace(ac @ ac)
            error[e] = 0.5 * np.sqrt(max(variance, 0.0))
    return decrement, error
