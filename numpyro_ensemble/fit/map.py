"""``EnsembleMAP``: E MAP (or MLE, or tempered MAP) fits of one model."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

from jaxtyping import PRNGKeyArray
import numpyro.distributions as dist
from numpyro.infer.autoguide import AutoDelta
from numpyro.infer.initialization import init_to_median, init_to_uniform
from numpyro.infer.svi import SVIState

from numpyro_ensemble.engine.checks import (
    check_params_tree,
    check_positive_int,
    check_something_to_fit,
    check_weight,
)
from numpyro_ensemble.engine.inspection import ModelInfo, signature
from numpyro_ensemble.engine.members import SplitArgs, map_members
from numpyro_ensemble.fit import optim as optim_module
from numpyro_ensemble.fit.elbo import TemperedTrace_ELBO
from numpyro_ensemble.fit.svi import EnsembleSVI

__all__ = ["EnsembleMAP"]

# AutoDelta guides by (model, init_loc_fn, argument shapes): EnsembleMAPs of one model
# on data of one shape share a guide, so the later ones reuse the compiled programs
# (the programs are kept per guide); data of another shape gets a guide of its own.
_GUIDES_KEPT = 64
_guides: OrderedDict = OrderedDict()


def init_to_median_or_uniform(site=None, num_samples=15, radius=2):
    """``init_to_median`` for sites whose prior can be sampled, ``init_to_uniform``
    (uniform in ``(-radius, radius)`` in the unconstrained space, per member key) for
    improper ``ImproperUniform`` sites (Stan-style flat parameters), which have no
    samples to take a median of. EnsembleMAP's default init strategy."""
    if site is None:
        return partial(init_to_median_or_uniform, num_samples=num_samples, radius=radius)
    fn = site.get("fn")
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution, dist.ExpandedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, dist.ImproperUniform):
        return init_to_uniform(site, radius=radius)
    return init_to_median(site, num_samples=num_samples)


class EnsembleMAP(EnsembleSVI):
    r"""
    An ensemble of ``ensemble_size`` MAP fits of one model: the model is the only input.

    Each member maximises the tempered log joint of the model

    .. math::

        \log p(y \mid \theta) + w \, \log p(\theta), \qquad w = \text{prior\_weight},

    where :math:`\log p(y\mid\theta)` sums the observed sites (and ``numpyro.factor``
    sites) and :math:`\log p(\theta)` the latent sites, both as scored by
    :func:`numpyro.infer.util.log_density`. ``prior_weight=0`` is maximum
    likelihood, 1 is MAP, in between a tempered MAP. Sites inside a subsampled
    ``numpyro.plate(..., subsample_size=B)`` are scaled by ``N / B``, so
    mini-batch steps are unbiased for the full-data objective; each member draws
    its own mini-batches.

    This is an :class:`EnsembleSVI` with an :class:`~numpyro.infer.autoguide.AutoDelta`
    guide built from the model and :class:`~numpyro_ensemble.TemperedTrace_ELBO`
    with ``kl_weight=prior_weight`` (AutoDelta's log density is zero, so the
    tempered ELBO is exactly the objective above). All of ``init`` / ``update`` /
    ``run`` / ... are EnsembleSVI's. MAP points are modes in the constrained
    space (no Jacobian), as with AutoDelta.

    **Example:**

    .. doctest::

        >>> import jax.numpy as jnp
        >>> from jax import random
        >>> import numpyro, numpyro.distributions as dist
        >>> import optax
        >>> from numpyro_ensemble import EnsembleMAP

        >>> def model(y):
        ...     mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with numpyro.plate("data", y.shape[0]):
        ...         numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

        >>> y = jnp.array([2.0, 3.0, 4.0])   # MAP: sum(y) / (n + 1) = 2.25
        >>> ens = EnsembleMAP(model, optax.adam(0.05), ensemble_size=4)
        >>> result = ens.run(random.key(0), 1000, y, progress_bar=False)
        >>> points = ens.get_points(result.params)
        >>> points["mu"].shape
        (4,)
        >>> bool(jnp.allclose(points["mu"], 2.25, atol=1e-3))
        True

    The model is the only input: without ``optim`` the optimizer is chosen from the
    model when it is first run. On full data it is L-BFGS (``optax.lbfgs``, a zoom
    linesearch, with a memory of 50 curvature pairs for models of up to 10,000
    values, fewer for larger ones, at least 10; each member gets its own loss,
    gradient and linesearch, see :mod:`numpyro_ensemble.fit.optim`), and ``run`` stops a member once its gradient
    norm is below ``1e-5`` or its loss has not decreased for 10 steps (pass
    ``early_stopping=`` to change that). With subsampled plates (mini-batches, where
    a linesearch cannot work) it is Adam at ``0.01`` with the step halved whenever
    the loss averaged over 100 steps stops improving (``optax.contrib.reduce_on_plateau``,
    at most six times). An ``optim`` given always wins.

    :param model: Python callable with NumPyro primitives; its latent sites must
        be continuous.
    :param optim: a ``numpyro.optim`` optimizer or an ``optax.GradientTransformation``,
        linesearch methods such as ``optax.lbfgs()`` included; default: chosen from
        the model (above).
    :param int ensemble_size: ``E``, the number of independent fits (>= 1).
    :param float prior_weight: :math:`w \ge 0`, the weight on the log prior.
    :param init_loc_fn: per-site init strategy (see :ref:`init_strategy`); it is
        evaluated with each member's own key, so random strategies give distinct
        members. Defaults to :func:`init_to_median_or_uniform`: AutoDelta's
        default ``init_to_median`` (the median of 15 prior draws, a different point
        per member), and ``init_to_uniform`` for improper ``ImproperUniform``
        sites, which cannot be sampled; ``init_to_sample`` spreads members further.
    :param static_kwargs: static arguments for the model, as for ``SVI``.
    """

    def __init__(
        self,
        model,
        optim=None,
        *,
        ensemble_size: int,
        prior_weight: float = 1.0,
        init_loc_fn=init_to_median_or_uniform,
        **static_kwargs,
    ):
        self.prior_weight = check_weight(
            prior_weight, "prior_weight", per_member=True,
            ensemble_size=check_positive_int(ensemble_size, "ensemble_size"),
        )
        if not callable(init_loc_fn) or isinstance(init_loc_fn, type):
            raise TypeError(
                f"init_loc_fn must be an init strategy such as init_to_median or "
                f"init_to_uniform(radius=1.0), got {init_loc_fn!r}."
            )
        self._init_loc_fn = init_loc_fn
        self._default_optim = optim is None
        super().__init__(
            model,
            AutoDelta(model, init_loc_fn=init_loc_fn),
            optim_module.DEFAULT_FULL_DATA if optim is None else optim,
            TemperedTrace_ELBO(kl_weight=self.prior_weight),
            ensemble_size=ensemble_size,
            **static_kwargs,
        )

    def _validate_model(self, info: ModelInfo):
        if info.error is not None:
            raise info.error
        check_something_to_fit(self, info)  # (a model's params alone are fitted by ML)
        if info.discrete:
            raise ValueError(
                f"EnsembleMAP fits continuous latent sites only, but the model has "
                f"discrete latent sites {sorted(info.discrete)}. Marginalise them out "
                f"or observe them."
            )

    def _inspect(self, split: SplitArgs) -> ModelInfo:
        info = super()._inspect(split)
        if getattr(self, "_default_optim", False):
            self._default_optim = False  # chosen once: the compiled programs depend on it
            self._choose_optimizer(info)
        key = (self._init_loc_fn, signature(self.model, split, self.static_kwargs))
        try:
            guide = _guides.get(key)
        except TypeError:  # an unhashable static value: keep this object's guide
            return info
        if guide is None:
            if self.guide.prototype_trace is not None:  # set up for other shapes
                self.guide = AutoDelta(self.model, init_loc_fn=self._init_loc_fn)
            guide = _guides[key] = self.guide
            if len(_guides) > _GUIDES_KEPT:
                _guides.popitem(last=False)
        _guides.move_to_end(key)
        if guide is not self.guide:
            self.guide, self.constrain_fn = guide, None
        return info

    def _choose_optimizer(self, info: ModelInfo):
        """The default optimizer for this model: L-BFGS on full data, Adam with a
        plateau schedule with mini-batches."""
        if info.plates:
            optim = optim_module.DEFAULT_MINI_BATCH
            self.optim = optim_module.as_numpyro(optim)
            self._optim_arg = optim
        else:
            optim = optim_module.full_data_lbfgs(info.size)
            self.optim = optim_module.as_numpyro(optim)
            self._optim_arg = optim
            self._default_early_stopping = optim_module.DEFAULT_FULL_DATA_STOPPING

    def get_points(self, params_or_state: dict | SVIState) -> dict:
        """
        The members' points by the model's latent site names, constrained.

        :param params_or_state: the params of :meth:`get_params` / ``run(...).params``,
            or an ensemble state.
        :return: a dict ``{site name: array of shape (E, *site_shape)}``.
        """
        params = params_or_state
        if isinstance(params_or_state, SVIState):
            params = self.get_params(params_or_state)
        check_params_tree(params, self.ensemble_size, "params_or_state")
        self._check_initialized("get_points")
        return map_members(lambda member, _: self.guide.median(member), params)

    def init(self, rng_key: PRNGKeyArray, *args, init_params=None, **kwargs) -> SVIState:
        """As :meth:`EnsembleSVI.init`. ``init_params`` may also be given by the
        model's site names (``{"mu": ...}``), shared or with a leading ``(E,)`` axis."""
        return super().init(rng_key, *args, init_params=init_params, **kwargs)

    def _init(self, rng_key, args, kwargs, init_params, chunks=None):
        return super()._init(rng_key, args, kwargs, self._param_names(init_params), chunks)

    def _param_names(self, init_params):
        if callable(init_params):
            return lambda rng_key: self._param_names(init_params(rng_key))
        if not isinstance(init_params, dict):
            return init_params
        suffix = f"_{self.guide.prefix}_loc"
        return {
            name if name.endswith(suffix) else f"{name}{suffix}": value
            for name, value in init_params.items()
        }
