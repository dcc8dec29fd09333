"""Mini-batch steps: ``EnsembleMAP.run`` against hand-written JAX doing the same work, in one process.

A Bayesian logistic regression (``--features`` inputs, N(0, 1) priors) on ``N``
points, fitted by ``E`` members with Adam on mini-batches of ``B`` drawn through
``numpyro.plate("data", N, subsample_size=B)``. All ways are one jitted scan that
vmaps the members' steps, from the same per-member starts (``EnsembleMAP``'s own,
``init_to_median``), with the data passed as jit arguments:

  floor    pure JAX, one per mode: the log joint written by hand, optax Adam, the
           data gathered from one shared copy, and the batch indices that ``run``
           draws in that mode, from the library's own pure-JAX streams
           (``batching.stream_keys`` / ``position_at`` / ``advance``), checked equal to
           ``EnsembleMAP.batch_indices`` for a few steps;
  epoch    ``EnsembleMAP(subsample="epoch")`` (the default: a shuffle per epoch);
  iid      ``EnsembleMAP(subsample="iid")`` (uniform with replacement per step);
  numpyro  ``EnsembleMAP(subsample="numpyro")``: NumPyro draws the plate's indices
           itself (what a hand-vmapped ``SVI.run`` does); set against the epoch floor.

Each is timed on a second, steady call with the same shapes (best of ``--repeats``);
reported as member-steps per second and as the ratio of each mode to its floor.
Since a mode and its floor take the same steps from the same starts on the same
indices, their fitted points agree up to float rounding ("|floor - ens|").

    python benchmarks/bench_minibatch.py                        # N=20000, B=128, E=8
    python benchmarks/bench_minibatch.py --n 50000 --batch 256 --sizes 8 64 1024
"""

from __future__ import annotations

import argparse
from functools import partial
import time

import jax
from jax import lax, random
import jax.numpy as jnp
from jax.scipy.stats import norm
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax

from numpyro_ensemble import EnsembleMAP
from numpyro_ensemble.engine import batching

MODES = ("epoch", "iid", "numpyro")


def logistic(x, y=None, batch=128):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as i:
        numpyro.sample("y", dist.Bernoulli(logits=x[i] @ w + b), obs=y[i])


def floor_fns(mode, *, n, batch, learning_rate):
    """The MAP fits in plain JAX with the indices ``EnsembleMAP(subsample=mode).run``
    draws: ``run(stream_keys, stream, params, x, y, steps)`` and the indices alone,
    ``indices(stream_keys, stream, steps) -> (E, T, B)``, from the same ``draw``."""
    plates = (batching.Plate("data", n, batch),)
    opt = optax.adam(learning_rate)

    def loss(params, xb, yb):
        logits = xb @ params["w"] + params["b"]
        # Bernoulli(logits) log-likelihood; this form ran faster here than optax's
        # sigmoid_binary_cross_entropy (two log-sigmoids).
        log_lik = (yb * logits - jax.nn.softplus(logits)).sum() * (n / batch)
        log_prior = norm.logpdf(params["w"]).sum() + norm.logpdf(params["b"])
        return -(log_lik + log_prior)

    def member_step(params, opt_state, i, x, y):
        value, grads = jax.value_and_grad(loss)(params, x[i], y[i])
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def draw(keys, stream):
        """Every member's indices for this step, (E, B), and the stream moved on."""
        indices, stream = batching.advance(plates, mode, keys, stream)
        return indices["data"], stream

    @partial(jax.jit, static_argnames="steps")
    def run(keys, stream, params, x, y, steps):
        step = jax.vmap(member_step, in_axes=(0, 0, 0, None, None))

        def body(carry, _):
            params, opt_state, stream = carry
            i, stream = draw(keys, stream)
            params, opt_state, losses = step(params, opt_state, i, x, y)
            return (params, opt_state, stream), losses

        carry = (params, jax.vmap(opt.init)(params), stream)
        (params, _, _), losses = lax.scan(body, carry, None, length=steps)
        return params, losses.T

    @partial(jax.jit, static_argnames="steps")
    def indices(keys, stream, steps):
        def body(stream, _):
            i, stream = draw(keys, stream)
            return stream, i

        _, out = lax.scan(body, stream, None, length=steps)
        return jnp.swapaxes(out, 0, 1)

    return plates, run, indices


def timed(fn, repeats):
    out = jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return out, best


def check_members(points, size, name):
    """Every leaf has the member axis, and (E > 1) the E members are distinct fits."""
    leaves = [np.asarray(leaf).reshape(size, -1) for leaf in jax.tree.leaves(points)]
    flat = np.concatenate(leaves, axis=1)
    assert np.isfinite(flat).all(), f"{name}: non-finite params"
    distinct = len(np.unique(flat, axis=0))
    assert size == 1 or distinct == size, f"{name}: {distinct} distinct members of {size}"
    return distinct


def bench(members, x, y, args):
    rng_key, n, B = random.key(0), x.shape[0], args.batch
    optim = optax.adam(args.learning_rate)
    row = {"E": members, "distinct": {}, "diff": {}}
    for mode in MODES:
        ens = EnsembleMAP(logistic, optim, ensemble_size=members, subsample=mode)
        # The members' starts in run(rng_key): the floors start there too.
        starts = ens.get_points(ens.init(rng_key, x, y, batch=B))
        result, row[mode] = timed(
            lambda ens=ens: ens.run(rng_key, args.steps, x, y, batch=B, progress_bar=False),
            args.repeats,
        )
        points = ens.get_points(result.params)
        assert all(leaf.shape[0] == members for leaf in jax.tree.leaves(points))
        row["distinct"][mode] = check_members(points, members, mode)
        if mode == "numpyro":
            continue
        plates, run, indices = floor_fns(mode, n=n, batch=B, learning_rate=args.learning_rate)
        keys = batching.stream_keys(ens.member_keys(rng_key))
        stream = batching.position_at(plates, mode, 0)
        # The floor draws exactly the indices run draws (a few steps suffice: one stream).
        check = min(args.steps, 5)
        expected = ens.batch_indices(rng_key, check, x, y, batch=B)["data"]
        drawn = indices(keys, stream, check)
        assert drawn.shape == (members, check, B)
        np.testing.assert_array_equal(np.asarray(drawn), np.asarray(expected))
        (floor_params, _), row[f"floor_{mode}"] = timed(
            lambda run=run, keys=keys, stream=stream, starts=starts: run(
                keys, stream, starts, x, y, args.steps
            ),
            args.repeats,
        )
        row["distinct"][f"floor_{mode}"] = check_members(floor_params, members, f"floor {mode}")
        row["diff"][mode] = max(
            float(jnp.max(jnp.abs(floor_params[k] - points[k]))) for k in ("w", "b")
        )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args = parser.parse_args(argv)

    kx, kw, ky = random.split(random.key(0), 3)
    x = random.normal(kx, (args.n, args.features))
    w = random.normal(kw, (args.features,))
    y = random.bernoulli(ky, jax.nn.sigmoid(x @ w)).astype(jnp.float32)
    print(f"logistic regression, N={args.n}, B={args.batch}, {args.features} features, "
          f"{args.steps} steps; jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"{'E':>6} {'floor epoch':>12} {'epoch':>12} {'floor iid':>12} {'iid':>12} "
          f"{'numpyro':>12}   member-steps/s")
    rows = []
    for members in args.sizes:
        row = bench(members, x, y, args)
        rate = lambda t, m=members: m * args.steps / t  # noqa: E731
        print(f"{members:>6} " + " ".join(
            f"{rate(row[k]):>12.3g}" for k in ("floor_epoch", "epoch", "floor_iid", "iid", "numpyro")
        ))
        print(f"{'ratio':>6} {'':>12} {row['epoch'] / row['floor_epoch']:>12.2f} {'':>12}"
              f" {row['iid'] / row['floor_iid']:>12.2f} {row['numpyro'] / row['floor_epoch']:>12.2f}"
              "   steady time / its floor's (numpyro: / the epoch floor's)")
        print(f"{'':>6} |floor - ens| of the fitted points: epoch {row['diff']['epoch']:.1e}, "
              f"iid {row['diff']['iid']:.1e}", flush=True)
        rows.append(row)
    print("numpyro: EnsembleMAP(subsample='numpyro'), NumPyro draws the plate's indices "
          "(what a hand-vmapped SVI.run does)")
    return rows


if __name__ == "__main__":
    main()
