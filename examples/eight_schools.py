# %% [markdown]
# # Eight schools: an ensemble next to NUTS
#
# This tutorial fits the non-centered eight-schools model with an 8-member
# `EnsembleSVI` (`AutoNormal` guides), looks at the members as ArviZ chains,
# reweights their draws with importance weights, starts NUTS chains from the
# members, and compares the three posteriors: means and standard deviations, a
# forest plot, and PSIS-LOO with `az.compare`. It runs with ArviZ 0.x
# (`InferenceData`) and ArviZ 1.x (`DataTree`).
#
# Run it with `python examples/eight_schools.py` (about a minute and a half on two
# CPU cores), or `python examples/eight_schools.py --quick` (small sizes; under a
# minute, most of it compiling). Figures and tables are written to `--out-dir`
# (default: a new temporary directory; `--out-dir docs/figures` regenerates the ones
# shown here).

# %%
from __future__ import annotations

import argparse
import pathlib
import tempfile

import arviz as az
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO, log_likelihood
from numpyro.infer.autoguide import AutoNormal
import optax
import pandas as pd

from numpyro_ensemble import (
    EnsembleSVI,
    ensemble_summary,
    importance_weights,
    mcmc_init_params,
    sample_posterior,
    to_arviz,
)

AZ_MAJOR = int(az.__version__.split(".")[0])

# %% [markdown]
# ## The model
#
# Eight schools report the estimated effect `y` of a coaching program and its
# standard error `sigma` (Rubin, 1981). The hierarchical model gives each school an
# effect `theta`, drawn around a common mean `mu` with spread `tau`. The
# non-centered form samples `theta_raw ~ Normal(0, 1)` and sets
# `theta = mu + tau * theta_raw`, which removes the funnel between `tau` and
# `theta` that makes the centered form hard for NUTS and for VI alike.

# %%
SCHOOLS = ["Choate", "Deerfield", "Phillips Andover", "Phillips Exeter",
           "Hotchkiss", "Lawrenceville", "St. Paul's", "Mt. Hermon"]
COORDS = {"school": SCHOOLS}
Y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_raw = numpyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_raw)
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


# %% [markdown]
# ## The ensemble fit
#
# `EnsembleSVI` takes the arguments of `numpyro.infer.SVI` plus `ensemble_size`.
# Its `run` fits all members in one compiled `lax.scan`; every leaf of
# `result.params` gains a leading `(E,)` axis. `to_arviz` converts the fit to the
# installed ArviZ's data structure, with **chain `e` holding draws from member
# `e`'s guide**. Besides the posterior it exports the posterior predictive, the
# pointwise log-likelihood (so `az.loo` and `az.compare` work), the observed and
# constant data, and each member's final loss in `sample_stats`.

# %%
def fit_ensemble(ensemble_size, steps, num_samples):
    svi = EnsembleSVI(eight_schools, AutoNormal(eight_schools), optax.adam(1e-2), Trace_ELBO(),
                      ensemble_size=ensemble_size)
    result = svi.run(random.key(0), steps, SIGMA, Y, progress_bar=False)
    ensemble = to_arviz(svi, random.key(1), result, SIGMA, Y, num_samples=num_samples,
                        constant_data={"sigma": SIGMA}, coords=COORDS)
    return svi, result, ensemble


# %% [markdown]
# ## Members as chains
#
# Because members are chains, ArviZ's per-chain plots show how far the members
# agree. Below, each member's marginal of `mu` and `tau` (left) and its rank plot
# (right): the draws of all members are ranked together, and a member whose draws
# sit lower or higher than the pool has a tilted rank histogram (ArviZ 0.x; ArviZ
# 1.x draws rank ECDFs and marks where they leave the band). Here the eight
# members agree: their marginals overlap and their ranks are flat, as for chains
# of a well-mixed sampler. With `--quick` (300 steps) they have not converged yet,
# and the ranks tilt.
#
# Agreement is not accuracy. Every member is the same mean-field approximation,
# and all of them are too narrow in `tau`; the comparison with NUTS below shows it.
#
# ![Members as chains: marginals and rank plots of mu and tau](../figures/eight_schools_members.png)

# %%
def plot_members(ensemble, path):
    """Per-member marginals and rank plots of mu and tau (members as chains)."""
    if AZ_MAJOR >= 1:
        pc = az.plot_rank_dist(ensemble, var_names=["mu", "tau"], compact=False,
                               backend="matplotlib", figure_kwargs={"figsize": (11, 6)})
        pc.add_legend("chain", title="member")
        pc.savefig(path, dpi=100, bbox_inches="tight")
    else:
        axes = az.plot_trace(ensemble, var_names=["mu", "tau"], kind="rank_bars", compact=False,
                             legend=True, figsize=(11, 6), show=False)
        legend = axes[0, 1].get_legend()  # members as chains: 0 to E - 1
        legend.set_loc("upper left")
        legend.set_bbox_to_anchor((1.01, 1.0))
        legend.set_title("member")
        axes[0, 0].figure.tight_layout()
        _save(axes[0, 0].figure, path)


def _save(figure, path):
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


# %% [markdown]
# `ensemble_summary` reports the same numerically: per member the final loss, the
# loss trend over the last steps and the importance weight; for the ensemble the
# number of modes the members fall into, `r_hat` and `ess` with the members as
# chains, the Pareto k of the importance weights, and a verdict. The full run
# prints:
#
# ```text
# modes: 1   r_hat (max, members as chains): 1.009   ess (min): 6680.1   pareto k: 0.56
# verdict: the members agree (one mode); importance-weighted draws can be trusted (k 0.56 < 0.7).
# ```
#
# ## Importance weights
#
# Mean-field VI underestimates posterior spread, here most of all for `tau`. The
# ensemble's members together make a better proposal than any one of them:
# `importance_weights` draws from every member and weights each draw by
# `p(y, z) / q_mix(z)`, with `q_mix` the equal mixture of all members' guides,
# PSIS-smoothed (Pareto k tells whether to trust the result). `sample_posterior`
# with `weights=` resamples the draws in proportion to their weights, which gives
# plain, equally weighted draws. We split them into `E` chains, recompute
# the deterministic `theta`, and add the pointwise log-likelihood of the resampled
# draws (`numpyro.infer.log_likelihood`) so that this fit, too, can go into
# `az.compare`.

# %%
def reweight(svi, result, num_samples):
    weights = importance_weights(svi, random.key(4), result.params, SIGMA, Y,
                                 num_samples=num_samples)
    resampled = sample_posterior(svi, random.key(5), result.params, SIGMA, Y, weights=weights)
    loglik = log_likelihood(eight_schools, resampled, SIGMA, Y)
    return weights, pooled_data(resampled, loglik, svi.ensemble_size)


def pooled_data(draws, loglik, num_chains):
    """ArviZ data of plain (resampled, so exchangeable) draws cut into ``num_chains``
    chains, with theta = mu + tau * theta_raw and the pointwise log-likelihood."""
    def chains(v):
        v = np.asarray(v)
        return v.reshape((num_chains, -1) + v.shape[1:])

    posterior = {k: chains(v) for k, v in draws.items()}
    posterior["theta"] = posterior["mu"][..., None] + posterior["tau"][..., None] * posterior["theta_raw"]
    loglik = {k: chains(v) for k, v in loglik.items()}
    dims = {"theta": ["school"], "theta_raw": ["school"], "obs": ["school"]}
    if AZ_MAJOR >= 1:
        return az.from_dict({"posterior": posterior, "log_likelihood": loglik},
                            coords=COORDS, dims=dims)
    return az.from_dict(posterior=posterior, log_likelihood=loglik, coords=COORDS, dims=dims)


# %% [markdown]
# ## NUTS started from members
#
# `mcmc_init_params` turns members into starting points for MCMC chains of the
# same model: chain `k` starts at one draw from member `k`'s guide (the first
# `num_chains` members), mapped to the unconstrained space, in the format
# `MCMC.run` takes as `init_params`. Chains then start inside the posterior rather
# than at NumPyro's default random initialisation. `chain_method="sequential"`
# compiles one chain's program and reuses it for every chain, which on a CPU
# compiles faster than `"vectorized"` and runs about as fast for a model this small.
# `az.from_numpyro` converts the run; `log_likelihood=True` adds the pointwise
# log-likelihood (ArviZ 1.x leaves it out by default).

# %%
def run_nuts(svi, result, num_chains, num_warmup, num_samples):
    init = mcmc_init_params(svi, random.key(2), result.params, SIGMA, Y, num_chains=num_chains)
    mcmc = MCMC(NUTS(eight_schools), num_warmup=num_warmup, num_samples=num_samples,
                num_chains=num_chains, chain_method="sequential", progress_bar=False)
    mcmc.run(random.key(3), SIGMA, Y, init_params=init)
    return az.from_numpyro(mcmc, log_likelihood=True, coords=COORDS,
                           dims={"theta": ["school"], "theta_raw": ["school"], "obs": ["school"]})


# %% [markdown]
# ## Comparisons
#
# Three posteriors of the same model: the ensemble's draws pooled with equal
# member weights (`ensemble`), the same ensemble importance-weighted
# (`weighted`), and NUTS. Their means and standard deviations, from `az.summary`
# of each:
#
# --8<-- "figures/eight_schools_table.md"
#
# The equally weighted ensemble has the means about right but is too narrow in
# `tau` (and so, a little, in `theta`), as mean-field VI is. The importance-weighted
# draws come much closer to NUTS. The forest plot shows the same with 94%
# intervals (thick lines: 50%):
#
# ![Forest plot of mu, tau and theta under the three fits](../figures/eight_schools_forest.png)

# %%
def posterior_table(fits, var_names):
    """Posterior mean and sd of each variable under each fit, in one DataFrame."""
    columns = {}
    for name, data in fits.items():
        summary = az.summary(data, var_names=var_names)
        columns[(name, "mean")] = summary["mean"]
        columns[(name, "sd")] = summary["sd"]
    return pd.DataFrame(columns)


def plot_forest(fits, var_names, path):
    if AZ_MAJOR >= 1:
        # The fits have different numbers of chains and draws; ArviZ pads them with
        # NaN when it stacks them along "model", so the statistics skip NaN.
        skipna = {"skipna": True}
        pc = az.plot_forest(fits, var_names=var_names, combined=True, backend="matplotlib",
                            stats={"trunk": skipna, "twig": skipna, "point_estimate": skipna})
        pc.add_legend("model")
        pc.savefig(path, dpi=100, bbox_inches="tight")
    else:
        axes = az.plot_forest(list(fits.values()), model_names=list(fits), var_names=var_names,
                              combined=True, show=False)
        _save(np.ravel(axes)[0].figure, path)


# %% [markdown]
# `az.compare` ranks the fits by their expected log pointwise predictive density
# (`elpd`), estimated by PSIS-LOO from each fit's `log_likelihood` group, so an
# ensemble exported by `to_arviz` goes through the same model-comparison tools as
# an MCMC run. ArviZ 0.x and 1.x name the columns differently (`elpd_loo`/`elpd`,
# `p_loo`/`p`) and give `elpd_diff` opposite signs; the table uses the 1.x names
# and sign (each fit's `elpd` minus the best one's). `k_max` is the largest Pareto k
# of each fit's PSIS-LOO: above 0.7 the estimate for that school is unreliable.
#
# The importance-weighted ensemble and NUTS predict alike (`elpd_diff` smaller
# than its standard error `dse`); the plain ensemble is a little worse and has the
# least reliable LOO estimate. All three are fits of one model to eight points,
# so the differences are small, and the stacking `weight` of two fits that
# predict alike says nothing about which is better.
#
# --8<-- "figures/eight_schools_compare.md"
#
# ![az.plot_compare of the three fits](../figures/eight_schools_compare.png)

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


def plot_compare(raw, path):
    if AZ_MAJOR >= 1:
        az.plot_compare(raw, backend="matplotlib").savefig(path, dpi=100, bbox_inches="tight")
    else:
        ax = az.plot_compare(raw, show=False)
        _save(ax.figure, path)


def markdown_table(df, digits=2):
    """A pipe table of ``df`` (column levels joined by spaces), without ``tabulate``."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return f"{v:.{digits}f}"
        return str(v)

    names = [" ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for index, *row in df.itertuples():
        lines.append(f"| {index} | " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


# %% [markdown]
# ## Running it
#
# `main` runs the steps above, prints the tables and `ensemble_summary`, and
# writes the figures and tables. `--quick` uses 4 members, 300 steps and short
# NUTS chains, enough to check that everything runs; the figures and tables on
# this page come from the full run. The flags `--ensemble-size`, `--steps`,
# `--num-chains`, `--num-warmup` and `--num-samples` override either.

# %%
FULL = {"ensemble_size": 8, "steps": 5000, "num_chains": 4, "num_warmup": 500,
        "num_samples": 1000}
QUICK = {"ensemble_size": 4, "steps": 300, "num_chains": 2, "num_warmup": 100,
         "num_samples": 100}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Eight schools: an EnsembleSVI fit next to NUTS, in ArviZ.")
    parser.add_argument("--quick", action="store_true", help="small sizes: runs in seconds")
    parser.add_argument("--ensemble-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--num-chains", type=int)
    parser.add_argument("--num-warmup", type=int)
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--out-dir", default=None,
                        help="where figures and tables go (default: a new temporary directory; "
                             "docs/figures regenerates the committed ones)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, default in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    out_dir = pathlib.Path(args.out_dir or tempfile.mkdtemp(prefix="eight_schools-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")

    svi, result, ensemble = fit_ensemble(args.ensemble_size, args.steps, args.num_samples)
    weights, weighted = reweight(svi, result, args.num_samples)
    nuts = run_nuts(svi, result, args.num_chains, args.num_warmup, args.num_samples)

    fits = {"ensemble": ensemble, "weighted": weighted, "NUTS": nuts}
    var_names = ["mu", "tau", "theta"]
    table = posterior_table(fits, var_names)
    summary = ensemble_summary(svi, random.key(6), result, SIGMA, Y, weights=weights,
                               num_samples=args.num_samples)
    raw_compare, compare = compare_fits(fits)
    print(f"eight schools: EnsembleSVI (E={args.ensemble_size}, {args.steps} steps), the same "
          f"draws importance-weighted, and NUTS ({args.num_chains} chains started from members)")
    print(table.to_string(float_format=lambda v: f"{v:7.2f}"))
    print(summary)
    print("az.compare (PSIS-LOO):")
    print(compare.to_string(float_format=lambda v: f"{v:7.2f}"))

    paths = {what: out_dir / f"eight_schools_{what}.png" for what in ("members", "forest", "compare")}
    plot_members(ensemble, paths["members"])
    plot_forest(fits, var_names, paths["forest"])
    plot_compare(raw_compare, paths["compare"])
    paths["table"] = out_dir / "eight_schools_table.md"
    paths["table"].write_text(markdown_table(table))
    paths["compare_table"] = out_dir / "eight_schools_compare.md"
    paths["compare_table"].write_text(markdown_table(compare))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"table": table, "compare": compare, "summary": summary, "fits": fits,
            "weights": weights, "paths": paths}


if __name__ == "__main__":
    main()
