"""Eight schools: an EnsembleSVI fit and NUTS started from it, side by side in ArviZ.

The non-centered eight-schools model is fit by an 8-member ``EnsembleSVI``
(``AutoNormal``); NUTS chains of the same model then start from ensemble members
(``mcmc_init_params``). The ensemble's draws are pooled twice: with equal member
weights, and with importance weights (``importance_weights``: each draw weighted by
p(y, z) / q_mix(z), the mixture of all members as the proposal), which corrects
much of mean-field VI's error in tau. All three are converted to ArviZ
(``to_arviz``, ``az.from_numpyro``) and shown side by side: posterior means and
sds of mu, tau and theta in one table, ``ensemble_summary``'s per-member report,
and a forest plot saved to PNG.

    python examples/eight_schools.py
    python examples/eight_schools.py --steps 200 --num-samples 100   # quick check
"""

from __future__ import annotations

import argparse

import arviz as az
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_ensemble import (
    EnsembleSVI,
    ensemble_summary,
    importance_weights,
    mcmc_init_params,
    sample_posterior,
    to_arviz,
)

SCHOOLS = ["Choate", "Deerfield", "Phillips Andover", "Phillips Exeter",
           "Hotchkiss", "Lawrenceville", "St. Paul's", "Mt. Hermon"]
Y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
AZ_MAJOR = int(az.__version__.split(".")[0])


def eight_schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", sigma.shape[0]):
        theta_raw = numpyro.sample("theta_raw", dist.Normal(0.0, 1.0))
        theta = numpyro.deterministic("theta", mu + tau * theta_raw)
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensemble-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-warmup", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--out", default="eight_schools_forest.png", help="forest plot ('' for none)")
    args = parser.parse_args(argv)
    coords = {"school": SCHOOLS}

    # 1. The ensemble.
    svi = EnsembleSVI(eight_schools, AutoNormal(eight_schools), optax.adam(1e-2), Trace_ELBO(),
                      ensemble_size=args.ensemble_size)
    result = svi.run(random.key(0), args.steps, SIGMA, Y, progress_bar=False)
    ensemble = to_arviz(svi, random.key(1), result, SIGMA, Y, num_samples=args.num_samples,
                        constant_data={"sigma": SIGMA}, coords=coords)
    weights = importance_weights(svi, random.key(4), result.params, SIGMA, Y,
                                 num_samples=args.num_samples)
    resampled = sample_posterior(svi, random.key(5), result.params, SIGMA, Y, weights=weights)
    weighted = pooled_posterior(resampled, args.ensemble_size, coords)

    # 2. NUTS on the same model, each chain starting from an ensemble member.
    init = mcmc_init_params(svi, random.key(2), result.params, SIGMA, Y,
                            num_chains=args.num_chains)
    mcmc = MCMC(NUTS(eight_schools), num_warmup=args.num_warmup, num_samples=args.num_samples,
                num_chains=args.num_chains, chain_method="vectorized", progress_bar=False)
    mcmc.run(random.key(3), SIGMA, Y, init_params=init)
    nuts = az.from_numpyro(mcmc, coords=coords, dims={"theta": ["school"], "theta_raw": ["school"],
                                                      "obs": ["school"]})

    # 3. Side by side.
    var_names = ["mu", "tau", "theta"]
    fits = {"ensemble": ensemble, "weighted": weighted, "NUTS": nuts}
    table = compare_table(fits, var_names)
    print(f"eight schools: EnsembleSVI (E={args.ensemble_size}, {args.steps} steps), the same "
          f"draws importance-weighted, and NUTS ({args.num_chains} chains started from members)")
    print(table.to_string(float_format=lambda v: f"{v:7.2f}"))
    print(ensemble_summary(svi, random.key(6), result, SIGMA, Y, weights=weights,
                           num_samples=args.num_samples))
    if args.out:
        save_forest(fits, var_names, args.out)
        print(f"saved {args.out}")
    return table


def pooled_posterior(draws, num_chains, coords):
    """ArviZ data of plain (resampled, so exchangeable) draws cut into ``num_chains``
    chains, with theta = mu + tau * theta_raw."""
    posterior = {k: np.asarray(v).reshape((num_chains, -1) + v.shape[1:]) for k, v in draws.items()}
    posterior["theta"] = posterior["mu"][..., None] + posterior["tau"][..., None] * posterior["theta_raw"]
    dims = {"theta": ["school"], "theta_raw": ["school"]}
    if AZ_MAJOR >= 1:
        return az.from_dict({"posterior": posterior}, coords=coords, dims=dims)
    return az.from_dict(posterior=posterior, coords=coords, dims=dims)


def compare_table(fits, var_names):
    """Posterior mean and sd of each variable under each fit, in one DataFrame."""
    import pandas as pd

    columns = {}
    for name, data in fits.items():
        summary = az.summary(data, var_names=var_names)
        columns[(name, "mean")] = summary["mean"]
        columns[(name, "sd")] = summary["sd"]
    return pd.DataFrame(columns)


def save_forest(fits, var_names, path):
    import matplotlib

    matplotlib.use("Agg")
    if AZ_MAJOR >= 1:
        az.plot_forest(fits, var_names=var_names, combined=True, backend="matplotlib").savefig(path)
    else:
        axes = az.plot_forest(list(fits.values()), model_names=list(fits), var_names=var_names,
                              combined=True, show=False)
        np.ravel(axes)[0].figure.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
