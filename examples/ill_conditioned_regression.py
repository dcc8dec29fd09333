# %% [markdown]
# # An ill-conditioned regression: L-BFGS, Laplace and warm NUTS
#
# A linear regression is as easy as posteriors get, until a predictor is left
# unscaled. This tutorial regresses children's test scores on their mothers' IQ
# (about 100, give or take 15) and fits the posterior four ways: the `EnsembleSVI`
# with Adam that one writes first, which stops far from the posterior, and whose
# `ensemble_summary` says so; an `EnsembleMAP` (L-BFGS) whose points become
# Laplace approximations (`laplace_members`), importance-weighted; NUTS with
# NumPyro's defaults; and NUTS warmed up by the Laplace members
# (`nuts_warm_start`). It compares them with the exact posterior and with each
# other in ArviZ, and counts what each cost in wall time and gradient evaluations.
# It runs with ArviZ 0.x (`InferenceData`) and ArviZ 1.x (`DataTree`).
#
# Run it with `python examples/ill_conditioned_regression.py` (about three minutes
# on two CPU cores), or with `--quick` (small sizes; about a minute and a half,
# most of it compiling). Figures and tables are written to `--out-dir` (default: a new
# temporary directory; `--out-dir docs/figures` regenerates the ones shown here).

# %%
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import arviz as az
import jax
from jax import random
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO, log_likelihood
from numpyro.infer.autoguide import AutoNormal
import optax
import pandas as pd

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    ensemble_summary,
    importance_weights,
    laplace_members,
    nuts_warm_start,
    sample_posterior,
    to_arviz,
)

AZ_MAJOR = int(az.__version__.split(".")[0])
DIMS = {"score": ["kids"]}

# %% [markdown]
# ## The model and the data
#
# Two hundred children; their mothers' IQ is `iq = 100 + 15 z` and their score
# `26 + 0.6 iq + 18 eps` (`z` and `eps` standard normal). The model has wide priors
# on the intercept `a` and the slope `b`, and a half-normal noise scale `sigma`:
#
# $$a \sim \mathcal N(0, 100),\quad b \sim \mathcal N(0, 10),\quad
# \sigma \sim \mathcal N^+(0, 50),\quad
# \text{score}_i \sim \mathcal N(a + b\, \text{iq}_i, \sigma).$$
#
# The intercept is the score of a child whose mother has IQ 0, 100 IQ points (6.7
# standard deviations) from any data. The data pin down the score at IQ 100,
# `a + 100 b`, to about 1.2 points (`sigma / sqrt(200)`), but `a` alone only to
# about 7: a smaller slope with a larger intercept fits almost as well. The
# posterior of `(a, b)` is a long, narrow ridge along `a + 100 b = const`, with a
# correlation of -0.986, and the posterior sds of `a` and `b` differ by a factor of
# 100. Centring and scaling `iq` would remove both problems; this tutorial is
# about what the ensemble tools do when nobody did.
#
# With `sigma` fixed, the posterior of `(a, b)` is Gaussian (normal priors are
# conjugate to a normal likelihood), so the exact posterior is a one-dimensional
# integral over `sigma`: `exact_posterior` computes it on a grid of 20,000 values,
# in float64 NumPy. It is the reference for every fit below: `a` 22.88 ± 7.42,
# `b` 0.6080 ± 0.0728, `sigma` 17.45 ± 0.88.

# %%
def simulate(num_kids=200, seed=0):
    z_key, eps_key = random.split(random.key(seed))
    iq = 100.0 + 15.0 * random.normal(z_key, (num_kids,))
    score = 26.0 + 0.6 * iq + 18.0 * random.normal(eps_key, (num_kids,))
    return iq, score


def model(iq, score=None):
    a = numpyro.sample("a", dist.Normal(0.0, 100.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(50.0))
    with numpyro.plate("kids", iq.shape[0]):
        numpyro.sample("score", dist.Normal(a + b * iq, sigma), obs=score)


def exact_posterior(iq, score, prior_sd=(100.0, 10.0), sigma_scale=50.0):
    """Posterior means, sds and the correlation of a and b, integrating sigma on a grid:
    given sigma, (a, b) is Gaussian with precision P = S0^-1 + X'X / sigma^2."""
    X = np.stack([np.ones(len(iq)), np.asarray(iq, np.float64)], axis=1)
    y = np.asarray(score, np.float64)
    sigma = np.linspace(0.05, 3 * y.std(), 20_000)
    s2 = sigma[:, None, None] ** 2
    precision = np.diag(1.0 / np.square(prior_sd)) + X.T @ X / s2
    cov = np.linalg.inv(precision)
    mean = np.einsum("sij,sj->si", cov, (X.T @ y) / s2[:, :, 0])
    # log p(y | sigma), b integrated out, plus the half-normal log prior of sigma
    log_post = (
        -len(y) * np.log(sigma)
        - 0.5 * np.linalg.slogdet(precision)[1]
        - 0.5 * (y @ y / sigma**2 - np.einsum("si,si->s", mean, (X.T @ y) / s2[:, :, 0]))
        - 0.5 * (sigma / sigma_scale) ** 2
    )
    w = np.exp(log_post - log_post.max())
    w /= w.sum()
    m = w @ mean
    second = np.einsum("s,sij->ij", w, cov + mean[:, :, None] * mean[:, None, :])
    c = second - np.outer(m, m)
    sd = np.sqrt(np.diag(c))
    sigma_mean = w @ sigma
    return {
        "mean": {"a": m[0], "b": m[1], "sigma": sigma_mean},
        "sd": {"a": sd[0], "b": sd[1], "sigma": np.sqrt(w @ (sigma - sigma_mean) ** 2)},
        "corr": c[0, 1] / (sd[0] * sd[1]),
    }


def timed(f):
    """``f()`` and its wall time in seconds, its arrays computed (jax.block_until_ready)."""
    start = time.perf_counter()
    out = jax.block_until_ready(f())
    return out, time.perf_counter() - start


# %% [markdown]
# ## 1. The Adam ensemble one writes first
#
# Four `AutoNormal` members, Adam with learning rate 0.01, 2,000 steps, as in many
# SVI examples. The members end far from the posterior: in the table under *All
# fits in ArviZ* below, their pooled draws have `a` 0.38 ± 1.05 and `b`
# 0.824 ± 0.042, where the exact posterior has 22.88 ± 7.42 and 0.608 ± 0.073. Adam
# changes each coordinate by about its learning rate per step at most, so `a` ≈ 23
# is more than 2,000 steps from a start in (-2, 2), even if every step went that
# way. The members sit where the ridge continues to `a` ≈ 0, so `a + 100 b` is
# about right; the scatter plot below shows them beside the posterior.
#
# `ensemble_summary` says the members cannot be used. It fits a line to each
# member's losses over the last 10% of the steps (all four still fall), finds four
# modes, an R-hat of 9.5 with members as chains, and importance weights that put
# all the mass on one member with Pareto k 5.5. The full run prints:
#
# ```text
# modes: 4   r_hat (max, members as chains): 9.535   ess (min): 2.0   pareto k: 5.46
# verdict: members [0, 1, 2, 3] have not converged (their loss still falls over the last 10% of steps, or a Newton step would lower it further: 'to go'): do not use their draws yet; run more steps, or start from L-BFGS points (EnsembleMAP's default optimizer) or their Laplace approximations (laplace_members), or rescale the model's inputs.
# ```
#
# Its advice is the next section: L-BFGS points and their Laplace approximations.
#
# ![The posterior of (a, b): warm NUTS draws, the importance-weighted Laplace draws and the Adam members](../figures/ill_conditioned_ridge.png)

# %%
def fit_adam(iq, score, ensemble_size, steps):
    svi = EnsembleSVI(model, AutoNormal(model), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=ensemble_size)
    result, seconds = timed(lambda: svi.run(random.key(0), steps, iq, score, progress_bar=False))
    return svi, result, seconds


def plot_ridge(adam_draws, laplace_draws, nuts_draws, path):
    """Draws of (a, b): warm NUTS, the weighted Laplace mixture, each Adam member."""
    import matplotlib.pyplot as plt

    fig, (wide, zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax in (wide, zoom):
        ax.scatter(nuts_draws["a"], nuts_draws["b"], s=3, c="0.55", alpha=0.4,
                   label="NUTS, warm")
        ax.scatter(laplace_draws["a"], laplace_draws["b"], s=3, c="tab:blue", alpha=0.25,
                   label="Laplace, weighted")
        ax.set_xlabel("a (intercept)")
        ax.set_ylabel("b (slope)")
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    for e in range(np.shape(adam_draws["a"])[0]):
        wide.scatter(adam_draws["a"][e], adam_draws["b"][e], s=3, alpha=0.5,
                     c=colors[e % len(colors)], label=f"Adam member {e}")
    wide.set_title("all fits")
    zoom.set_title("the posterior: NUTS and the weighted Laplace draws")
    wide.legend(loc="upper right", markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# %% [markdown]
# ## 2. L-BFGS points and their Laplace approximations
#
# `EnsembleMAP` without an optimizer runs L-BFGS (`optax.lbfgs`, with its zoom
# linesearch) from a different start for each member, and stops a member once its
# gradient is small or its loss stops falling. Its curvature estimate takes care
# of the scales and the correlation: the four members stop after 192 iterations
# in all, at the same point. `laplace_members` puts a Gaussian at each point, with
# the inverse Hessian of the negative log joint as its covariance (in the
# unconstrained space, where `sigma` is `log sigma`). This posterior is nearly
# Gaussian, so that is most of the answer, the correlation included.
# `importance_weights` draws from every member (1,000 draws each) and weights each
# draw by `p(y, z) / q_mix(z)`, PSIS-smoothed; its Pareto k, 0.25, is well below
# 0.7, so the weighted draws can be trusted, and `sample_posterior(...,
# weights=weights)` resamples them into plain draws: `a` 22.65 ± 7.27, `b`
# 0.611 ± 0.071, within 0.04 exact sds of the exact means.
#
# `ensemble_summary` takes the Laplace members and their weights. The members have
# no losses of their own; given the L-BFGS run's result with the Laplace params
# (`result._replace(params=laplace_params)`), it checks convergence on the L-BFGS
# losses. The full run prints:
#
# ```text
# modes: 1   r_hat (max, members as chains): 0.999   ess (min): 430.6   pareto k: 0.25
# verdict: the members agree (one mode); importance-weighted draws can be trusted (k 0.25 < 0.7).
# ```
#
# What each fit cost, in one process on two CPU cores (shared with other jobs
# while the page's run was made). Wall times are those of first calls,
# compilation included, which is most of them at this size:
#
# --8<-- "figures/ill_conditioned_cost.md"
#
# The gradient evaluations of the two ensembles are lower bounds: one per member
# and Adam step, one per member and L-BFGS iteration (whose linesearch evaluates
# the gradient at least once; the Hessians and the importance weights' densities
# are not counted). Those of NUTS are its leapfrog steps, warm-up and draws.

# %%
def fit_laplace(iq, score, ensemble_size, steps, num_draws):
    """L-BFGS points, their Laplace members, importance weights and weighted draws."""
    def fit():
        ens = EnsembleMAP(model, ensemble_size=ensemble_size)
        result = ens.run(random.key(1), steps, iq, score, progress_bar=False)
        laplace, laplace_params = laplace_members(ens, result.params, iq, score)
        weights = importance_weights(laplace, random.key(2), laplace_params, iq, score,
                                     num_samples=num_draws)
        return ens, result, laplace, laplace_params, weights

    (ens, result, laplace, laplace_params, weights), seconds = timed(fit)
    iterations = int(np.asarray(ens.get_extra_fields()["stopped_at"]).sum())
    return result, laplace, laplace_params, weights, seconds, iterations


# %% [markdown]
# ## 3. NUTS warmed up by the ensemble
#
# NUTS with NumPyro's defaults (1,000 warm-up iterations, a diagonal mass matrix)
# spends its warm-up learning the posterior's scales; the correlation stays, and
# each draw takes a long trajectory along the ridge. `nuts_warm_start` hands NUTS
# what the Laplace members already know: starts (one chain per member, heaviest
# first), a dense inverse mass matrix (the covariance of the weighted mixture, in
# the unconstrained space), a step size for it and a warm-up schedule. With
# importance weights of Pareto k below 0.5 (0.25 here; stricter than the 0.7 for
# trusting the weighted draws) the metric is kept, and 150 warm-up iterations tune
# only the step size. In the metric's coordinates the posterior is close to a
# round Gaussian, and a few leapfrog steps make a draw.
#
# Both runs make 1,000 draws in each of two chains, run one after the other.
# Gradient evaluations are NUTS's leapfrog steps (NumPyro's `num_steps`), summed
# over the warm-up (`MCMC.warmup(..., collect_warmup=True)`) and the draws
# (`MCMC.run` from the warmed-up state), as `benchmarks/nuts_warmstart.py` counts
# them. In the full run the default NUTS took 120,587 (79,023 of them in the
# warm-up; about 21 per draw after it), the warm NUTS 9,985 (1,431; about 4 per
# draw), 12 times fewer, and its draws have the larger bulk ESS, 1,970 against
# 661 (the smallest over `a`, `b` and `sigma`; R-hat 1.001 and 1.007). In wall
# time (the table above) the two NUTS runs are comparable, 43.0 s and 41.1 s,
# because compiling takes most of it; with the L-BFGS fit, the Laplace members
# and the weights (77.0 s) before it, the warm route took nearly three times as
# long as the default one here (the machine was running three other jobs). The gradient evaluations are what grows with the data and
# the model; this run measured them once, with one seed.

# %%
def run_nuts(iq, score, key, num_warmup, num_samples, num_chains, init_params=None,
             **nuts_kwargs):
    """NUTS's warm-up then its draws, counting leapfrog steps in each."""
    mcmc = MCMC(NUTS(model, **nuts_kwargs), num_warmup=num_warmup, num_samples=num_samples,
                num_chains=num_chains, chain_method="sequential", progress_bar=False)

    def go():
        mcmc.warmup(key, iq, score, extra_fields=("num_steps",), collect_warmup=True,
                    init_params=init_params)
        warmup = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
        # run continues from post_warmup_state: no second warm-up
        mcmc.run(mcmc.post_warmup_state.rng_key, iq, score, extra_fields=("num_steps",))
        return warmup

    warmup_grads, seconds = timed(go)
    draws_grads = int(np.asarray(mcmc.get_extra_fields()["num_steps"]).sum())
    return mcmc, {"warm-up": warmup_grads, "draws": draws_grads}, seconds


def run_warm_nuts(iq, score, laplace, laplace_params, weights, num_samples, num_chains):
    def warm_start():
        return nuts_warm_start(laplace, random.key(4), laplace_params, iq, score,
                               weights=weights, num_chains=num_chains)

    warm, start_seconds = timed(warm_start)
    mcmc, grads, seconds = run_nuts(iq, score, random.key(5), warm.num_warmup, num_samples,
                                    warm.num_chains, warm.init_params, **warm.nuts_kwargs)
    return warm, mcmc, grads, start_seconds + seconds


# %% [markdown]
# ## All fits in ArviZ
#
# `to_arviz` exports an ensemble with the members as chains (1,000 draws from each
# member's guide), with the pointwise log-likelihood; `az.from_numpyro(mcmc,
# log_likelihood=True)` exports the NUTS runs. The importance-resampled Laplace
# draws are plain draws, cut into four chains, with their pointwise log-likelihood
# from `numpyro.infer.log_likelihood` (`pooled_data`). That makes five fits: the
# Adam ensemble, the Laplace members with equal weights, the same
# importance-weighted, and the two NUTS runs. `az.summary` of each, and the exact
# posterior:
#
# --8<-- "figures/ill_conditioned_table.md"
#
# `ess_bulk` and `r_hat` are the smallest and the largest over `a`, `b` and
# `sigma`. For an ensemble, R-hat with members as chains measures how much the
# members disagree: 2.8 for the Adam ensemble, about as large as ArviZ's
# rank-normalised R-hat gets when four chains do not overlap at all
# (`ensemble_summary` reports NumPyro's split R-hat, without rank normalisation:
# 9.5). The Laplace members agree (R-hat 1.001). Their means of `a` and `b` are
# within 0.04 exact sds of the exact ones, with or without the weights, and their
# sds within 2.5%; the weights move the mean of `sigma` from 17.30 to 17.45, the
# exact value (a Gaussian in `log sigma` is not quite the posterior of `sigma`).
# The resampled draws' `ess_bulk` counts a draw picked twice as two; the importance
# weights' own ESS is 3,861 of the 4,000 draws. The two NUTS runs' means of `a`
# and `b` are within 0.4 Monte Carlo standard errors (`sd / sqrt(ess_bulk)`) of the
# exact ones.
#
# The forest plots show 94% intervals (thick lines: 50%) of `a` and `b`:
#
# ![Forest plot of a under the five fits](../figures/ill_conditioned_forest_a.png)
#
# ![Forest plot of b under the five fits](../figures/ill_conditioned_forest_b.png)

# %%
def pooled_data(draws, loglik, num_chains):
    """ArviZ data of plain (resampled, so exchangeable) draws cut into ``num_chains``
    chains, with the pointwise log-likelihood."""
    def chains(v):
        v = np.asarray(v)
        return v.reshape((num_chains, -1) + v.shape[1:])

    posterior = {k: chains(v) for k, v in draws.items()}
    loglik = {k: chains(v) for k, v in loglik.items()}
    if AZ_MAJOR >= 1:
        return az.from_dict({"posterior": posterior, "log_likelihood": loglik}, dims=DIMS)
    return az.from_dict(posterior=posterior, log_likelihood=loglik, dims=DIMS)


def posterior_table(fits, exact, var_names=("a", "b", "sigma")):
    """Mean and sd of each variable, the smallest ess_bulk and the largest r_hat, one
    row per fit (``az.summary``), and the exact posterior as the last row."""
    rows = {}
    for name, data in fits.items():
        summary = az.summary(data, var_names=list(var_names), round_to="none")
        row = {}
        for v in var_names:
            row[f"{v} mean"] = float(summary.loc[v, "mean"])
            row[f"{v} sd"] = float(summary.loc[v, "sd"])
        row["ess_bulk"] = float(summary["ess_bulk"].min())
        row["r_hat"] = float(summary["r_hat"].max())
        rows[name] = row
    rows["exact"] = {**{f"{v} {s}": exact[s][v] for v in var_names for s in ("mean", "sd")},
                     "ess_bulk": np.nan, "r_hat": np.nan}
    return pd.DataFrame(rows).T


def plot_forest(fits, var_name, path):
    """A forest plot of one variable under every fit (one plot per variable: a and b
    differ in scale by a factor of 100, and ArviZ 1.x shares the x axis)."""
    if AZ_MAJOR >= 1:
        # The fits have different numbers of chains and draws; ArviZ pads them with
        # NaN when it stacks them along "model", so the statistics skip NaN.
        stats = {part: {"skipna": True} for part in ("trunk", "twig", "point_estimate")}
        pc = az.plot_forest(fits, var_names=[var_name], combined=True, backend="matplotlib",
                            stats=stats)
        pc.add_legend("model")
        pc.savefig(path, dpi=100, bbox_inches="tight")
    else:
        axes = az.plot_forest(list(fits.values()), model_names=list(fits), var_names=[var_name],
                              combined=True, figsize=(9, 3.5), show=False)
        _save(np.ravel(axes)[0].figure, path)


def _save(figure, path):
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


# %% [markdown]
# `az.compare` ranks the fits by their expected log pointwise predictive density
# (`elpd`), estimated by PSIS-LOO from each fit's `log_likelihood` group. ArviZ 0.x
# and 1.x name the columns differently (`elpd_loo`/`elpd`, `p_loo`/`p`) and give
# `elpd_diff` opposite signs; the table uses the 1.x names and sign (each fit's
# `elpd` minus the best one's). `k_max` is the largest Pareto k of each fit's
# PSIS-LOO: above 0.7 the estimate for that child is unreliable.
#
# The Adam ensemble is left out. PSIS-LOO reweights a fit's draws to leave out one
# child at a time, which assumes the draws are near the posterior; the Adam
# members' are not, and their log-likelihoods differ by thousands between members.
# For the full run's Adam ensemble ArviZ 0.x returns NaN for `elpd` (one Pareto k
# is infinite), and ArviZ 1.x an `elpd` about 200,000 below the others' -856,
# with Pareto k NaN for every child: neither is an estimate.
#
# The four other fits predict alike: their `elpd` differ by at most 0.17 over 200
# children, against a standard error `se` of about 9 for each. The differences
# are of about one to three standard errors `dse` (the fits' pointwise predictions
# are nearly the same, so `dse` is small), in one run with one seed. The stacking
# `weight` among fits that predict alike says nothing about which is better.
#
# --8<-- "figures/ill_conditioned_compare.md"

# %%
def compare_fits(fits):
    """``az.compare`` of the fits, with the columns named as in ArviZ 1.x, and the
    largest Pareto k of each fit's PSIS-LOO."""
    raw = az.compare(fits, round_to="none") if AZ_MAJOR >= 1 else az.compare(fits)
    table = raw.rename(columns={"elpd_loo": "elpd", "p_loo": "p"})
    table = table[["rank", "elpd", "se", "p", "elpd_diff", "dse", "weight"]].astype(float)
    table["rank"] = table["rank"].astype(int)
    table["elpd_diff"] = table["elpd"] - table["elpd"].max()  # the sign differs in 0.x and 1.x
    table["k_max"] = [float(az.loo(fits[name], pointwise=True).pareto_k.max())
                      for name in table.index]
    return raw, table


def cost_table(rows):
    """``{method: (seconds, gradient evaluations, of them in the warm-up)}`` as a
    DataFrame; the evaluations are counts or lower bounds ("≥ n"), as text."""
    return pd.DataFrame.from_dict(
        {name: {"wall time (s)": seconds, "gradient evaluations": str(grads),
                "in the warm-up": "–" if warmup is None else str(warmup)}
         for name, (seconds, grads, warmup) in rows.items()},
        orient="index",
    )


def markdown_table(df, digits=2):
    """A pipe table of ``df``, without ``tabulate``; NaN as a dash. ``digits`` is one
    number of decimals for all columns or a ``{column: decimals}`` dict (default 2)."""
    def cell(v, column):
        if isinstance(v, (float, np.floating)):
            if np.isnan(v):
                return "–"
            d = digits.get(column, 2) if isinstance(digits, dict) else digits
            return f"{v:.{d}f}"
        return str(v)

    names = [str(c) for c in df.columns]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for index, *row in df.itertuples():
        cells = (cell(v, c) for v, c in zip(row, names, strict=True))
        lines.append(f"| {index} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# %% [markdown]
# ## Running it
#
# `main` runs the steps above, prints the tables and both `ensemble_summary`
# reports, and writes the figures and tables. `--quick` uses fewer Adam steps,
# draws and NUTS iterations, enough to check that everything runs; the figures and
# tables on this page come from the full run. The flags `--adam-steps`,
# `--lbfgs-steps`, `--num-draws`, `--num-warmup` and `--num-samples` override
# either.
#
# What the run shows, on this one posterior and seed: `ensemble_summary` told the
# unconverged Adam ensemble from the converged L-BFGS one; L-BFGS points, their
# Laplace approximations and importance weights gave the exact posterior's means
# and sds, with a Pareto k that says they can be trusted, without rescaling `iq`;
# and the same members gave NUTS a metric with which it needed 12 times fewer
# gradient evaluations. Rescaling the inputs remains the first thing to try when
# one can.

# %%
FULL = {"adam_steps": 2000, "lbfgs_steps": 500, "num_draws": 1000, "num_warmup": 1000,
        "num_samples": 1000}
QUICK = {"adam_steps": 300, "lbfgs_steps": 200, "num_draws": 100, "num_warmup": 150,
         "num_samples": 150}
ENSEMBLE_SIZE = 4
NUM_CHAINS = 2


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="An ill-conditioned regression: Adam, L-BFGS + Laplace, NUTS and warm NUTS.")
    parser.add_argument("--quick", action="store_true", help="small sizes: runs in seconds")
    parser.add_argument("--adam-steps", type=int)
    parser.add_argument("--lbfgs-steps", type=int)
    parser.add_argument("--num-draws", type=int, help="draws per member (weights, ArviZ)")
    parser.add_argument("--num-warmup", type=int, help="the default NUTS's warm-up")
    parser.add_argument("--num-samples", type=int, help="NUTS draws per chain")
    parser.add_argument("--out-dir", default=None,
                        help="where figures and tables go (default: a new temporary directory; "
                             "docs/figures regenerates the committed ones)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, default in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    out_dir = pathlib.Path(args.out_dir or tempfile.mkdtemp(prefix="ill_conditioned-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")

    iq, score = simulate()
    exact = exact_posterior(iq, score)

    # 1. Adam
    svi, adam_result, adam_seconds = fit_adam(iq, score, ENSEMBLE_SIZE, args.adam_steps)
    adam_summary = ensemble_summary(svi, random.key(10), adam_result, iq, score)
    # 2. L-BFGS, Laplace, importance weights
    lbfgs_result, laplace, laplace_params, weights, laplace_seconds, iterations = fit_laplace(
        iq, score, ENSEMBLE_SIZE, args.lbfgs_steps, args.num_draws)
    resampled = sample_posterior(laplace, random.key(3), laplace_params, iq, score,
                                 weights=weights)
    laplace_summary = ensemble_summary(laplace, random.key(11),
                                       lbfgs_result._replace(params=laplace_params), iq, score,
                                       weights=weights)
    # 3. NUTS, default and warm
    default_mcmc, default_grads, default_seconds = run_nuts(
        iq, score, random.key(6), args.num_warmup, args.num_samples, NUM_CHAINS)
    warm, warm_mcmc, warm_grads, warm_seconds = run_warm_nuts(
        iq, score, laplace, laplace_params, weights, args.num_samples, NUM_CHAINS)

    # 4. ArviZ
    n = args.num_draws
    fits = {
        "Adam ensemble": to_arviz(svi, random.key(7), adam_result, iq, score, num_samples=n,
                                  dims=DIMS),
        "Laplace members": to_arviz(laplace, random.key(8), laplace_params, iq, score,
                                    num_samples=n, dims=DIMS),
        "Laplace, weighted": pooled_data(resampled, log_likelihood(model, resampled, iq, score),
                                         ENSEMBLE_SIZE),
        "NUTS, default": az.from_numpyro(default_mcmc, log_likelihood=True, dims=DIMS),
        "NUTS, warm": az.from_numpyro(warm_mcmc, log_likelihood=True, dims=DIMS),
    }
    table = posterior_table(fits, exact)
    # PSIS-LOO needs draws near the posterior; the Adam members' are not (see the text)
    trusted = {k: v for k, v in fits.items() if k != "Adam ensemble"}
    raw_compare, compare = compare_fits(trusted)
    cost = cost_table({
        f"Adam ensemble ({args.adam_steps} steps)":
            (adam_seconds, f"≥ {ENSEMBLE_SIZE * args.adam_steps}", None),
        f"L-BFGS ({iterations} iterations) + Laplace + weights":
            (laplace_seconds, f"≥ {iterations}", None),
        f"NUTS, default ({args.num_warmup} warm-up)":
            (default_seconds, sum(default_grads.values()), default_grads["warm-up"]),
        f"NUTS, warm ({warm.num_warmup} warm-up), after the Laplace fit":
            (warm_seconds, sum(warm_grads.values()), warm_grads["warm-up"]),
    })

    weighted_mean = {}
    w = np.exp(np.asarray(weights.log_weights, np.float64)).ravel()
    for v in ("a", "b", "sigma"):
        weighted_mean[v] = float(w @ np.asarray(weights.samples[v], np.float64).ravel() / w.sum())

    print(f"ill-conditioned regression: exact posterior a {exact['mean']['a']:.2f} "
          f"+- {exact['sd']['a']:.2f}, b {exact['mean']['b']:.4f} +- {exact['sd']['b']:.4f}, "
          f"sigma {exact['mean']['sigma']:.2f} +- {exact['sd']['sigma']:.2f}, "
          f"corr(a, b) {exact['corr']:.3f}")
    print(f"Adam ensemble (E={ENSEMBLE_SIZE}, {args.adam_steps} steps):")
    print(adam_summary)
    print(f"Laplace members of L-BFGS points ({iterations} iterations over {ENSEMBLE_SIZE} "
          f"members), importance-weighted (ESS {weights.ess:.0f} of "
          f"{ENSEMBLE_SIZE * args.num_draws} draws):")
    print(laplace_summary)
    print("wall times (first calls, compilation included, one process) and gradient evaluations:")
    print(cost.to_string(float_format=lambda v: f"{v:7.1f}"))
    print("posteriors (az.summary; ess_bulk: smallest, r_hat: largest):")
    print(table.to_string(float_format=lambda v: f"{v:8.3f}"))
    print("az.compare (PSIS-LOO):")
    print(compare.to_string(float_format=lambda v: f"{v:7.2f}"))

    paths = {"ridge": out_dir / "ill_conditioned_ridge.png",
             "forest_a": out_dir / "ill_conditioned_forest_a.png",
             "forest_b": out_dir / "ill_conditioned_forest_b.png"}
    adam = fits["Adam ensemble"]["posterior"]  # (member, draw); InferenceData and DataTree
    plot_ridge({v: np.asarray(adam[v]) for v in ("a", "b")},
               {k: np.asarray(v) for k, v in resampled.items()},
               {k: np.asarray(v) for k, v in warm_mcmc.get_samples().items()}, paths["ridge"])
    plot_forest(fits, "a", paths["forest_a"])
    plot_forest(fits, "b", paths["forest_b"])
    paths["table"] = out_dir / "ill_conditioned_table.md"
    paths["table"].write_text(markdown_table(
        table, {"a mean": 2, "a sd": 2, "b mean": 4, "b sd": 4, "sigma mean": 2, "sigma sd": 2,
                "ess_bulk": 0, "r_hat": 3}))
    paths["cost"] = out_dir / "ill_conditioned_cost.md"
    paths["cost"].write_text(markdown_table(cost, 1))
    paths["compare"] = out_dir / "ill_conditioned_compare.md"
    paths["compare"].write_text(markdown_table(compare))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {
        "exact": exact, "table": table, "cost": cost, "compare": compare,
        "adam_summary": adam_summary, "laplace_summary": laplace_summary,
        "weights": weights, "weighted_mean": weighted_mean, "warm": warm,
        "grads": {"default": default_grads, "warm": warm_grads},
        "seconds": {"adam": adam_seconds, "laplace": laplace_seconds,
                    "default NUTS": default_seconds, "warm NUTS": warm_seconds},
        "lbfgs_iterations": iterations, "fits": fits, "paths": paths,
    }


if __name__ == "__main__":
    main()
