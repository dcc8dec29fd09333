"""A tempered ``Trace_ELBO``: a weight on the prior / KL part of the ELBO."""

from __future__ import annotations

import jax.numpy as jnp
from numpyro.infer import Trace_ELBO
from numpyro.primitives import Messenger

from numpyro_ensemble._checks import check_num_particles, check_weight

__all__ = ["TemperedTrace_ELBO"]


class _scale_sites(Messenger):
    """Multiply the ``scale`` of sample sites by ``weight``.

    With ``latent_only=True`` observed sites (including ``numpyro.factor`` sites,
    which are observed) are left alone. Scales compose multiplicatively, so a
    subsampling plate's ``N / |B|`` factor still applies.
    """

    def __init__(self, fn=None, *, weight, latent_only):
        self.weight = weight
        self.latent_only = latent_only
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample":
            return
        if self.latent_only and msg["is_observed"]:
            return
        scale = msg["scale"]
        msg["scale"] = self.weight if scale is None else self.weight * scale


class TemperedTrace_ELBO(Trace_ELBO):
    r"""
    :class:`~numpyro.infer.Trace_ELBO` with a weight :math:`\beta` on its prior / KL part.

    For each particle :math:`z \sim q(z)` the loss is

    .. math::

        -\Big(\log p(y \mid z) + \beta\,\big[\log p(z) - \log q(z)\big]\Big),

    so its expectation is :math:`-\mathbb{E}_q[\log p(y\mid z)] + \beta\,\mathrm{KL}(q\,\|\,p)`.
    :math:`\beta = 1` is the usual ELBO (the same numbers as ``Trace_ELBO``),
    :math:`\beta < 1` a *cold* posterior (prior and entropy down-weighted, the
    data count more), :math:`\beta > 1` a *warm* one.

    Which terms are which:

    - observed sample sites of the model (``obs=...``) form :math:`\log p(y\mid z)`
      and are never tempered;
    - ``numpyro.factor`` sites are observed sites, so they count as likelihood
      and are **not** tempered;
    - latent sample sites of the model and *every* sample site of the guide are
      multiplied by :math:`\beta`.

    A site's own scale (e.g. the ``N / |B|`` of a subsampled ``numpyro.plate``)
    still applies; :math:`\beta` multiplies it. Mutable state, ``num_particles``
    and the other ``Trace_ELBO`` options behave as in ``Trace_ELBO``.

    With :class:`~numpyro.infer.autoguide.AutoDelta` the guide's log density is
    zero and this loss is the tempered MAP objective
    :math:`-(\log p(y\mid\theta) + \beta \log p(\theta))` used by
    :class:`~numpyro_ensemble.EnsembleMAP`.

    **Example:**

    .. doctest::

        >>> import jax.numpy as jnp
        >>> from jax import random
        >>> import numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import SVI, Trace_ELBO
        >>> from numpyro.infer.autoguide import AutoNormal
        >>> from numpyro_ensemble import TemperedTrace_ELBO
        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = jnp.array([0.5, 1.5])
        >>> guide = AutoNormal(model)
        >>> svi = SVI(model, guide, numpyro.optim.Adam(0.1), Trace_ELBO())
        >>> state = svi.init(random.key(0), y)
        >>> same = SVI(model, guide, numpyro.optim.Adam(0.1), TemperedTrace_ELBO(kl_weight=1.0))
        >>> _ = same.init(random.key(0), y)
        >>> bool(same.evaluate(state, y) == svi.evaluate(state, y))
        True
        >>> cold = SVI(model, guide, numpyro.optim.Adam(0.1), TemperedTrace_ELBO(kl_weight=0.1))
        >>> _ = cold.init(random.key(0), y)
        >>> bool(cold.evaluate(state, y) < svi.evaluate(state, y))  # prior and entropy down-weighted
        True

    :param int num_particles: the number of particles (samples) used to form
        the estimator, as in ``Trace_ELBO``.
    :param float kl_weight: :math:`\beta \ge 0`, the weight on the prior / KL part.
        Defaults to 1 (the usual ELBO). Under an ensemble, an ``(E,)`` array gives
        member ``e`` the weight ``kl_weight[e]`` (see :mod:`numpyro_ensemble.hyper`);
        its length must be the ensemble's ``ensemble_size`` (checked when the ensemble
        is made), and a plain ``SVI`` takes a scalar only (an array is an error there).
    :param bool vectorize_particles: as in ``Trace_ELBO``.
    :param bool multi_sample_guide: as in ``Trace_ELBO``.
    :param bool sum_sites: as in ``Trace_ELBO``.
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        kl_weight: float = 1.0,
        vectorize_particles: bool = True,
        multi_sample_guide: bool = False,
        sum_sites: bool = True,
    ):
        self.kl_weight = check_weight(kl_weight, "kl_weight", per_member=True)
        super().__init__(
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            multi_sample_guide=multi_sample_guide,
            sum_sites=sum_sites,
        )
        check_num_particles(self)

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        if jnp.ndim(self.kl_weight) != 0:
            # An ensemble gives each member its own value (a scalar); here the whole
            # (E,) array would broadcast over the sites and sum E tempered ELBOs.
            n = jnp.shape(self.kl_weight)[0]
            raise ValueError(
                f"kl_weight has {n} values (one per member), but this loss is evaluated "
                f"on its own (e.g. by a plain numpyro.infer.SVI), not by an ensemble: "
                f"use EnsembleSVI(..., ensemble_size={n}) (or EnsembleMAP(prior_weight=...)) "
                f"for per-member weights, or give a scalar kl_weight."
            )
        model = _scale_sites(model, weight=self.kl_weight, latent_only=True)
        guide = _scale_sites(guide, weight=self.kl_weight, latent_only=False)
        return super().loss_with_mutable_state(
            rng_key, param_map, model, guide, *args, **kwargs
        )
