"""One call from a model and data to a fitted ensemble."""

from __future__ import annotations

from jaxtyping import Array, Float, PRNGKeyArray
from numpyro.infer import Trace_ELBO
import optax

from numpyro_ensemble.engine.checks import check_learning_rate
from numpyro_ensemble.fit.map import EnsembleMAP, init_to_median_or_uniform
from numpyro_ensemble.fit.svi import EnsembleSVI

__all__ = ["ensemble_map", "ensemble_svi"]


def _optimizer(optim, learning_rate):
    if optim is not None and learning_rate is not None:
        raise ValueError("pass either optim or learning_rate, not both.")
    if optim is None:
        return optax.adam(5e-3 if learning_rate is None else check_learning_rate(learning_rate))
    return optim


def ensemble_map(
    model,
    *args,
    ensemble_size: int,
    num_steps: int,
    rng_key: PRNGKeyArray,
    optim=None,
    learning_rate: float | None = None,
    prior_weight: float = 1.0,
    init_loc_fn=init_to_median_or_uniform,
    progress_bar: bool = False,
    **kwargs,
) -> tuple[dict, Float[Array, "E T"]]:
    """
    Fits an :class:`~numpyro_ensemble.EnsembleMAP` in one call.

    ``ensemble_map(model, x, y, ensemble_size=E, num_steps=T, rng_key=key)`` is
    ``EnsembleMAP(model, optax.adam(5e-3), ensemble_size=E).run(key, T, x, y)``
    followed by :meth:`~numpyro_ensemble.EnsembleMAP.get_points`.

    :param model: the NumPyro model.
    :param args: arguments to the model (the data).
    :param int ensemble_size: ``E``.
    :param int num_steps: optimization steps per member.
    :param jax.random.key rng_key: random number generator seed.
    :param optim: optimizer (numpyro.optim or optax); default ``optax.adam``.
    :param float learning_rate: Adam's step size when ``optim`` is None
        (default 5e-3).
    :param float prior_weight: 0 is MLE, 1 MAP, in between a tempered MAP.
    :param init_loc_fn: per-site init strategy.
    :param bool progress_bar: show a progress bar.
    :param kwargs: keyword arguments to the model.
    :return: ``(points, losses)``: the MAP points by site name, each with a
        leading ``(E,)`` axis, and the losses, shape ``(E, num_steps)``.
    """
    ens = EnsembleMAP(
        model,
        _optimizer(optim, learning_rate),
        ensemble_size=ensemble_size,
        prior_weight=prior_weight,
        init_loc_fn=init_loc_fn,
    )
    result = ens.run(rng_key, num_steps, *args, progress_bar=progress_bar, **kwargs)
    return ens.get_points(result.params), result.losses


def ensemble_svi(
    model,
    guide,
    *args,
    ensemble_size: int,
    num_steps: int,
    rng_key: PRNGKeyArray,
    optim=None,
    learning_rate: float | None = None,
    loss=None,
    progress_bar: bool = False,
    **kwargs,
) -> tuple[dict, Float[Array, "E T"]]:
    """
    Fits an :class:`~numpyro_ensemble.EnsembleSVI` in one call.

    :param model: the NumPyro model.
    :param guide: the guide, e.g. ``AutoNormal(model)``.
    :param args: arguments to the model / guide (the data).
    :param int ensemble_size: ``E``.
    :param int num_steps: optimization steps per member.
    :param jax.random.key rng_key: random number generator seed.
    :param optim: optimizer (numpyro.optim or optax); default ``optax.adam``.
    :param float learning_rate: Adam's step size when ``optim`` is None
        (default 5e-3).
    :param loss: the ELBO; default ``Trace_ELBO()``.
    :param bool progress_bar: show a progress bar.
    :param kwargs: keyword arguments to the model / guide.
    :return: ``(params, losses)``: the guide params, each with a leading
        ``(E,)`` axis, and the losses, shape ``(E, num_steps)``.
    """
    svi = EnsembleSVI(
        model,
        guide,
        _optimizer(optim, learning_rate),
        Trace_ELBO() if loss is None else loss,
        ensemble_size=ensemble_size,
    )
    result = svi.run(rng_key, num_steps, *args, progress_bar=progress_bar, **kwargs)
    return result.params, result.losses
