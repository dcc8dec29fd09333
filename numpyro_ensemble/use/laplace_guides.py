r"""A Normal parameterized by a low-rank-plus-diagonal *precision*, and the guide using it.

A low-rank Laplace approximation has the precision (inverse covariance)

.. math::

    P = \mathrm{diag}(d) + W W^\top, \qquad
    P^{-1} = \mathrm{diag}(d)^{-1} - A^\top A, \qquad
    A = L^{-1} W^\top \mathrm{diag}(d)^{-1}, \quad
    L L^\top = C = I_k + W^\top \mathrm{diag}(d)^{-1} W,

with :math:`d > 0` of size :math:`D` and :math:`W` of shape :math:`D \times k`. Its
covariance is a diagonal *minus* a low-rank matrix, which NumPyro's
``LowRankMultivariateNormal`` (covariance low rank *plus* diagonal) cannot hold. Here

.. math::

    \log p(x) = -\tfrac12 \big(D \log 2\pi - \log\det P + r^\top \mathrm{diag}(d)\, r
    + \lVert W^\top r \rVert^2\big), \quad r = x - \mu, \qquad
    \log\det P = \textstyle\sum_i \log d_i + 2 \sum_j \log L_{jj},

and a draw is :math:`x = \mu + P^{-1}(\sqrt{d} \odot \epsilon_1 + W \epsilon_2)` (its
covariance is :math:`P^{-1} P P^{-1} = P^{-1}`, exactly). Everything costs
:math:`O(Dk^2 + k^3)` time and :math:`O(Dk)` memory; only ``covariance_matrix`` and
``precision_matrix`` form :math:`D \times D` arrays (for small :math:`D` only).
"""

from __future__ import annotations

from jax import lax, random
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import Transform
from numpyro.distributions.util import add_diag, lazy_property, promote_shapes, validate_sample
from numpyro.infer.autoguide import AutoContinuous
from numpyro.infer.initialization import init_to_median
from numpyro.util import is_prng_key

__all__ = ["LowRankPrecisionNormal", "AutoLowRankPrecisionNormal"]


def _mv(matrix, vector):
    """``matrix @ vector`` over broadcast batch dims: (..., m, n), (..., n) -> (..., m)."""
    return jnp.matmul(matrix, vector[..., None])[..., 0]


class LowRankPrecisionNormal(dist.Distribution):
    r"""Multivariate Normal :math:`\mathcal N(\mu, (\mathrm{diag}(d) + W W^\top)^{-1})`.

    Leading batch dims of the three parameters broadcast (e.g. one row per member).

    :param loc: the mean :math:`\mu`, shape ``(..., D)``.
    :param prec_factor: the precision's low-rank factor :math:`W`, shape ``(..., D, k)``.
    :param prec_diag: the precision's diagonal :math:`d > 0`, shape ``(..., D)``.
    :param validate_args: whether to check the parameters' constraints.
    """

    arg_constraints = {
        "loc": constraints.real_vector,
        "prec_factor": constraints.independent(constraints.real, 2),
        "prec_diag": constraints.independent(constraints.positive, 1),
    }
    support = constraints.real_vector
    reparametrized_params = ["loc", "prec_factor", "prec_diag"]
    pytree_data_fields = ("loc", "prec_factor", "prec_diag", "_capacitance_tril")

    def __init__(self, loc, prec_factor, prec_diag, *, validate_args=None):
        if jnp.ndim(loc) < 1:
            raise ValueError("`loc` must be at least one-dimensional.")
        event_shape = jnp.shape(loc)[-1:]
        if jnp.ndim(prec_factor) < 2 or jnp.shape(prec_factor)[-2:-1] != event_shape:
            raise ValueError(f"`prec_factor` must be a batch of {event_shape[0]} x k matrices.")
        if jnp.shape(prec_diag)[-1:] != event_shape:
            raise ValueError(f"`prec_diag` must be a batch of vectors of size {event_shape[0]}.")
        loc, W, d = promote_shapes(jnp.expand_dims(loc, -1), prec_factor,
                                   jnp.expand_dims(prec_diag, -1))
        batch_shape = lax.broadcast_shapes(jnp.shape(loc), jnp.shape(W), jnp.shape(d))[:-2]
        self.loc, self.prec_factor, self.prec_diag = loc[..., 0], W, d[..., 0]
        capacitance = add_diag(jnp.matmul(self._Wt_Dinv(), self.prec_factor), 1.0)
        self._capacitance_tril = jnp.linalg.cholesky(capacitance)  # of C, k x k
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    def _Wt_Dinv(self):
        return jnp.swapaxes(self.prec_factor, -1, -2) / self.prec_diag[..., None, :]

    @lazy_property
    def _woodbury_factor(self):
        """:math:`A = L^{-1} W^\\top \\mathrm{diag}(d)^{-1}`, shape ``(..., k, D)``."""
        Wt_Dinv = self._Wt_Dinv()
        tril = jnp.broadcast_to(self._capacitance_tril, Wt_Dinv.shape[:-1] + Wt_Dinv.shape[-2:-1])
        return solve_triangular(tril, Wt_Dinv, lower=True)

    def _solve(self, w):
        """:math:`P^{-1} w` by Woodbury."""
        A = self._woodbury_factor
        return w / self.prec_diag - _mv(jnp.swapaxes(A, -1, -2), _mv(A, w))

    def _log_det_precision(self):
        log_diag = jnp.log(jnp.diagonal(self._capacitance_tril, axis1=-2, axis2=-1))
        return jnp.log(self.prec_diag).sum(-1) + 2.0 * log_diag.sum(-1)

    @property
    def mean(self):
        return jnp.broadcast_to(self.loc, self.batch_shape + self.event_shape)

    @lazy_property
    def variance(self):
        """The diagonal of :math:`P^{-1}`, :math:`1/d - \\sum_j A_{j\\cdot}^2`."""
        raw = 1.0 / self.prec_diag - jnp.square(self._woodbury_factor).sum(-2)
        return jnp.broadcast_to(raw, self.batch_shape + self.event_shape)

    @lazy_property
    def covariance_matrix(self):
        """:math:`P^{-1}`, a dense ``(..., D, D)`` array: for small ``D`` only."""
        A = self._woodbury_factor
        return add_diag(-jnp.matmul(jnp.swapaxes(A, -1, -2), A), 1.0 / self.prec_diag)

    @lazy_property
    def precision_matrix(self):
        """:math:`P`, a dense ``(..., D, D)`` array: for small ``D`` only."""
        W = self.prec_factor
        return add_diag(jnp.matmul(W, jnp.swapaxes(W, -1, -2)), self.prec_diag)

    def sample(self, key, sample_shape=()):
        assert is_prng_key(key)
        key_d, key_w = random.split(key)
        shape = sample_shape + self.batch_shape
        eps_d = random.normal(key_d, shape + self.event_shape)
        eps_w = random.normal(key_w, shape + self.prec_factor.shape[-1:])
        w = jnp.sqrt(self.prec_diag) * eps_d + _mv(self.prec_factor, eps_w)  # ~ N(0, P)
        return self.loc + self._solve(w)

    @validate_sample
    def log_prob(self, value):
        r = value - self.loc
        quad = (self.prec_diag * r**2).sum(-1) + jnp.square(
            jnp.matmul(r[..., None, :], self.prec_factor)[..., 0, :]).sum(-1)
        D = self.event_shape[0]
        return -0.5 * (D * jnp.log(2 * jnp.pi) - self._log_det_precision() + quad)

    def entropy(self):
        D = self.event_shape[0]
        H = 0.5 * (D * (1.0 + jnp.log(2 * jnp.pi)) - self._log_det_precision())
        return jnp.broadcast_to(H, self.batch_shape)

    @classmethod
    def infer_shapes(cls, loc, prec_factor, prec_diag):
        batch_shape = lax.broadcast_shapes(loc[:-1], prec_factor[:-2], prec_diag[:-1])
        return batch_shape, loc[-1:]


def _sqrt_parts(prec_factor, prec_diag):
    """:math:`V = \\mathrm{diag}(d)^{-1/2} W` and the eigenpairs of :math:`V^\\top V`."""
    V = prec_factor / jnp.sqrt(prec_diag)[..., None]
    lam, R = jnp.linalg.eigh(jnp.matmul(jnp.swapaxes(V, -1, -2), V))
    return V, jnp.clip(lam, 0.0), R


def _through(V, R, coef, u):
    """:math:`u + V R\\, \\mathrm{diag}(c)\\, R^\\top V^\\top u`."""
    inner = _mv(jnp.swapaxes(R, -1, -2), _mv(jnp.swapaxes(V, -1, -2), u))
    return u + _mv(V, _mv(R, coef * inner))


class LowRankPrecisionAffine(Transform):
    r"""The affine map :math:`x = \mu + \mathrm{diag}(d)^{-1/2} M \epsilon` that takes
    :math:`\mathcal N(0, I)` to :class:`LowRankPrecisionNormal`, in :math:`O(Dk^2)`.

    With :math:`V = \mathrm{diag}(d)^{-1/2} W` and :math:`V^\top V = R \Lambda R^\top`,
    :math:`M = (I + V V^\top)^{-1/2} = I + V R\, f(\Lambda) R^\top V^\top`,
    :math:`f(\lambda) = -1 / (s (1 + s))`, :math:`s = \sqrt{1 + \lambda}`; its inverse has
    :math:`1 / (1 + s)` in place of :math:`f`. Gradients through ``eigh`` are undefined
    at repeated eigenvalues (e.g. :math:`W = 0`): differentiate the distribution instead.

    :param loc: :math:`\mu`, ``(..., D)``.
    :param prec_factor: :math:`W`, ``(..., D, k)``.
    :param prec_diag: :math:`d`, ``(..., D)``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector

    def __init__(self, loc, prec_factor, prec_diag):
        self.loc, self.prec_factor, self.prec_diag = loc, prec_factor, prec_diag

    def __call__(self, x):
        V, lam, R = _sqrt_parts(self.prec_factor, self.prec_diag)
        s = jnp.sqrt(1.0 + lam)
        return self.loc + _through(V, R, -1.0 / (s * (1.0 + s)), x) / jnp.sqrt(self.prec_diag)

    def _inverse(self, y):
        V, lam, R = _sqrt_parts(self.prec_factor, self.prec_diag)
        u = jnp.sqrt(self.prec_diag) * (y - self.loc)
        return _through(V, R, 1.0 / (1.0 + jnp.sqrt(1.0 + lam)), u)

    def log_abs_det_jacobian(self, x, y, intermediates=None):
        _, lam, _ = _sqrt_parts(self.prec_factor, self.prec_diag)
        value = -0.5 * (jnp.log(self.prec_diag).sum(-1) + jnp.log1p(lam).sum(-1))
        return jnp.broadcast_to(value, jnp.shape(x)[:-1])

    def forward_shape(self, shape):
        return lax.broadcast_shapes(shape, self.loc.shape, self.prec_diag.shape,
                                    self.prec_factor.shape[:-1])

    inverse_shape = forward_shape

    def tree_flatten(self):
        names = ("loc", "prec_factor", "prec_diag")
        return tuple(getattr(self, n) for n in names), (names, {})


class AutoLowRankPrecisionNormal(AutoContinuous):
    r"""An :class:`~numpyro.infer.autoguide.AutoContinuous` guide whose posterior over
    the unconstrained latent vector is :class:`LowRankPrecisionNormal`: the shape of a
    low-rank Laplace approximation, fitted by SVI or set from curvature.

    Params: ``{prefix}_loc`` ``(D,)``; ``{prefix}_prec_factor`` ``(D, rank)``, zeros at
    first; ``{prefix}_prec_diag`` ``(D,)``, positive, ``1 / init_scale**2`` at first.
    ``get_transform`` returns the exact :class:`LowRankPrecisionAffine` (no
    :math:`D \times D` array); ``quantiles`` are the marginal Normals' from ``variance``.

    :param model: a NumPyro model.
    :param str prefix: the prefix of the guide's param names.
    :param init_loc_fn: the per-site initialization of ``{prefix}_loc``.
    :param float init_scale: the initial marginal standard deviation, > 0.
    :param int rank: :math:`k`; by default ``round(sqrt(D))``.
    """

    def __init__(self, model, *, prefix="auto", init_loc_fn=init_to_median, init_scale=0.1,
                 rank=None):
        if init_scale <= 0:
            raise ValueError(f"Expected init_scale > 0. but got {init_scale}")
        if rank is not None and (int(rank) != rank or rank < 1):
            raise ValueError(f"Expected a positive integer rank but got {rank}")
        self._init_scale, self.rank = init_scale, rank
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn)

    def _get_posterior(self, *args, **kwargs):
        rank = int(round(self.latent_dim**0.5)) if self.rank is None else int(self.rank)
        loc = numpyro.param(f"{self.prefix}_loc", self._init_latent)
        prec_factor = numpyro.param(f"{self.prefix}_prec_factor", jnp.zeros((self.latent_dim, rank)))
        prec_diag = numpyro.param(
            f"{self.prefix}_prec_diag", jnp.full(self.latent_dim, self._init_scale**-2.0),
            constraint=constraints.positive)
        return LowRankPrecisionNormal(loc, prec_factor, prec_diag)

    def _params_of(self, params):
        return tuple(params[f"{self.prefix}_{n}"] for n in ("loc", "prec_factor", "prec_diag"))

    def get_base_dist(self):
        return dist.Normal(jnp.zeros(self.latent_dim), 1.0).to_event(1)

    def get_transform(self, params):
        return LowRankPrecisionAffine(*self._params_of(params))

    def get_posterior(self, params):
        """The :class:`LowRankPrecisionNormal` posterior over the unconstrained latents."""
        return LowRankPrecisionNormal(*self._params_of(params))

    def median(self, params):
        return self._unpack_and_constrain(params[f"{self.prefix}_loc"], params)

    def quantiles(self, params, quantiles):
        q = self.get_posterior(params)
        latent = dist.Normal(q.loc, jnp.sqrt(q.variance)).icdf(jnp.asarray(quantiles)[..., None])
        return self._unpack_and_constrain(latent, params)
