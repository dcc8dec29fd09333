r"""Warm NUTS that never strands a chain silently: a guarded kinetic energy, a check
after warm-up and restarts.

A chain is *stranded* when it cannot leave where its warm-up took it: the step size
collapses (dual averaging halves it after every rejected trajectory), most
trajectories diverge, and the draws sit far from the posterior's typical set. Two
things here keep that from passing silently.

**The kinetic energy.** NumPyro's ``euclidean_kinetic_energy`` with a dense metric is
:math:`\tfrac12 r^\top M^{-1} r`, computed as a dot product. After a leapfrog step to
a point where the gradient is huge (a step-size search in the first warm-up
iterations can land where it is :math:`10^{246}`), the momentum is too, the products
of opposite signs overflow and the dot product is :math:`-\infty`. The proposal's
energy is then :math:`-\infty`: NUTS accepts it (an energy drop is never a
divergence) and the chain stays there, its step size shrinking to :math:`10^{-92}`.
:func:`guarded_kinetic_energy` is the same energy, :math:`+\infty` wherever it is not
finite, so such a step is a divergence and is rejected. (Found on posteriordb's
``arma-arma11``; its gradient is NumPyro's own.)

**The check after warm-up.** :func:`run_warm_nuts` runs NumPyro's ``MCMC.warmup``,
inspects every chain (:func:`stranded_chains`): the share of divergent transitions
over the last half of its warm-up (> 50%), its final step size against the other
chains' median (< 1e-3 x), and its potential energy against the ensemble's draws'
(not finite, or its median over the last half of warm-up above both the ensemble's
99th percentile and the lowest chain's median by more than
:math:`5 \sqrt{D/2} + 5`, five sds of a :math:`D`-dimensional Gaussian's energy). A
stranded chain's warm-up is run again, alone, from a spare start with the metric
re-adapted, and spliced into the other chains' state (NumPyro's public
``MCMC.post_warmup_state``) before ``MCMC.run`` draws from all of them; a warning
names the chain and why. A chain that is still stranded after its restarts is named
in a warning and in the result: the run never returns one silently.
"""

from __future__ import annotations

from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import MCMC, NUTS
from numpyro.infer.hmc_util import euclidean_kinetic_energy

__all__ = ["WarmNUTSRun", "guarded_kinetic_energy", "run_warm_nuts", "stranded_chains"]

# A chain is stranded above this share of divergent transitions (last half of warm-up),
STRANDED_DIVERGENCE_RATE = 0.5
# or below this fraction of the chains' median step size.
STRANDED_STEP_RATIO = 1e-3
# A restarted chain's warm-up: at least this many iterations, the metric re-adapted.
RESTART_WARMUP = 500
FIELDS = ("diverging", "potential_energy", "num_steps")


def guarded_kinetic_energy(inverse_mass_matrix, r):
    """NumPyro's ``euclidean_kinetic_energy``, :math:`+\\infty` where it is not finite
    (so a leapfrog step that overflows is a divergence, not an accepted proposal of
    energy :math:`-\\infty`). Its gradient is NumPyro's own."""
    energy = euclidean_kinetic_energy(inverse_mass_matrix, r)
    return jnp.where(jnp.isfinite(energy), energy, jnp.inf)


guarded_kinetic_energy._kinetic_grad = euclidean_kinetic_energy._kinetic_grad


class WarmNUTSRun(NamedTuple):
    """What :meth:`~numpyro_ensemble.NUTSWarmStart.run` returns."""

    mcmc: MCMC
    """NumPyro's ``MCMC`` after sampling: ``mcmc.get_samples()``, ``print_summary()``."""
    restarted: dict
    """``{chain: why}``: chains whose warm-up was run again from a spare start."""
    stranded: dict
    """``{chain: why}``: chains still stranded after their restarts (warned about)."""
    warmup_num_steps: np.ndarray
    """``(K,)`` leapfrog steps (gradient evaluations) of each chain's warm-ups, its
    restarts' included (NumPyro's ``num_steps``; the step-size searches not counted)."""

    def get_samples(self, group_by_chain: bool = False) -> dict:
        """``MCMC.get_samples``."""
        return self.mcmc.get_samples(group_by_chain=group_by_chain)

    def to_arviz(self, **kwargs):
        """ArviZ's ``from_numpyro`` on the run: chains as chains (``kwargs`` go to it)."""
        import arviz as az  # optional at import time, as in arviz_export

        return az.from_numpyro(self.mcmc, **kwargs)


def stranded_chains(
    diverging: np.ndarray,
    step_size: np.ndarray,
    potential_energy: np.ndarray,
    reference_energy: float,
    dim: int,
    median_step_size: float | None = None,
    lowest_energy: float | None = None,
) -> dict:
    """``{chain: why}`` for the stranded chains of a warm-up (see the module's text).

    :param diverging: ``(K, W)`` NumPyro's ``diverging`` extra field over the warm-up.
    :param step_size: ``(K,)`` the step sizes at the end of warm-up.
    :param potential_energy: ``(K, W)`` the ``potential_energy`` extra field.
    :param reference_energy: the ensemble's draws' 99th percentile of potential energy.
    :param dim: the number of unconstrained dimensions.
    :param median_step_size: the step size to compare with (default: the chains' median).
    :param lowest_energy: the energy to compare with (default: the lowest chain median).
    """
    diverging = np.asarray(diverging, bool)
    potential_energy = np.asarray(potential_energy, np.float64)
    step_size = np.asarray(step_size, np.float64).reshape(-1)
    half = potential_energy.shape[1] // 2
    rate = diverging[:, half:].mean(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf in a stranded chain
        energy = np.median(potential_energy[:, half:], axis=1)
    finite = np.isfinite(energy)
    if median_step_size is None:
        median_step_size = float(np.median(step_size))
    if lowest_energy is None:
        lowest_energy = float(energy[finite].min()) if finite.any() else np.inf
    limit = max(reference_energy, lowest_energy) + 5.0 * np.sqrt(dim / 2.0) + 5.0
    reasons = {}
    for k in range(step_size.size):
        why = []
        if rate[k] > STRANDED_DIVERGENCE_RATE:
            why.append(f"{rate[k]:.0%} of the last {diverging.shape[1] - half} warm-up "
                       f"transitions diverged")
        if not step_size[k] >= STRANDED_STEP_RATIO * median_step_size:
            why.append(f"step size {step_size[k]:.3g} < {STRANDED_STEP_RATIO:g} x the "
                       f"chains' median {median_step_size:.3g}")
        if not np.isfinite(potential_energy[k, -1]):
            why.append("its potential energy is not finite")
        elif energy[k] > limit:
            why.append(f"potential energy {energy[k]:.4g}, above the ensemble's draws' "
                       f"(99th percentile {reference_energy:.4g}) and the other chains'")
        if why:
            reasons[k] = ", ".join(why)
    return reasons


def run_warm_nuts(
    warm,
    model,
    rng_key,
    args: tuple,
    kwargs: dict,
    num_samples: int = 1000,
    num_warmup: int | None = None,
    chain_method: str = "sequential",
    progress_bar: bool = True,
    nuts_kwargs: dict | None = None,
    extra_fields: tuple = (),
    max_restarts: int = 2,
) -> WarmNUTSRun:
    """NumPyro's NUTS from a warm start (``warm``: a
    :class:`~numpyro_ensemble.NUTSWarmStart`): warm-up, the check of every chain,
    restarts of stranded chains, then ``num_samples`` draws per chain (see the
    module's text and :meth:`~numpyro_ensemble.NUTSWarmStart.run`)."""
    nuts_kwargs = {**warm.nuts_kwargs, **(nuts_kwargs or {})}
    num_warmup = warm.num_warmup if num_warmup is None else num_warmup
    K = warm.num_chains
    mcmc = MCMC(NUTS(model, **nuts_kwargs), num_warmup=num_warmup, num_samples=num_samples,
                num_chains=K, chain_method=chain_method, progress_bar=progress_bar)
    warmup_key, restart_key = jax.random.split(rng_key)
    mcmc.warmup(warmup_key, *args, init_params=warm.init_params, extra_fields=FIELDS,
                collect_warmup=True, **kwargs)
    state = mcmc.post_warmup_state
    fields = mcmc.get_extra_fields(group_by_chain=True)
    step_size = np.asarray(state.adapt_state.step_size, np.float64).reshape(K)
    potential = np.asarray(fields["potential_energy"], np.float64).reshape(K, -1)
    dim = warm.covariance.shape[0]
    warmup_steps = np.asarray(fields["num_steps"], np.int64).reshape(K, -1).sum(axis=1)
    found = stranded_chains(fields["diverging"].reshape(K, -1), step_size, potential,
                            warm.reference_energy, dim)
    healthy = [k for k in range(K) if k not in found]
    median_step = float(np.median(step_size[healthy])) if healthy else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.median(potential[healthy, potential.shape[1] // 2:], axis=1)
    lowest = float(medians.min()) if healthy else None

    spares = _unstack(warm.spare_params)
    restarted, stranded = {}, {}
    restart_kwargs = {**nuts_kwargs, "adapt_mass_matrix": True}
    restart_warmup = max(RESTART_WARMUP, num_warmup)
    for k, why in found.items():
        restarted[k] = why
        for _ in range(max_restarts):
            if not spares:
                why = f"{why}; no spare start left"
                break
            restart_key, key = jax.random.split(restart_key)
            single = MCMC(NUTS(model, **restart_kwargs), num_warmup=restart_warmup,
                          num_samples=1, num_chains=1, progress_bar=False)
            single.warmup(key, *args, init_params=spares.pop(0), extra_fields=FIELDS,
                          collect_warmup=True, **kwargs)
            new = single.post_warmup_state
            new_fields = single.get_extra_fields(group_by_chain=True)
            warmup_steps[k] += int(np.asarray(new_fields["num_steps"]).sum())
            again = stranded_chains(
                new_fields["diverging"].reshape(1, -1),
                np.asarray(new.adapt_state.step_size).reshape(1),
                np.asarray(new_fields["potential_energy"]).reshape(1, -1),
                warm.reference_energy, dim, median_step, lowest,
            )
            state = _splice(state, new, k)
            if not again:
                why = None
                break
            why = again[0]
        warnings.warn(
            f"nuts warm start: chain {k} was stranded after warm-up ({restarted[k]}); its "
            f"warm-up was run again from another start with the metric re-adapted"
            + (f", and it is still stranded ({why}): do not use its draws" if why else ""),
            RuntimeWarning,
            stacklevel=3,
        )
        if why:
            stranded[k] = why
    mcmc.post_warmup_state = state
    wanted = tuple(dict.fromkeys(("diverging", *extra_fields)))
    mcmc.run(state.rng_key, *args, extra_fields=wanted, **kwargs)
    return WarmNUTSRun(mcmc=mcmc, restarted=restarted, stranded=stranded,
                       warmup_num_steps=warmup_steps)


def _unstack(params: dict) -> list[dict]:
    """``{site: (R, ...)}`` -> ``R`` single starts."""
    count = np.shape(next(iter(params.values())))[0] if params else 0
    return [jax.tree.map(lambda leaf, i=i: leaf[i], params) for i in range(count)]


def _splice(state, new, k: int):
    """The K-chain ``state`` with chain ``k`` replaced by the one-chain state ``new``
    (its iteration count kept: the sampling phase starts where the others' does)."""
    if np.ndim(state.i) == 0:  # one chain: no chain axis
        return new._replace(i=state.i)
    new = new._replace(i=state.i[k])
    return jax.tree.map(lambda batch, one: batch.at[k].set(one), state, new)
