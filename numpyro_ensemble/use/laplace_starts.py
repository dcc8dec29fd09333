r"""Variational members started from their Laplace approximation (the Pathfinder idea).

:func:`~numpyro_ensemble.laplace_members` gives every member a Gaussian
:math:`\mathcal{N}(u_e, \Sigma_e)` in the unconstrained space. A variational fit started
there begins at the right place and scale and only corrects the shape:
:func:`laplace_init_params` turns the Laplace members into ``init_params`` for an
ensemble with another Gaussian autoguide, the closest member of that family to
:math:`\mathcal{N}(u_e, \Sigma_e)`:

- ``AutoMultivariateNormal``: :math:`u_e` and the Cholesky factor of :math:`\Sigma_e`
  (exact).
- ``AutoNormal`` / ``AutoDiagonalNormal``: loc :math:`u_e`, scale
  :math:`1 / \sqrt{\operatorname{diag} \Sigma_e^{-1}}`, the mean-field Gaussian that
  minimises :math:`\mathrm{KL}(q \,\|\, \mathcal{N}(u_e, \Sigma_e))` (the variational
  optimum for a Gaussian posterior; the marginal sds would be too wide for it).
- ``AutoLowRankMultivariateNormal`` (covariance
  :math:`S (F F^\top + I) S`, :math:`S = \operatorname{diag}(s)`, ``rank`` columns in
  :math:`F`): probabilistic PCA of the correlation matrix :math:`R_e` of
  :math:`\Sigma_e` -- :math:`s = \alpha\, \mathrm{sd}_e`, :math:`F = V_r
  (\Lambda_r / \alpha^2 - 1)^{1/2}` with :math:`(\Lambda_r, V_r)` the ``rank`` largest
  eigenpairs of :math:`R_e` and :math:`\alpha^2` the mean of the other eigenvalues
  (the smallest one when ``rank`` :math:`\ge D`, which makes it exact). The fitted
  correlation matrix keeps :math:`R_e`'s top ``rank`` eigenpairs.

A member without a Laplace approximation (NaN params, excluded with a warning by
:func:`~numpyro_ensemble.laplace_members`) gets NaN starts: its variational fit is
reported as diverged and weighs nothing, the others are unaffected.
"""

from __future__ import annotations

import numpy as np
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from numpyro_ensemble.fit.svi import check_ensemble

__all__ = ["laplace_init_params"]

GUIDES = (AutoNormal, AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoMultivariateNormal)


def laplace_init_params(laplace, laplace_params: dict, guide) -> dict:
    """
    ``init_params`` that start every member of an ensemble with ``guide`` at its
    Laplace approximation (see :mod:`numpyro_ensemble.use.laplace_starts` for the
    Gaussian each guide family starts at).

    **Example** (MAP points, their Laplace approximations, then mean-field VI started
    there)::

        ens = EnsembleMAP(model, ensemble_size=8)
        laplace, laplace_params = laplace_members(ens, ens.run(random.key(0), 500, x, y).params, x, y)
        guide = AutoNormal(model)
        svi = EnsembleSVI(model, guide, optax.adam(1e-3), Trace_ELBO(), ensemble_size=8)
        result = svi.run(random.key(1), 2000, x, y,
                         init_params=laplace_init_params(laplace, laplace_params, guide))

    :param laplace: the first value :func:`~numpyro_ensemble.laplace_members` returns.
    :param dict laplace_params: the second value it returns (``{prefix}_loc`` ``(E, D)``,
        ``{prefix}_scale_tril`` ``(E, D, D)`` and the model's own params).
    :param guide: the guide of the ensemble to start: an ``AutoNormal``,
        ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal`` or
        ``AutoMultivariateNormal`` of the same model (its ``prefix`` and ``rank`` are
        used).
    :return: a dict of per-member values with a leading ``(E,)`` axis, for ``init``
        / ``run``'s ``init_params``; the model's own ``numpyro.param`` values are
        passed through.
    """
    check_ensemble(laplace, "laplace_init_params")
    twin = laplace.guide
    if not isinstance(twin, AutoMultivariateNormal) or twin.prototype_trace is None:
        raise TypeError(
            "laplace_init_params: laplace must be the ensemble laplace_members(..., "
            "structure='full') returned (an AutoMultivariateNormal ensemble, set up), got "
            f"one with {type(twin).__name__}."
        )
    if not isinstance(guide, GUIDES):
        raise TypeError(
            "laplace_init_params: guide must be an AutoNormal, AutoDiagonalNormal, "
            f"AutoLowRankMultivariateNormal or AutoMultivariateNormal, got "
            f"{type(guide).__name__}."
        )
    if guide.model is not laplace.model:
        raise ValueError(
            "laplace_init_params: guide is of another model than the Laplace members' "
            "(pass a guide built from the same model function)."
        )
    names = (f"{twin.prefix}_loc", f"{twin.prefix}_scale_tril")
    missing = [name for name in names if name not in laplace_params]
    if missing:
        raise ValueError(
            f"laplace_init_params: laplace_params lacks {missing}; pass the params "
            f"laplace_members returned."
        )
    loc = np.asarray(laplace_params[names[0]], dtype=np.float64)
    scale_tril = np.asarray(laplace_params[names[1]], dtype=np.float64)
    dtype = np.asarray(laplace_params[names[0]]).dtype
    own = {k: v for k, v in laplace_params.items() if k not in names}
    start = _starts(guide, twin, loc, scale_tril)
    return {**{k: np.asarray(v, dtype=dtype) for k, v in start.items()}, **own}


def _starts(guide, twin, loc, scale_tril) -> dict:
    prefix = guide.prefix
    if isinstance(guide, AutoMultivariateNormal):
        return {f"{prefix}_loc": loc, f"{prefix}_scale_tril": scale_tril}
    if isinstance(guide, AutoLowRankMultivariateNormal):
        cov_factor, scale = _low_rank(scale_tril @ np.swapaxes(scale_tril, -1, -2), guide.rank)
        return {f"{prefix}_loc": loc, f"{prefix}_cov_factor": cov_factor, f"{prefix}_scale": scale}
    scale = _mean_field_scale(scale_tril)
    if isinstance(guide, AutoDiagonalNormal):
        return {f"{prefix}_loc": loc, f"{prefix}_scale": scale}
    unpack = twin._unpack_latent  # AutoNormal: per site, in the unconstrained space
    locs, scales = unpack(loc), unpack(scale)
    out = {}
    for name in locs:
        out[f"{name}_{prefix}_loc"] = locs[name]
        out[f"{name}_{prefix}_scale"] = scales[name]
    return out


def _mean_field_scale(scale_tril):
    """``1 / sqrt(diag(Sigma^-1))`` per member from Sigma's Cholesky factor ``L``
    (``diag(Sigma^-1)_i`` is the squared norm of column ``i`` of ``L^-1``); NaN for a
    member whose ``L`` is not finite."""
    inverse = np.full(scale_tril.shape, np.nan)
    ok = np.isfinite(scale_tril).all(axis=(-1, -2))
    eye = np.eye(scale_tril.shape[-1])
    inverse[ok] = np.linalg.solve(scale_tril[ok], np.broadcast_to(eye, scale_tril[ok].shape))
    return 1.0 / np.sqrt(np.sum(inverse**2, axis=-2))


def _low_rank(covariance, rank):
    """``(cov_factor, scale)`` of ``AutoLowRankMultivariateNormal`` per member:
    probabilistic PCA of the correlation matrix (see the module's docstring)."""
    num_members, dim = covariance.shape[0], covariance.shape[-1]
    rank = int(round(dim**0.5)) if rank is None else rank  # NumPyro's default rank
    cov_factor = np.full((num_members, dim, rank), np.nan)
    scale = np.full((num_members, dim), np.nan)
    for e in np.flatnonzero(np.isfinite(covariance).all(axis=(-1, -2))):
        sd = np.sqrt(np.diag(covariance[e]))
        correlation = covariance[e] / np.outer(sd, sd)
        eigenvalues, vectors = np.linalg.eigh(correlation)  # ascending
        eigenvalues, vectors = eigenvalues[::-1], vectors[:, ::-1]
        kept = min(rank, dim)
        alpha2 = eigenvalues[kept:].mean() if kept < dim else eigenvalues[-1]
        cov_factor[e] = 0.0
        cov_factor[e, :, :kept] = vectors[:, :kept] * np.sqrt(
            np.maximum(eigenvalues[:kept] / alpha2 - 1.0, 0.0)
        )
        scale[e] = np.sqrt(alpha2) * sd
    return cov_factor, scale
