# %% [markdown]
# # Deep ensembles of flax and equinox networks
#
# A deep ensemble (Lakshminarayanan et al., 2017) trains `E` copies of one network from
# different random initialisations, each by maximum likelihood under a proper scoring rule,
# and predicts with the equal mixture of the members' predictive distributions. This
# tutorial fits one to 1-D regression data with input-dependent noise and a gap in the
# inputs: a flax linen network through `numpyro.contrib.module.flax_module`, all members
# trained in one compiled `lax.scan` by `EnsembleSVI`, then the same network written in
# equinox, which needs a per-member `init_params`. It compares one network with the
# ensemble on test RMSE and NLL, and shows how the ensemble's uncertainty grows in the gap
# and beyond the data, where single networks are often confidently wrong.
#
# Run it with `python examples/deep_ensemble.py` (about a minute on a 2-core CPU) or
# `python examples/deep_ensemble.py --quick` (fewer members and steps, under a minute).
# Figures and the results table are written to `--out-dir` (default: a new temporary
# directory; `--out-dir docs/figures` regenerates the ones shown here).

# %%
from __future__ import annotations

import argparse
from pathlib import Path
import tempfile
import time
import warnings

import equinox as eqx
from flax import linen
import jax
from jax import random
import jax.numpy as jnp
from jax.scipy.special import logsumexp
import numpy as np
import numpyro
from numpyro.contrib.module import eqx_module, flax_module
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
import optax

from numpyro_ensemble import EnsembleSVI, IdenticalMembersWarning, ensemble_predict, take_member

# %% [markdown]
# ## Data
#
# The inputs are uniform on `[-3, -1] ∪ [1, 3]`, the targets `y = sin(2x) + ε` with noise
# whose standard deviation grows from 0.05 on the left to 0.3 on the right. Test points
# come from three regions: *in range* (the training distribution), the *gap* `(-1, 1)`,
# and *outside*, `[-5, -3] ∪ [3, 5]`. The data are small; NumPy draws them.

# %%
TRAIN_RANGES = ((-3.0, -1.0), (1.0, 3.0))
REGIONS = {
    "in range": TRAIN_RANGES,
    "gap": ((-1.0, 1.0),),
    "outside": ((-5.0, -3.0), (3.0, 5.0)),
}


def truth(x):
    return np.sin(2.0 * x)


def noise_sd(x):
    return 0.05 + 0.25 / (1.0 + np.exp(-x))


def sample_xy(rng, n, ranges):
    """``n`` inputs uniform on a union of equally long intervals, and noisy targets."""
    lows = np.array([lo for lo, _ in ranges])
    width = ranges[0][1] - ranges[0][0]
    x = lows[rng.integers(len(ranges), size=n)] + width * rng.uniform(size=n)
    y = truth(x) + noise_sd(x) * rng.normal(size=n)
    return x.astype(np.float32), y.astype(np.float32)


# %% [markdown]
# ## The network and the model
#
# The network maps `x` to a mean and a standard deviation (softplus, floored at `1e-3`),
# with two hidden ReLU layers of 50 units. `flax_module` registers its weights as one
# `numpyro.param` site, `"net$params"`; the model has no latent sites, so the guide is
# empty and `Trace_ELBO` is the Gaussian negative log-likelihood of the data: every member
# is a maximum-likelihood fit, as in a deep ensemble. (The paper's adversarial training
# is left out.)

# %%
HIDDEN = 50
MIN_SCALE = 1e-3


class MLP(linen.Module):
    """x of shape (N,) -> (mean, scale), each (N,)."""

    hidden: int = HIDDEN

    @linen.compact
    def __call__(self, x):
        h = linen.relu(linen.Dense(self.hidden)(x[:, None]))
        h = linen.relu(linen.Dense(self.hidden)(h))
        out = linen.Dense(2)(h)
        return out[:, 0], jax.nn.softplus(out[:, 1]) + MIN_SCALE


def model(x, y=None):
    net = flax_module("net", MLP(), input_shape=(1,))
    mean, scale = net(x)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(mean, scale), obs=y)


def no_guide(x, y=None):
    """The weights are params; nothing is sampled."""


# %% [markdown]
# ## Fitting `E` networks at once
#
# `EnsembleSVI` takes the arguments of `numpyro.infer.SVI` plus `ensemble_size`. Member `e`
# is the plain `SVI` run with key `random.split(rng_key, E)[e]`; `flax_module` initialises
# the network with NumPyro's key, so every member starts from its own weights. All members
# use full-batch Adam with a cosine-decayed learning rate. `result.losses` has shape
# `(E, num_steps)`.


# %%
def make_ensemble(model, ensemble_size, num_steps, learning_rate):
    optim = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=0.05))
    return EnsembleSVI(model, no_guide, optim, Trace_ELBO(), ensemble_size=ensemble_size)


def fit(ensemble, rng_key, num_steps, x, y, init_params=None):
    """Runs the ensemble; returns the run result and the seconds it took (compile included)."""
    start = time.perf_counter()
    result = ensemble.run(rng_key, num_steps, x, y, progress_bar=False, init_params=init_params)
    jax.block_until_ready(result.losses)
    return result, time.perf_counter() - start


# %% [markdown]
# ## Predictions
#
# `ensemble_predict(params, fn, x)` applies `fn(one member's params, x)` to every member
# and stacks the results along a leading `(E,)` axis; `take_member(params, 0)` is member 0
# alone, what a single `SVI` fit would hold. The ensemble predicts with the equal mixture
# of the members' Gaussians: its variance is the mean of the members' variances (the noise
# they learnt) plus the variance of their means (their disagreement), and its NLL at a
# test point is `-log((1/E) Σ_e N(y | μ_e, σ_e²))`. Predictions and scores are jitted:
# eager JAX compiles every small operation on first use.


# %%
def flax_predict(params, x):
    return MLP().apply({"params": params["net$params"]}, x)


predict = jax.jit(ensemble_predict, static_argnums=1)  # (params, fn, x) -> fn's outputs, (E, ...)


def mixture_moments(mean, scale):
    """Mean, total sd and sd of the member means of the mixture of N(mean[e], scale[e]^2)."""
    mu = mean.mean(0)
    between = mean.var(0)  # written with array methods: works on numpy arrays too
    return mu, ((scale**2).mean(0) + between) ** 0.5, between**0.5


def scores(mean, scale, y):
    """RMSE, NLL and average sds of the mixture of the rows of ``mean`` / ``scale`` (M, N)."""
    log_p = dist.Normal(mean, scale).log_prob(y)
    nll = -(logsumexp(log_p, axis=0) - jnp.log(mean.shape[0])).mean()
    mu, sd, between = mixture_moments(mean, scale)
    return {
        "rmse": jnp.sqrt(jnp.mean((mu - y) ** 2)),
        "nll": nll,
        "sd": sd.mean(),
        "member_sd": between.mean(),
    }


@jax.jit
def ensemble_and_member_scores(mean, scale, y):
    """Scores of the ensemble (all E rows) and of every member alone (each leaf (E,))."""
    members = jax.vmap(scores, in_axes=(0, 0, None))(mean[:, None], scale[:, None], y)
    return scores(mean, scale, y), members


def score_regions(params, predict_fn, test_sets):
    """The ensemble's, member 0's and the average member's scores in every region."""
    out = {"ensemble": {}, "member 0": {}, "average member": {}}
    for region, (x, y) in test_sets.items():
        mean, scale = predict(params, predict_fn, x)  # each (E, N)
        ensemble, members = ensemble_and_member_scores(mean, scale, y)
        out["ensemble"][region] = {k: float(v) for k, v in ensemble.items()}
        out["member 0"][region] = {k: float(v[0]) for k, v in members.items()}
        out["average member"][region] = {k: float(v.mean()) for k, v in members.items()}
    return out


def oracle_scores(test_sets):
    """The same scores for the true mean and noise: the best any fit can do."""
    out = {}
    for region, (x, y) in test_sets.items():
        f, sd = truth(x), noise_sd(x)
        nll = 0.5 * np.log(2 * np.pi * sd**2) + 0.5 * ((y - f) / sd) ** 2
        rmse = np.sqrt(np.mean((y - f) ** 2))
        out[region] = {"rmse": float(rmse), "nll": float(nll.mean()), "sd": float(sd.mean()),
                       "member_sd": 0.0}
    return out


# %% [markdown]
# ## The same network in equinox
#
# `flax.nnx` and `equinox` networks are built eagerly, before the model runs, and
# `eqx_module("net", net)` registers *that* network's weights as the param's initial value:
# every member would start from the same weights. The ensemble notices and warns
# (`IdenticalMembersWarning`). Pass `init_params` as a function of a key instead; it is
# called once per member with a key of its own, and here builds a fresh network from it.

# %%
class EqxNet(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, key, hidden=HIDDEN):
        self.mlp = eqx.nn.MLP(1, 2, hidden, depth=2, activation=jax.nn.relu, key=key)

    def __call__(self, x):
        out = jax.vmap(self.mlp)(x[:, None])
        return out[:, 0], jax.nn.softplus(out[:, 1]) + MIN_SCALE


EAGER_NET = EqxNet(random.key(0))  # built before the model runs
NET_STATIC = eqx.partition(EAGER_NET, eqx.is_inexact_array)[1]  # everything but the weights


def eqx_model(x, y=None):
    mean, scale = eqx_module("net", EAGER_NET)(x)
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(mean, scale), obs=y)


def one_net_per_member(rng_key):
    return {"net$params": eqx.partition(EqxNet(rng_key), eqx.is_inexact_array)[0]}


def eqx_predict(params, x):
    return eqx.combine(params["net$params"], NET_STATIC)(x)


def identical_start_warning(ensemble, rng_key, x, y):
    """The message of the IdenticalMembersWarning that ``ensemble.init`` gives, or None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IdenticalMembersWarning)
        ensemble.init(rng_key, x, y)
    messages = [str(w.message) for w in caught if w.category is IdenticalMembersWarning]
    return messages[0] if messages else None


# %% [markdown]
# ## Figures and the table
#
# Plain matplotlib; the table is written as markdown by hand.


# %%
def plot_predictive(path, x, y, grid, panels):
    """One panel per (title, mean (M, G), scale (M, G)): mixture mean +- 2 sd, members."""
    import matplotlib.pyplot as plt

    x, y, grid = np.asarray(x), np.asarray(y), np.asarray(grid)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True)
    for ax, (title, mean, scale) in zip(axes, panels, strict=True):
        mean, scale = np.asarray(mean), np.asarray(scale)
        mu, sd, _ = mixture_moments(mean, scale)
        ax.axvspan(-1.0, 1.0, color="0.92", lw=0)
        ax.fill_between(grid, mu - 2 * sd, mu + 2 * sd, color="C0", alpha=0.25, label="± 2 sd")
        if mean.shape[0] > 1:
            for m in mean:
                ax.plot(grid, m, color="C0", lw=0.6, alpha=0.5)
        ax.plot(grid, mu, color="C0", lw=2, label="predictive mean")
        ax.plot(grid, truth(grid), "k--", lw=1, label="sin(2x)")
        ax.scatter(x, y, s=6, color="k", alpha=0.6, label="train")
        ax.set_title(title)
        ax.set_xlabel("x")
        ax.set_ylim(-3.0, 3.0)
    axes[0].set_ylabel("y")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_uncertainty(path, grid, single_scale, mean, scale):
    import matplotlib.pyplot as plt

    grid, single_scale = np.asarray(grid), np.asarray(single_scale)
    _, sd, between = mixture_moments(np.asarray(mean), np.asarray(scale))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.axvspan(-1.0, 1.0, color="0.92", lw=0, label="gap")
    ax.plot(grid, sd, color="C0", lw=2, label="ensemble: total sd")
    ax.plot(grid, between, color="C0", ls=":", lw=2, label="ensemble: sd of the member means")
    ax.plot(grid, single_scale, color="C3", lw=1.5, label="member 0: predicted sd")
    ax.plot(grid, noise_sd(grid), "k--", lw=1, label="true noise sd")
    for i, (lo, hi) in enumerate(TRAIN_RANGES):
        ax.axvspan(lo, hi, ymax=0.03, color="k", alpha=0.5, lw=0,
                   label="training inputs" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-3)
    ax.set_xlabel("x")
    ax.set_ylabel("standard deviation")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_losses(path, curves):
    """One panel per (title, losses (E, T)): every member's loss."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 3.5), sharey=True)
    curves = [(title, np.asarray(losses)) for title, losses in curves]
    for ax, (title, losses) in zip(axes, curves, strict=True):
        for e, curve in enumerate(losses):
            ax.plot(curve, lw=0.8, color=f"C{e % 10}")
        ax.set_title(title)
        ax.set_xlabel("step")
    low = min(losses.min() for _, losses in curves)
    start = max(np.median(losses[:, 0]) for _, losses in curves)
    axes[0].set_ylim(low - 0.05 * (start - low), start)
    axes[0].set_ylabel("negative log-likelihood (loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# %% [markdown]
# ## Running it
#
# `main` fits both ensembles and scores, in each test region, member 0, the average of the
# single members, the two ensembles, and the true mean and noise sd (the best possible
# scores); then it writes the figures and the table.


# %%
def main(argv=None):
    parser = argparse.ArgumentParser(description="A deep ensemble of flax and equinox MLPs.")
    parser.add_argument("--quick", action="store_true", help="few members and steps")
    parser.add_argument("--steps", type=int, default=None, help="steps per fit (3000; quick 600)")
    parser.add_argument("--ensemble-size", type=int, default=None, help="members (8; quick 4)")
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="Adam's initial rate")
    parser.add_argument("--num-train", type=int, default=160)
    parser.add_argument("--out-dir", default=None,
                        help="default: a new temporary directory; docs/figures regenerates "
                             "the committed figures")
    args = parser.parse_args(argv)
    num_steps = args.steps or (600 if args.quick else 3000)
    E = args.ensemble_size or (4 if args.quick else 8)
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="deep_ensemble-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(0)
    x, y = sample_xy(rng, args.num_train, TRAIN_RANGES)
    test_sets = {region: sample_xy(rng, 500, ranges) for region, ranges in REGIONS.items()}
    grid = np.linspace(-5.0, 5.0, 401, dtype=np.float32)

    # flax linen: every member starts from its own weights.
    flax_ens = make_ensemble(model, E, num_steps, args.learning_rate)
    flax_result, flax_seconds = fit(flax_ens, random.key(1), num_steps, x, y)
    single_net = take_member(flax_result.params, 0)  # what one SVI fit would hold
    single_mean, single_scale = jax.jit(flax_predict)(single_net, grid)

    # equinox: identical starts unless init_params gives each member its own network.
    eqx_ens = make_ensemble(eqx_model, E, num_steps, args.learning_rate)
    warning = identical_start_warning(eqx_ens, random.key(2), x, y)
    eqx_result, eqx_seconds = fit(eqx_ens, random.key(2), num_steps, x, y, one_net_per_member)

    flax_scores = score_regions(flax_result.params, flax_predict, test_sets)
    eqx_scores = score_regions(eqx_result.params, eqx_predict, test_sets)
    results = {
        "member 0 (flax)": flax_scores["member 0"],
        f"single network, average of {E} (flax)": flax_scores["average member"],
        f"ensemble of {E} (flax)": flax_scores["ensemble"],
        f"ensemble of {E} (equinox)": eqx_scores["ensemble"],
        "true mean and noise sd": oracle_scores(test_sets),
    }
    header = ["fit", "RMSE in range", *(f"NLL {r}" for r in REGIONS), *(f"sd {r}" for r in REGIONS)]
    rows = [
        [name, f"{s['in range']['rmse']:.3f}", *(f"{s[r]['nll']:.2f}" for r in REGIONS),
         *(f"{s[r]['sd']:.2f}" for r in REGIONS)]
        for name, s in results.items()
    ]
    table = markdown_table(header, rows)
    table_path = out_dir / "deep_ensemble_table.md"
    table_path.write_text(table)

    print(f"{args.num_train} training points, E={E}, {num_steps} full-batch Adam steps")
    print(f"fit time (compilation included): flax {flax_seconds:.1f} s, "
          f"equinox {eqx_seconds:.1f} s")
    print(f"equinox without init_params: {warning and warning.split('. ')[0]}.")
    print(table)
    flax_ens.print_summary()
    for name, s in (("flax", flax_scores), ("equinox", eqx_scores)):
        print(f"sd of the member means ({name}): "
              + ", ".join(f"{r} {v['member_sd']:.3f}" for r, v in s["ensemble"].items()))

    import matplotlib

    matplotlib.use("Agg")
    grid_mean, grid_scale = predict(flax_result.params, flax_predict, grid)
    eqx_mean, eqx_scale = predict(eqx_result.params, eqx_predict, grid)
    figures = {
        "predictive": out_dir / "deep_ensemble_predictive.png",
        "uncertainty": out_dir / "deep_ensemble_uncertainty.png",
        "losses": out_dir / "deep_ensemble_losses.png",
    }
    plot_predictive(figures["predictive"], x, y, grid, [
        ("one network (member 0)", single_mean[None], single_scale[None]),
        (f"deep ensemble, E={E} (flax)", grid_mean, grid_scale),
        (f"deep ensemble, E={E} (equinox)", eqx_mean, eqx_scale),
    ])
    plot_uncertainty(figures["uncertainty"], grid, single_scale, grid_mean, grid_scale)
    plot_losses(figures["losses"], [("flax linen", flax_result.losses),
                                    ("equinox", eqx_result.losses)])
    print("wrote", ", ".join(str(p) for p in [*figures.values(), table_path]))
    return {
        "scores": {"flax": flax_scores, "equinox": eqx_scores, "oracle": results["true mean and noise sd"]},
        "ensemble_size": E,
        "num_steps": num_steps,
        "seconds": {"flax": flax_seconds, "equinox": eqx_seconds},
        "identical_start_warning": warning,
        "final_losses": {"flax": np.asarray(flax_result.losses[:, -1]),
                         "equinox": np.asarray(eqx_result.losses[:, -1])},
        "figures": figures,
        "table": table_path,
    }


# %% [markdown]
# ## Results
#
# One full run (160 training points, `E = 8`, 3000 steps) on a 2-core CPU; each fit takes
# 10–20 seconds, most of it compiling. NLL is per test point (lower is better), `sd` the
# average predictive standard deviation:
#
# --8<-- "figures/deep_ensemble_table.md"
#
# In range, every fit is close to the best possible RMSE, and the flax ensemble has the
# lowest NLL. All fits predict a smaller sd than the true noise: maximum likelihood on 160
# points fits part of the noise. In the gap and outside, single networks are often
# confidently wrong: averaged over the eight members, the NLL is far above the
# ensembles', driven by members that predict a small sd where they have seen no data. The
# ensembles do better there because their members disagree: the sd of the member means
# is about 0.02 in range and 0.3–0.55 in the gap (printed by `main`). One network can be
# lucky — here member 0 interpolates the gap well, with a lower gap NLL than either
# ensemble — but which one is not known in advance. Far outside, the ReLU members
# extrapolate linearly and in similar directions; their disagreement grows more slowly
# than their error, and the ensembles are still overconfident there.
#
# ![Predictive mean and ± 2 sd band of one network and of the two ensembles](../figures/deep_ensemble_predictive.png)
#
# The equinox ensemble is the same architecture with equinox's initialisation (uniform
# weights and biases; flax draws LeCun-normal weights and zero biases). It fits the data
# as well, and its members disagree in other places.
#
# The predictive standard deviation along `x` (log scale): within the training inputs the
# members agree and the total sd is the noise they learnt, close to the true noise; in the
# gap and beyond the data their disagreement dominates. Member 0's own sd rises in the gap
# too, but less.
#
# ![Standard deviations along x](../figures/deep_ensemble_uncertainty.png)
#
# Full-batch Adam on a Gaussian NLL with a learnt scale is spiky early on (a step that
# moves a mean where the predicted sd is small costs a lot); the decaying learning rate
# settles every member. `flax_ens.print_summary()` prints each member's final loss.
#
# ![Training loss of every member](../figures/deep_ensemble_losses.png)
#
# ## Variations
#
# - Mini-batches: write the plate as `numpyro.plate("data", N, subsample_size=B)`; `run`
#   then draws each member's batches itself, every point once per epoch in the member's
#   own order, which is another source of diversity.
# - A weight prior: with `random_flax_module` in place of `flax_module` (and a prior such
#   as `dist.Normal(0.0, 1.0)`) the weights are latent sites, and
#   `EnsembleMAP(model, optim, ensemble_size=E)` fits one MAP point per member, each
#   started from its own prior draws.
# - `flax.nnx`: as for equinox, with `nnx_module` and an `init_params` function that
#   builds the network from `nnx.Rngs(rng_key)` (see [the workloads page](../workloads.md)).

# %%
if __name__ == "__main__":
    main()
