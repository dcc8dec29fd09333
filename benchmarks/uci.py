"""The deep-ensembles UCI regression protocol, with ``EnsembleMAP``.

Lakshminarayanan, Pritzel & Blundell (2017), Table 1: nine UCI data sets with the
standard 90 % / 10 % splits (20 per data set, protein 5), one hidden layer of
``n_hidden`` ReLU units, inputs and targets standardised with the training split,
E = 5 members, ``n_epochs`` epochs of mini-batch Adam, a heteroscedastic Gaussian
output (a mean and a variance per input), and the equal mixture of the members'
Gaussians as the predictive. Test RMSE and NLL are reported in the target's
original units, mean +- standard error over the splits, beside the published numbers.

The model is one NumPyro model (a MAP fit: N(0, 1) priors on the weights, the
Gaussian likelihood summed over the data); every split of a data set is fitted in
**one** compiled run: the ``E x splits`` members take their split's training rows,
means and scales as per-member data (``per_member``), and draw their own
mini-batches (every training point once per epoch).

    python benchmarks/uci.py --data-dir ../shared/data/uci                  # all nine
    python benchmarks/uci.py --data-dir ../shared/data/uci --datasets yacht --splits 2

The data are not part of this repository (see ``../shared/data/uci/README.md``).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import jax
from jax import random
import jax.numpy as jnp
from jax.scipy.special import logsumexp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from numpyro_ensemble import EnsembleMAP, ensemble_predict, per_member

# Published deep-ensembles results (mean, standard error over splits).
PUBLISHED = {
    "bostonHousing": ((3.28, 1.00), (2.41, 0.25)),
    "concrete": ((6.03, 0.58), (3.06, 0.18)),
    "energy": ((2.09, 0.29), (1.38, 0.22)),
    "kin8nm": ((0.09, 0.00), (-1.20, 0.02)),
    "naval-propulsion-plant": ((0.00, 0.00), (-5.63, 0.05)),
    "power-plant": ((4.11, 0.17), (2.79, 0.04)),
    "protein-tertiary-structure": ((4.71, 0.06), (2.83, 0.02)),
    "wine-quality-red": ((0.64, 0.04), (0.94, 0.12)),
    "yacht": ((1.58, 0.48), (1.18, 0.21)),
}
ENSEMBLE_SIZE = 5


def mlp(data, targets, rows, x_loc, x_scale, y_loc, y_scale, *, hidden, batch_size):
    """One hidden layer of ``hidden`` ReLU units, a mean and a variance per input.

    ``data`` / ``targets`` hold the whole data set (shared); ``rows`` are this member's
    training rows and ``x_loc``... its split's standardisation (per-member data).
    """
    num_features = data.shape[1]
    w1 = numpyro.sample("w1", dist.Normal(0.0, 1.0).expand([num_features, hidden]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0).expand([hidden, 2]).to_event(2))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("data", rows.shape[0], subsample_size=batch_size) as batch:
        x = (data[rows[batch]] - x_loc) / x_scale
        y = (targets[rows[batch]] - y_loc) / y_scale
        loc, scale = predict({"w1": w1, "b1": b1, "w2": w2, "b2": b2}, x)
        numpyro.sample("y", dist.Normal(loc, scale), obs=y)


def predict(points, x):
    """The member's Gaussian (standardised units) at standardised inputs ``x``."""
    h = jax.nn.relu(x @ points["w1"] + points["b1"])
    out = h @ points["w2"] + points["b2"]
    return out[..., 0], jax.nn.softplus(out[..., 1]) + 1e-6


def load(folder: pathlib.Path, num_splits: int | None):
    data = np.loadtxt(folder / "data.txt")
    features = np.loadtxt(folder / "index_features.txt", dtype=int)
    target = int(np.loadtxt(folder / "index_target.txt"))
    available = int(np.loadtxt(folder / "n_splits.txt"))
    splits = range(available if num_splits is None else min(num_splits, available))
    train = np.stack([np.loadtxt(folder / f"index_train_{i}.txt", dtype=int) for i in splits])
    test = np.stack([np.loadtxt(folder / f"index_test_{i}.txt", dtype=int) for i in splits])
    hidden = int(np.loadtxt(folder / "n_hidden.txt"))
    epochs = int(np.loadtxt(folder / "n_epochs.txt"))
    return data[:, features], data[:, target], train, test, hidden, epochs


def standardisation(x, y, train):
    """Per split: the training rows' means and standard deviations (1 where constant)."""
    x_loc, y_loc = x[train].mean(1), y[train].mean(1)
    x_scale, y_scale = x[train].std(1), y[train].std(1)
    return x_loc, np.where(x_scale > 0, x_scale, 1.0), y_loc, y_scale


def run_dataset(name, folder, args):
    x, y, train, test, hidden, epochs = load(folder, args.splits)
    num_splits = train.shape[0]
    x_loc, x_scale, y_loc, y_scale = standardisation(x, y, train)
    # Member m fits split m // E: every split's arrays repeated for its E members.
    per_split = lambda a: jnp.asarray(np.repeat(a, ENSEMBLE_SIZE, axis=0), jnp.float32)  # noqa: E731
    members = num_splits * ENSEMBLE_SIZE
    rows = jnp.asarray(np.repeat(train, ENSEMBLE_SIZE, axis=0), jnp.int32)
    batch_size = args.batch_size or (8 if train.shape[1] < 2000 else 32)
    steps_per_epoch = math.ceil(train.shape[1] / batch_size)
    num_steps = int(epochs * args.epoch_scale) * steps_per_epoch
    schedule = optax.cosine_decay_schedule(args.learning_rate, num_steps, alpha=0.01)
    ens = EnsembleMAP(mlp, optax.adam(schedule), ensemble_size=members, hidden=hidden,
                      batch_size=batch_size)

    start = time.perf_counter()
    result = ens.run(
        random.key(args.seed), num_steps,
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), per_member(rows),
        per_member(per_split(x_loc)), per_member(per_split(x_scale)),
        per_member(per_split(y_loc)), per_member(per_split(y_scale)),
        progress_bar=args.progress_bar,
    )
    points = ens.get_points(result.params)

    # Each member predicts its split's test points (standardised), back in original units.
    x_test = (x[test] - x_loc[:, None]) / x_scale[:, None]
    loc, scale = ensemble_predict(points, predict, per_member(per_split(x_test)))
    loc = loc * per_split(y_scale)[:, None] + per_split(y_loc)[:, None]
    scale = scale * per_split(y_scale)[:, None]
    loc, scale = (v.reshape(num_splits, ENSEMBLE_SIZE, -1) for v in (loc, scale))
    y_test = jnp.asarray(y[test], jnp.float32)
    jax.block_until_ready(loc)
    seconds = time.perf_counter() - start

    rmse = jnp.sqrt(jnp.mean((loc.mean(1) - y_test) ** 2, axis=1))
    log_mix = logsumexp(dist.Normal(loc, scale).log_prob(y_test[:, None]), axis=1) - math.log(ENSEMBLE_SIZE)
    nll = -log_mix.mean(axis=1)
    diverged = int((~np.isfinite(np.asarray(result.losses[:, -1]))).sum())
    return {
        "name": name, "n": x.shape[0], "splits": num_splits, "members": members, "steps": num_steps,
        "batch_size": batch_size,
        "rmse": mean_se(rmse), "nll": mean_se(nll), "seconds": seconds, "diverged": diverged,
    }


def mean_se(values):
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / math.sqrt(values.size) if values.size > 1 else float("nan")
    return float(values.mean()), float(se)


def fmt(pair, digits):
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("../shared/data/uci"))
    parser.add_argument("--datasets", nargs="+", default=list(PUBLISHED))
    parser.add_argument("--splits", type=int, default=None, help="first n splits (default: all)")
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="default: 8 below 2000 training points (else 40 epochs are too few steps), 32 above",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply the protocol's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress-bar", action="store_true")
    args = parser.parse_args(argv)

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, E = {ENSEMBLE_SIZE} per split, "
          f"batch {args.batch_size or '8 / 32'}, Adam {args.learning_rate} (cosine decay)")
    header = ("| data set | N | splits | RMSE | published | NLL | published | NLL <= published "
              "| time [s] |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |")
    print(header)
    rows, total = [], time.perf_counter()
    for name in args.datasets:
        row = run_dataset(name, args.data_dir / name, args)
        (pub_rmse, pub_nll) = PUBLISHED[name]
        digits = 3 if abs(row["rmse"][0]) < 1 else 2
        better = "yes" if row["nll"][0] <= pub_nll[0] else "no"
        print(f"| {name} | {row['n']} | {row['splits']} | {fmt(row['rmse'], digits)} | "
              f"{fmt(pub_rmse, 2)} | {fmt(row['nll'], 2)} | {fmt(pub_nll, 2)} | {better} | "
              f"{row['seconds']:.1f} |" + (f" ({row['diverged']} members diverged)" if row["diverged"] else ""),
              flush=True)
        rows.append((row, better))
    wins = sum(better == "yes" for _, better in rows)
    print(f"\nNLL at or below the published deep ensembles on {wins} of {len(rows)} data sets; "
          f"total {time.perf_counter() - total:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
