"""The deep-ensembles UCI regression protocol, with ``EnsembleMAP``.

Lakshminarayanan, Pritzel & Blundell (2017), Table 1: nine UCI data sets with the
standard 90 % / 10 % splits (20 per data set, protein 5), one hidden layer of
``n_hidden`` ReLU units, inputs and targets standardised with the training rows,
E = 5 members, ``n_epochs`` epochs of mini-batch Adam, a heteroscedastic Gaussian
output (a mean and a variance per input), and the equal mixture of the members'
Gaussians as the predictive. Test RMSE and NLL are reported in the target's
original units, mean +- standard error over the splits, beside the published numbers.

The model is one NumPyro model (a MAP fit: N(0, 1) priors on the weights, the
Gaussian likelihood summed over the data). The final fit of a data set (all splits
x ``--seeds``) is **one** compiled run, and so is the selection fit of each candidate
batch size (all splits x candidate learning rates): each member takes its split's
rows, means and scales as per-member data (``per_member``) and its learning rate as
a per-member hyperparameter, and draws its own mini-batches (every row once per epoch).

With ``--select``, batch size and learning rate are chosen per data set on
validation data: a seeded random 20 % of each split's training rows is held out,
ensembles are fitted on the other 80 % for every candidate, and the candidate with
the lowest validation NLL (mean over splits) is refitted on the whole training
split and scored on the test rows, which the selection never sees.

    python benchmarks/uci.py --data-dir ../shared/data/uci --select --seeds 3   # the docs' run
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

# Published deep-ensembles results (Table 1): (mean, ±) for RMSE and NLL. The paper
# does not say what ± is; it is the standard deviation over splits (see
# docs/results.md), so the published mean's standard error is ± / sqrt(splits).
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
LEARNING_RATES = (3e-3, 1e-2, 3e-2)  # candidates of --select (Adam, cosine decay)
PAPER_BATCH_SIZE = 100
VALIDATION_FRACTION = 0.2
# The published values have two decimals: a difference within half of the last digit
# is rounding, not a difference.
PUBLISHED_ROUNDING = 0.005


def mlp(data, targets, rows, x_loc, x_scale, y_loc, y_scale, *, hidden, batch_size):
    """One hidden layer of ``hidden`` ReLU units, a mean and a variance per input.

    ``data`` / ``targets`` hold the whole data set (shared); ``rows`` are this member's
    training rows and ``x_loc``... their standardisation (per-member data).
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
    return data[:, features], data[:, target], train, test, hidden, epochs, available


def validation_split(train, seed):
    """Per split: a seeded random ``VALIDATION_FRACTION`` of its training rows
    (validation) and the rest (fit). Only training rows are touched."""
    num_val = max(1, round(VALIDATION_FRACTION * train.shape[1]))
    fit, val = [], []
    for i, rows in enumerate(train):
        order = np.random.default_rng([seed, i]).permutation(rows.size)
        val.append(np.sort(rows[order[:num_val]]))
        fit.append(np.sort(rows[order[num_val:]]))
    return np.stack(fit), np.stack(val)


def standardisation(x, y, rows):
    """Per group: the fitted rows' means and standard deviations (1 where constant)."""
    x_loc, y_loc = x[rows].mean(1), y[rows].mean(1)
    x_scale, y_scale = x[rows].std(1), y[rows].std(1)
    return x_loc, np.where(x_scale > 0, x_scale, 1.0), y_loc, y_scale


def default_batch_size(num_train):
    # 40 epochs of batch 100 are few steps below 2000 rows (e.g. 160 on boston).
    return 8 if num_train < 2000 else 32


def fit_and_score(x, y, fit_rows, eval_rows, learning_rates, *, hidden, epochs, batch_size,
                  key, progress_bar=False):
    """One ensemble of E members per group ``g``, fitted on ``fit_rows[g]`` with Adam at
    ``learning_rates[g]`` (cosine decay to 1 %) and scored on ``eval_rows[g]``, all
    groups in one compiled run. Returns per-group RMSE and NLL (original units), the
    number of members whose final loss is not finite, and the number of steps."""
    groups, num_fit = fit_rows.shape
    x_loc, x_scale, y_loc, y_scale = standardisation(x, y, fit_rows)
    # Member m belongs to group m // E: every group's arrays repeated for its E members.
    per_group = lambda a: jnp.asarray(np.repeat(a, ENSEMBLE_SIZE, axis=0), jnp.float32)  # noqa: E731
    batch_size = min(batch_size, num_fit)
    num_steps = epochs * math.ceil(num_fit / batch_size)
    # Per-member learning rates (numpyro_ensemble.engine.hyper), times a shared cosine factor.
    optim = optax.chain(
        optax.inject_hyperparams(optax.adam)(learning_rate=per_group(np.asarray(learning_rates))),
        optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, num_steps, alpha=0.01)),
    )
    ens = EnsembleMAP(mlp, optim, ensemble_size=groups * ENSEMBLE_SIZE, hidden=hidden,
                      batch_size=batch_size)
    result = ens.run(
        key, num_steps,
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32),
        per_member(jnp.asarray(np.repeat(fit_rows, ENSEMBLE_SIZE, axis=0), jnp.int32)),
        per_member(per_group(x_loc)), per_member(per_group(x_scale)),
        per_member(per_group(y_loc)), per_member(per_group(y_scale)),
        progress_bar=progress_bar,
    )
    x_eval = (x[eval_rows] - x_loc[:, None]) / x_scale[:, None]
    rmse, nll = score(ens.get_points(result.params), per_group(x_eval),
                      jnp.asarray(y[eval_rows], jnp.float32), per_group(y_loc), per_group(y_scale))
    diverged = int((~np.isfinite(np.asarray(result.losses[:, -1]))).sum())
    return np.asarray(rmse, float), np.asarray(nll, float), diverged, num_steps


@jax.jit  # one program instead of many small eager ones (each compiled on first use)
def score(points, x_eval, y_eval, y_loc, y_scale):
    """Per group: RMSE and NLL of the E members' equal mixture, in original units.
    ``x_eval`` and the target's ``y_loc`` / ``y_scale`` are per member (member m in
    group m // E); ``y_eval`` is per group."""
    loc, scale = ensemble_predict(points, predict, per_member(x_eval))
    loc = loc * y_scale[:, None] + y_loc[:, None]
    scale = scale * y_scale[:, None]
    loc, scale = (v.reshape(y_eval.shape[0], ENSEMBLE_SIZE, -1) for v in (loc, scale))
    rmse = jnp.sqrt(jnp.mean((loc.mean(1) - y_eval) ** 2, axis=1))
    log_mix = logsumexp(dist.Normal(loc, scale).log_prob(y_eval[:, None]), axis=1)
    return rmse, -(log_mix - math.log(ENSEMBLE_SIZE)).mean(axis=1)


def select(x, y, train, hidden, epochs, batch_sizes, args):
    """Batch size and learning rate with the lowest validation NLL (mean over splits).

    Returns ``(batch_size, learning_rate)``, the validation NLL of every candidate
    ``{(batch_size, learning_rate): value}`` and the fit / validation rows."""
    fit_rows, val_rows = validation_split(train, args.seed)
    num_splits, rates = train.shape[0], np.asarray(args.learning_rates)
    scores = {}
    for i, batch_size in enumerate(batch_sizes):
        # Group g = split g // len(rates) at learning rate rates[g % len(rates)].
        _, nll, _, _ = fit_and_score(
            x, y, np.repeat(fit_rows, rates.size, axis=0), np.repeat(val_rows, rates.size, axis=0),
            np.tile(rates, num_splits), hidden=hidden, epochs=epochs, batch_size=batch_size,
            key=random.fold_in(random.key(args.seed), 1 + i), progress_bar=args.progress_bar,
        )
        # A diverged member makes its ensemble's NLL NaN: that candidate loses.
        mean_nll = np.where(np.isfinite(nll), nll, np.inf).reshape(num_splits, rates.size).mean(0)
        scores.update({(batch_size, float(r)): float(v) for r, v in zip(rates, mean_nll, strict=True)})
    chosen = min(scores, key=scores.get)
    return chosen, scores, fit_rows, val_rows


def run_dataset(name, folder, args):
    x, y, train, test, hidden, epochs, published_splits = load(folder, args.splits)
    num_splits = train.shape[0]
    epochs = max(1, round(epochs * args.epoch_scale))
    start = time.perf_counter()
    row = {"name": name, "n": x.shape[0], "splits": num_splits, "epochs": epochs,
           "published_splits": published_splits, "train_rows": train, "test_rows": test}
    if args.select:
        batch_sizes = args.batch_sizes or sorted({default_batch_size(train.shape[1]),
                                                  PAPER_BATCH_SIZE})
        (batch_size, learning_rate), scores, fit_rows, val_rows = select(
            x, y, train, hidden, epochs, batch_sizes, args)
        row.update(chosen=(batch_size, learning_rate), validation=scores, fit_rows=fit_rows,
                   val_rows=val_rows)
    else:
        batch_size = args.batch_size or default_batch_size(train.shape[1])
        learning_rate = args.learning_rate

    # Seed s of split i is group s * splits + i: one ensemble of E per split and seed.
    rmse, nll, diverged, steps = fit_and_score(
        x, y, np.tile(train, (args.seeds, 1)), np.tile(test, (args.seeds, 1)),
        np.full(args.seeds * num_splits, learning_rate), hidden=hidden, epochs=epochs,
        batch_size=batch_size, key=random.key(args.seed), progress_bar=args.progress_bar,
    )
    rmse, nll = rmse.reshape(args.seeds, num_splits), nll.reshape(args.seeds, num_splits)
    row.update(
        batch_size=min(batch_size, train.shape[1]), learning_rate=learning_rate, steps=steps,
        members=args.seeds * num_splits * ENSEMBLE_SIZE, diverged=diverged,
        # Per split, the seeds' mean (an estimate of one E = 5 ensemble's score); then
        # mean and standard error over splits, as the paper reports.
        rmse=mean_se(rmse.mean(0)), nll=mean_se(nll.mean(0)),
        # Split-to-split standard deviation of one ensemble per split (mean over seeds),
        # the quantity the published ± is.
        rmse_sd=float(np.mean(sd(rmse))), nll_sd=float(np.mean(sd(nll))),
        rmse_per_seed=rmse.mean(1), nll_per_seed=nll.mean(1),
        seconds=time.perf_counter() - start,
    )
    return row


def sd(values):
    """Standard deviation over splits (the last axis); NaN for one split."""
    values = np.asarray(values, dtype=float)
    return values.std(axis=-1, ddof=1) if values.shape[-1] > 1 else np.full(values.shape[:-1], np.nan)


def mean_se(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(sd(values) / math.sqrt(values.size))


def compare(ours, published, published_splits):
    """Ours against the published mean: the difference beyond the published rounding,
    in units of the combined standard error (published SE = ± / sqrt(splits)), and
    "comparable" within 2 of them, else "lower" / "higher"."""
    (mean, se), (pub_mean, pub_pm) = ours, published
    combined = math.hypot(se, pub_pm / math.sqrt(published_splits))
    excess = max(abs(mean - pub_mean) - PUBLISHED_ROUNDING, 0.0)
    if not math.isfinite(mean) or not math.isfinite(combined):
        return float("nan"), "n/a"
    if excess == 0:
        return 0.0, "comparable"
    z = math.copysign(excess / combined if combined > 0 else math.inf, mean - pub_mean)
    return z, "comparable" if abs(z) <= 2 else ("lower" if z < 0 else "higher")


def fmt(pair, digits):
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def fmt_published(pair, splits, digits):
    """The published mean ± its standard error, then the ± as printed in the paper."""
    return f"{pair[0]:.2f} ± {pair[1] / math.sqrt(splits):.{digits}f} ({pair[1]:.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("../shared/data/uci"))
    parser.add_argument("--datasets", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--splits", type=int, default=None, help="first n splits (default: all)")
    parser.add_argument("--select", action="store_true",
                        help="choose batch size and learning rate on a validation 20 %% of each "
                             "training split (ignores --batch-size, --learning-rate)")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=list(LEARNING_RATES),
                        help="the candidates of --select")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="the candidates of --select (default: 8 / 32 as below, and 100)")
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="without --select; default: 8 below 2000 training points (else 40 epochs are "
             "too few steps), 32 above",
    )
    parser.add_argument("--learning-rate", type=float, default=1e-2, help="without --select")
    parser.add_argument("--seeds", type=int, default=1,
                        help="independent ensembles per split in the final fit (reported: the "
                             "seeds' mean per split, and the spread of the seeds' means)")
    parser.add_argument("--epoch-scale", type=float, default=1.0, help="multiply the protocol's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress-bar", action="store_true")
    args = parser.parse_args(argv)

    if args.select:
        setting = (f"batch size and Adam learning rate {args.learning_rates} (cosine decay) chosen "
                   f"per data set on validation NLL")
    else:
        setting = f"batch {args.batch_size or '8 / 32'}, Adam {args.learning_rate} (cosine decay)"
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, E = {ENSEMBLE_SIZE} per split, "
          f"{setting}, {args.seeds} seed(s)")
    print("Ours: mean ± SE over splits. Published: mean ± SE (= ± / sqrt(splits)) and, in "
          "brackets, the ± as printed (a standard deviation over splits). z: the difference "
          f"beyond the published rounding ({PUBLISHED_ROUNDING}) in combined SEs; "
          "comparable: |z| <= 2.\n")
    print("| data set | splits | batch, lr | RMSE | published | z | RMSE is | NLL | published "
          "| z | NLL is | time [s] |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: | ---: | ---: | :---: | ---: |")
    rows, total, cpu = [], time.perf_counter(), time.process_time()
    for name in args.datasets:
        row = run_dataset(name, args.data_dir / name, args)
        pub_rmse, pub_nll = PUBLISHED[name]
        n_pub = row["published_splits"]
        row["rmse_z"], row["rmse_is"] = compare(row["rmse"], pub_rmse, n_pub)
        row["nll_z"], row["nll_is"] = compare(row["nll"], pub_nll, n_pub)
        digits = 3 if abs(row["rmse"][0]) < 1 else 2
        print(f"| {name} | {row['splits']} | {row['batch_size']}, {row['learning_rate']:g} | "
              f"{fmt(row['rmse'], digits)} | {fmt_published(pub_rmse, n_pub, digits)} | "
              f"{row['rmse_z']:+.1f} | {row['rmse_is']} | {fmt(row['nll'], 2)} | "
              f"{fmt_published(pub_nll, n_pub, 2)} | {row['nll_z']:+.1f} | {row['nll_is']} | "
              f"{row['seconds']:.0f} |"
              + (f" ({row['diverged']} members diverged)" if row["diverged"] else ""), flush=True)
        rows.append(row)

    print("\nSplit-to-split standard deviation (one ensemble per split; mean over seeds) beside "
          "the published ±, and each seed's mean over splits:\n")
    print("| data set | RMSE SD | published ± | NLL SD | published ± | NLL per seed |\n"
          "| --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        pub_rmse, pub_nll = PUBLISHED[row["name"]]
        digits = 3 if abs(row["rmse"][0]) < 1 else 2
        print(f"| {row['name']} | {row['rmse_sd']:.{digits}f} | {pub_rmse[1]:.2f} | "
              f"{row['nll_sd']:.2f} | {pub_nll[1]:.2f} | "
              f"{' / '.join(f'{v:.3f}' for v in row['nll_per_seed'])} |")
    if args.select:
        print(f"\nValidation NLL (mean over splits; fitted on {1 - VALIDATION_FRACTION:.0%} of "
              f"each training split) per batch size and learning rate; * = chosen:\n")
        print("| data set | " + " | ".join(f"lr {r:g}" for r in args.learning_rates) + " |\n"
              "| --- |" + " ---: |" * len(args.learning_rates))
        for row in rows:
            for batch_size in sorted({b for b, _ in row["validation"]}):
                cells = [f"{row['validation'][batch_size, r]:.3f}"
                         + ("*" if (batch_size, r) == row["chosen"] else "")
                         for r in args.learning_rates]
                print(f"| {row['name']}, batch {batch_size} | " + " | ".join(cells) + " |")
    verdicts = [row["nll_is"] for row in rows]
    print("\nNLL against the published deep ensembles: "
          + ", ".join(f"{verdicts.count(v)} {v}" for v in ("comparable", "lower", "higher", "n/a")
                      if v in verdicts)
          + f" (of {len(rows)}); total {time.perf_counter() - total:.0f} s "
          f"({time.process_time() - cpu:.0f} s CPU time).")
    return rows


if __name__ == "__main__":
    main()
