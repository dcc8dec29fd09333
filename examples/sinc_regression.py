"""Sinc regression with a Bayesian MLP: an ensemble of MAP fits and an ensemble of SVI fits.

80 noisy points of sinc(x) on [-10, 10] (noise sd 0.1), a 1-32-32-1 tanh MLP
with N(0, 1) weights written as one NumPyro model, fit two ways:

- ``EnsembleMAP``: 16 MAP points (a deep ensemble);
- ``EnsembleSVI`` with ``AutoNormal``: 16 mean-field Gaussian fits, 20 draws each,
  started (a) from the guide's own random init, (b) from the 16 MAP points (one
  per member, through ``init_params``), and (c) from the MAP points with a cold
  posterior (``TemperedTrace_ELBO(kl_weight=0.1)``).

Prints RMSE (against the truth and against noisy test points), the NLL of noisy
test points under the ensemble's mixture predictive, 95% coverage and interval
width, and the run time, each with equal member weights and with stacking weights
(``stacking_weights``: the mixture of members that predicts left-out training
points best); saves a plot of the members and predictive bands.

    python examples/sinc_regression.py            # full run
    python examples/sinc_regression.py --steps 50 # quick check
"""

from __future__ import annotations

import argparse
import time

import jax
from jax import random
import jax.numpy as jnp
from jax.scipy.special import logsumexp
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Predictive
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    TemperedTrace_ELBO,
    ensemble_predictive,
    stacking_weights,
)

SIGMA = 0.1
HIDDEN = 32


def bnn(x, y=None):
    """A 1-32-32-1 tanh MLP with standard-normal weights and known noise SIGMA."""
    sizes = [(1, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1)]
    h = x[:, None]
    for i, (n_in, n_out) in enumerate(sizes, start=1):
        w = numpyro.sample(f"W{i}", dist.Normal(jnp.zeros((n_in, n_out)), 1.0).to_event(2))
        b = numpyro.sample(f"b{i}", dist.Normal(jnp.zeros(n_out), 1.0).to_event(1))
        h = h @ w + b
        if i < len(sizes):
            h = jnp.tanh(h)
    f = numpyro.deterministic("f", h[:, 0])
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(f, SIGMA), obs=y)


def sinc_data(rng_key, num_train=80, num_test=200):
    k_x, k_train, k_test = random.split(rng_key, 3)
    truth = lambda x: jnp.sinc(x / jnp.pi)  # noqa: E731  (sin(x) / x)
    x = random.uniform(k_x, (num_train,), minval=-10.0, maxval=10.0)
    y = truth(x) + SIGMA * random.normal(k_train, x.shape)
    x_test = jnp.linspace(-12.0, 12.0, num_test)
    y_test = truth(x_test) + SIGMA * random.normal(k_test, x_test.shape)
    return x, y, x_test, truth(x_test), y_test


def metrics(f, y_truth, y_test, rng_key, weights=None, num_draws=20_000):
    """Scores of the mixture predictive sum_m p_m N(f_m(x), SIGMA^2); f is (M, N), p the
    draws' weights (equal by default)."""
    p = jnp.full(f.shape[0], 1.0 / f.shape[0]) if weights is None else weights
    mean = p @ f
    log_pdf = dist.Normal(f, SIGMA).log_prob(y_test)
    nll = -logsumexp(log_pdf + jnp.log(p)[:, None], axis=0).mean()
    k_member, k_noise = random.split(rng_key)
    members = random.choice(k_member, f.shape[0], (num_draws,), p=p)
    draws = f[members] + SIGMA * random.normal(k_noise, (num_draws, f.shape[1]))
    lo, hi = jnp.quantile(draws, jnp.array([0.025, 0.975]), axis=0)
    return {
        "rmse_truth": float(jnp.sqrt(jnp.mean((mean - y_truth) ** 2))),
        "rmse_noisy": float(jnp.sqrt(jnp.mean((mean - y_test) ** 2))),
        "nll": float(nll),
        "coverage95": float(jnp.mean((y_test >= lo) & (y_test <= hi))),
        "width95": float(jnp.mean(hi - lo)),
        "band": (lo, hi),
    }


def fit_map(x, y, x_test, ensemble_size, num_steps, rng_key):
    ens = EnsembleMAP(bnn, optax.adam(5e-3), ensemble_size=ensemble_size)
    start = time.perf_counter()
    result = ens.run(rng_key, num_steps, x, y, progress_bar=False)
    points = ens.get_points(result.params)
    jax.block_until_ready(points)
    seconds = time.perf_counter() - start
    # One draw per member: the member's point itself.
    f = Predictive(bnn, posterior_samples=points, return_sites=["f"])(rng_key, x_test)["f"]
    stacked = stacking_weights(ens, random.fold_in(rng_key, 2), result.params, x, y)
    return f, seconds, points, stacked.member_weights


def make_svi(ensemble_size, num_steps, guide, kl_weight=1.0):
    """AutoNormal members with a cosine-decayed Adam; ``kl_weight < 1`` is a cold posterior."""
    optim = optax.adam(optax.cosine_decay_schedule(5e-3, num_steps, alpha=0.1))
    return EnsembleSVI(bnn, guide, optim, TemperedTrace_ELBO(kl_weight=kl_weight),
                       ensemble_size=ensemble_size)


def fit_svi(svi, x, y, x_test, num_steps, rng_key, *, start=None, draws_per_member=20):
    """Runs ``svi``; ``start`` are points by site name, one per member, to start from."""
    # AutoNormal's locs live in the unconstrained space; these sites are all real-valued.
    init_params = None if start is None else {f"{k}_auto_loc": v for k, v in start.items()}
    t0 = time.perf_counter()
    result = svi.run(rng_key, num_steps, x, y, progress_bar=False, init_params=init_params)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t0
    f = ensemble_predictive(svi, random.fold_in(rng_key, 1), result.params, x_test,
                            num_samples=draws_per_member, return_sites=["f"])["f"]  # (E, S, N)
    stacked = stacking_weights(svi, random.fold_in(rng_key, 2), result.params, x, y,
                               num_samples=100)
    # Member e's weight spread evenly over its draws (rows of f are member-major).
    draw_weights = jnp.repeat(stacked.member_weights, draws_per_member) / draws_per_member
    return f.reshape(-1, x_test.shape[0]), seconds, result.params, draw_weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimization steps per fit")
    parser.add_argument("--ensemble-size", type=int, default=16)
    parser.add_argument("--out", default="sinc_regression.png", help="where to save the plot ('' for none)")
    args = parser.parse_args(argv)

    x, y, x_test, y_truth, y_test = sinc_data(random.key(0))
    E, T = args.ensemble_size, args.steps
    fits = {"EnsembleMAP": fit_map(x, y, x_test, E, T, random.key(1))}
    points = fits["EnsembleMAP"][2]
    guide = AutoNormal(bnn, init_scale=1e-2)  # one guide: NumPyro sets it up once
    svi, cold = make_svi(E, T, guide), make_svi(E, T, guide, kl_weight=0.1)
    fits["EnsembleSVI"] = fit_svi(svi, x, y, x_test, T, random.key(2))
    fits["EnsembleSVI from MAP"] = fit_svi(svi, x, y, x_test, T, random.key(2), start=points)
    fits["EnsembleSVI from MAP, kl_weight 0.1"] = fit_svi(
        cold, x, y, x_test, T, random.key(2), start=points
    )
    oracle_nll = 0.5 * jnp.log(2 * jnp.pi * SIGMA**2) + 0.5
    print(f"sinc regression: {x.shape[0]} points, E={args.ensemble_size}, {args.steps} steps")
    print(f"oracle (true f, known sigma): NLL {oracle_nll:.3f}, 95% width {4 * 0.98 * SIGMA:.2f}")
    header = f"{'method':<40}{'RMSE truth':>11}{'RMSE noisy':>11}{'NLL':>8}{'cov95':>7}{'width95':>9}{'time [s]':>10}"
    print(header)
    print("-" * len(header))
    scores = {}
    for name, (f, seconds, _, weights) in fits.items():
        for label, w in ((name, None), ("  ... stacked", weights)):
            m = metrics(f, y_truth, y_test, random.key(3), weights=w)
            scores[name if w is None else f"{name}, stacked"] = m
            print(
                f"{label:<40}{m['rmse_truth']:>11.4f}{m['rmse_noisy']:>11.4f}{m['nll']:>8.3f}"
                f"{m['coverage95']:>7.2f}{m['width95']:>9.3f}{seconds:>10.2f}"
            )
    if args.out:
        plot(args.out, x, y, x_test, y_truth, fits, scores)
        print(f"saved {args.out}")
    return scores


def plot(path, x, y, x_test, y_truth, fits, scores):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey=True)
    axes = axes.ravel()
    for ax, (name, (f, _, _, _)) in zip(axes, fits.items(), strict=False):
        lo, hi = scores[name]["band"]
        ax.fill_between(x_test, lo, hi, color="C0", alpha=0.2, label="95% predictive")
        for f_m in f[: min(len(f), 64)]:
            ax.plot(x_test, f_m, color="C0", lw=0.6, alpha=0.3)
        ax.plot(x_test, f.mean(0), color="C0", lw=2, label="predictive mean")
        ax.plot(x_test, y_truth, "k--", lw=1, label="truth")
        ax.scatter(x, y, s=10, color="k", label="train")
        m = scores[name]
        ax.set_title(f"{name}\nNLL {m['nll']:.3f}, coverage {m['coverage95']:.2f}, width {m['width95']:.2f}")
        ax.set_ylim(-1.5, 2.0)
    for ax in axes[2:]:
        ax.set_xlabel("x")
    for ax in axes[::2]:
        ax.set_ylabel("y")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
