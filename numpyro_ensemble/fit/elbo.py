"""A tempered ``Trace_ELBO``: a weight on the prior / KL part of the ELBO."""

from __future__ import annotations

import warnings

import jax
from jax import random, vmap
import jax.numpy as jnp
from numpyro.handlers import replay, seed, substitute
from numpyro.infer import Trace_ELBO
from numpyro.infer.util import compute_log_probs
from numpyro.primitives import Messenger
from numpyro.util import _validate_model, check_model_guide_match

from numpyro_ensemble.engine.checks import check_num_particles, check_weight

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
        member ``e`` the weight ``kl_weight[e]`` (see :mod:`numpyro_ensemble.engine.hyper`);
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
        return trace_elbo_in_name_order(self, rng_key, param_map, model, guide, *args, **kwargs)


def trace_elbo_in_name_order(elbo, rng_key, param_map, model, guide, *args, **kwargs):
    """``Trace_ELBO.loss_with_mutable_state`` of NumPyro 0.22 for the settings of
    ``elbo``, with the sites' terms formed and added in the order of their names.

    NumPyro forms and adds them in the order of a Python ``set`` of the names, which
    changes with the process's ``PYTHONHASHSEED``: the traced programs then differ
    between processes (JAX's persistent compilation cache misses) and so do the float
    results (the additions round differently), which a fit can amplify into other
    optima. The numbers are NumPyro's with the names in sorted order.
    """

    def single_particle_elbo(rng_key):
        params = param_map.copy()
        model_seed, guide_seed = random.split(rng_key)
        seeded_guide = seed(guide, guide_seed)
        guide_log_probs, guide_trace = compute_log_probs(seeded_guide, args, kwargs, param_map)
        mutable_params = {
            name: site["value"] for name, site in guide_trace.items() if site["type"] == "mutable"
        }
        params.update(mutable_params)
        if elbo.multi_sample_guide:
            plates = {
                name: site["value"] for name, site in guide_trace.items() if site["type"] == "plate"
            }

            def compute_model_log_probs(key, latent):
                with seed(rng_seed=key), substitute(data={**latent, **plates}):
                    model_log_probs, model_trace = compute_log_probs(model, args, kwargs, params)
                _validate_model(model_trace, plate_warning="loose")
                return model_log_probs

            num_guide_samples = None
            for site in guide_trace.values():
                if site["type"] == "sample":
                    num_guide_samples = site["value"].shape[0]
                    break
            if num_guide_samples is None:
                raise ValueError("guide is missing `sample` sites.")
            seeds = random.split(model_seed, num_guide_samples)
            latents = {
                name: site["value"]
                for name, site in guide_trace.items()
                if (site["type"] == "sample" and site["value"].size > 0)
                or (site["type"] == "deterministic")
            }
            model_log_probs = vmap(compute_model_log_probs)(seeds, latents)
            model_log_probs = jax.tree.map(lambda x: jnp.sum(x, axis=0), model_log_probs)
        else:
            replay_model = replay(seed(model, model_seed), guide_trace)
            model_log_probs, model_trace = compute_log_probs(replay_model, args, kwargs, params)
            check_model_guide_match(model_trace, guide_trace)
            _validate_model(model_trace, plate_warning="loose")
            mutable_params.update(
                {name: site["value"] for name, site in model_trace.items() if site["type"] == "mutable"}
            )

        # log p(z) - log q(z), by name: NumPyro iterates a set of the names here
        names = sorted(set(model_log_probs).union(guide_log_probs))
        terms = {
            name: model_log_probs.get(name, jnp.array(0.0)) - guide_log_probs.get(name, jnp.array(0.0))
            for name in names
        }
        if elbo.sum_sites:
            particle = sum((terms[name] for name in names), start=jnp.array(0.0))
        else:
            particle = terms
        if mutable_params:
            if elbo.num_particles == 1:
                return particle, mutable_params
            warnings.warn("mutable state is currently ignored when num_particles > 1.", stacklevel=2)
        return particle, None

    if elbo.num_particles == 1:
        value, mutable_state = single_particle_elbo(rng_key)
        return {"loss": jax.tree.map(jnp.negative, value), "mutable_state": mutable_state}
    rng_keys = random.split(rng_key, elbo.num_particles)
    values, mutable_state = elbo.vectorize_particles_fn(single_particle_elbo, rng_keys)
    return {"loss": jax.tree.map(lambda x: -jnp.mean(x), values), "mutable_state": mutable_state}


class _NameOrderTrace_ELBO(Trace_ELBO):
    """A ``Trace_ELBO`` whose sites' terms are formed and added by name (see
    :func:`trace_elbo_in_name_order`)."""

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        return trace_elbo_in_name_order(self, rng_key, param_map, model, guide, *args, **kwargs)


def in_name_order(loss):
    """``loss``, or for a NumPyro ``Trace_ELBO`` (which adds its sites in ``set`` order)
    a copy of it with the same settings that adds them by name; other losses as given
    (``TemperedTrace_ELBO`` adds them by name itself)."""
    if isinstance(loss, Trace_ELBO) and (
        type(loss).loss_with_mutable_state is Trace_ELBO.loss_with_mutable_state
    ):
        ordered = object.__new__(_NameOrderTrace_ELBO)
        ordered.__dict__.update(vars(loss))
        return ordered
    return loss

