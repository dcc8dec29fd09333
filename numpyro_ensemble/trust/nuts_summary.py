"""What to trust in a NUTS run: per-chain divergences and step sizes, R-hat, ESS, the
restarted and stranded chains, and a verdict in :func:`ensemble_summary`'s words."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC

__all__ = ["NUTSSummary", "nuts_summary"]

# R-hat above this: the chains disagree (as ensemble_summary's verdict).
R_HAT_LIMIT = 1.01
# Bulk ESS below this per chain: too few draws to trust R-hat and the estimates
# (Vehtari et al. 2021, "Rank-normalization, folding, and localization").
ESS_PER_CHAIN = 100


class NUTSSummary(NamedTuple):
    """The result of :func:`nuts_summary`; ``print`` it for a table."""

    divergences: np.ndarray
    """``(K,)`` divergent transitions of each chain while sampling (NaN when the run
    did not collect NumPyro's ``diverging`` field)."""
    step_size: np.ndarray
    """``(K,)`` each chain's step size after warm-up."""
    num_samples: int
    """Draws per chain."""
    r_hat: float
    """Largest split R-hat over all latent coordinates (NaN with one chain)."""
    ess: float
    """Smallest bulk effective sample size over the latent coordinates, chains pooled."""
    restarted: dict
    """``{chain: why}``: chains whose warm-up was run again (a warm run's)."""
    stranded: dict
    """``{chain: why}``: chains still stranded after their restarts."""
    verdict: str

    def __str__(self) -> str:
        lines = [f"{'chain':>6} {'divergent':>10} {'step size':>10} {'restarted':>10}"]
        for k in range(self.step_size.size):
            divergent = "-" if np.isnan(self.divergences[k]) else f"{int(self.divergences[k])}"
            restarted = "stranded" if k in self.stranded else (
                "yes" if k in self.restarted else "")
            lines.append(f"{k:>6} {divergent:>10} {self.step_size[k]:>10.3g} {restarted:>10}")
        lines.append(f"r_hat {self.r_hat:.3f}   ess {self.ess:.0f}   draws per chain "
                     f"{self.num_samples}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)


def nuts_summary(run) -> NUTSSummary:
    """
    A summary of a NUTS run with a verdict: divergent transitions and step size per
    chain, the largest split R-hat and the smallest bulk ESS over all latent
    coordinates (NumPyro's own diagnostics), and the chains a warm run restarted or
    left stranded.

    :param run: the result of :meth:`~numpyro_ensemble.NUTSWarmStart.run`, or a
        NumPyro ``MCMC`` after ``run`` (collect ``extra_fields=("diverging",)`` for
        the divergences).
    :return: :class:`NUTSSummary`.
    """
    mcmc = getattr(run, "mcmc", run)
    if not isinstance(mcmc, MCMC):
        raise TypeError(
            f"nuts_summary: run must be the result of NUTSWarmStart.run or a NumPyro MCMC "
            f"after run, got {type(run).__name__}."
        )
    if mcmc.last_state is None:
        raise ValueError("nuts_summary: the MCMC has not run yet; call mcmc.run first.")
    restarted = dict(getattr(run, "restarted", {}))
    stranded = dict(getattr(run, "stranded", {}))
    samples = mcmc.get_samples(group_by_chain=True)
    K = mcmc.num_chains
    latent = [np.asarray(v, np.float64).reshape(K, np.shape(v)[1], -1)
              for v in samples.values()]
    by_chain = np.concatenate(latent, axis=-1)  # (K, N, D)
    num_samples = by_chain.shape[1]
    ess = float(np.nanmin(effective_sample_size(by_chain))) if by_chain.size else np.nan
    r_hat = float(np.nanmax(split_gelman_rubin(by_chain))) if K > 1 else np.nan
    fields = mcmc.get_extra_fields(group_by_chain=True)
    if "diverging" in fields:
        divergences = np.asarray(fields["diverging"]).reshape(K, -1).sum(axis=1).astype(float)
    else:
        divergences = np.full(K, np.nan)
    state = mcmc.post_warmup_state if mcmc.post_warmup_state is not None else mcmc.last_state
    step_size = np.asarray(state.adapt_state.step_size, np.float64).reshape(K)
    return NUTSSummary(
        divergences=divergences, step_size=step_size, num_samples=num_samples,
        r_hat=r_hat, ess=ess, restarted=restarted, stranded=stranded,
        verdict=_verdict(divergences, num_samples, r_hat, ess, restarted, stranded),
    )


def _verdict(divergences, num_samples, r_hat, ess, restarted, stranded) -> str:
    parts = []
    if stranded:
        parts.append(
            f"chains {sorted(stranded)} are stranded (" + "; ".join(
                f"{k}: {why}" for k, why in sorted(stranded.items())) + "): do not use their "
            "draws; drop them (the others' draws are NumPyro's own) or start again from "
            "more members"
        )
    fine = [k for k in restarted if k not in stranded]
    if fine:
        parts.append(f"chains {sorted(fine)} were stranded after warm-up and restarted "
                     f"from another start")
    if np.isnan(r_hat):
        parts.append("one chain: no R-hat, run more chains to check mixing")
    elif r_hat <= R_HAT_LIMIT:
        parts.append(f"the chains agree (r_hat {r_hat:.3f} <= {R_HAT_LIMIT})")
    else:
        parts.append(f"r_hat {r_hat:.3f} > {R_HAT_LIMIT}: the chains disagree; run longer or "
                     f"look at the chains separately (to_arviz)")
    total = np.nansum(divergences)
    if total > 0:
        worst = int(np.nanargmax(divergences))
        parts.append(
            f"{int(total)} divergent transitions (chain {worst}: "
            f"{int(divergences[worst])} of {num_samples}): draws near them may be biased; "
            f"raise target_accept_prob or reparameterize the model"
        )
    elif np.isnan(divergences).all():
        parts.append("divergences not collected (extra_fields=('diverging',))")
    if np.isfinite(ess) and ess < ESS_PER_CHAIN * divergences.size:
        parts.append(f"ess {ess:.0f} < {ESS_PER_CHAIN} per chain: draw more")
    return "; ".join(parts) + "."
