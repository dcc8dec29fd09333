"""Mini-batch steps: ``EnsembleMAP.run`` against a hand-written JAX ensemble, in one process.

A Bayesian logistic regression (``--features`` inputs, N(0, 1) priors) on ``N``
points, fitted by ``E`` members with Adam on mini-batches of ``B`` drawn through
``numpyro.plate("data", N, subsample_size=B)``. Four ways, all one jitted scan:

  floor    pure JAX: the log joint written by hand, ``random.randint`` batch indices,
           optax Adam, ``vmap`` over members inside ``lax.scan`` (no NumPyro);
  epoch    ``EnsembleMAP(subsample="epoch")`` (the default: a shuffle per epoch);
  iid      ``EnsembleMAP(subsample="iid")`` (``randint`` per step, like the floor);
  numpyro  ``EnsembleMAP(subsample="numpyro")``: NumPyro draws the indices
           (what a hand-vmapped ``SVI.run`` does).

Each is timed on a second, steady call with the same shapes (best of ``--repeats``);
reported as member-steps per second and as ratios to the floor (goal: <= 1.3).

    python benchmarks/bench_minibatch.py                        # N=20000, B=128, E=8
    python benchmarks/bench_minibatch.py --n 50000 --batch 256 --sizes 8 64 1024
"""

from __future__ import annotations

import argparse
import time

import jax
from jax import lax, random
import jax.numpy as jnp
from jax.scipy.stats import norm
import numpyro
import numpyro.distributions as dist
import optax

from numpyro_ensemble import EnsembleMAP


def logistic(x, y=None, batch=128):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0], subsample_size=batch) as i:
        numpyro.sample("y", dist.Bernoulli(logits=x[i] @ w + b), obs=y[i])


def floor_run(x, y, *, members, steps, batch, learning_rate):
    """The same MAP fits in plain JAX: a hand-written log joint, randint batches."""
    n = x.shape[0]
    opt = optax.adam(learning_rate)

    def loss(params, xb, yb):
        logits = xb @ params["w"] + params["b"]
        log_lik = -optax.sigmoid_binary_cross_entropy(logits, yb).sum() * (n / batch)
        log_prior = norm.logpdf(params["w"]).sum() + norm.logpdf(params["b"])
        return -(log_lik + log_prior)

    def member_step(carry):
        params, opt_state, key = carry
        key, sub = random.split(key)
        i = random.randint(sub, (batch,), 0, n)
        value, grads = jax.value_and_grad(loss)(params, x[i], y[i])
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), value

    @jax.jit
    def run(key):
        keys = random.split(key, members)
        params = {"w": jnp.zeros((members, x.shape[1])), "b": jnp.zeros(members)}
        opt_state = jax.vmap(opt.init)(params)

        def body(carry, _):
            return jax.vmap(member_step)(carry)

        (params, _, _), losses = lax.scan(body, (params, opt_state, keys), None, length=steps)
        return params, losses

    return lambda: run(random.key(0))


def timed(fn, repeats):
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


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
    print(f"{'E':>6} {'floor':>12} {'epoch':>12} {'iid':>12} {'numpyro':>12}   member-steps/s; "
          "ratio to floor")
    rows = []
    for members in args.sizes:
        row = {"E": members}
        row["floor"] = timed(floor_run(x, y, members=members, steps=args.steps, batch=args.batch,
                                       learning_rate=args.learning_rate), args.repeats)
        for mode in ("epoch", "iid", "numpyro"):
            ens = EnsembleMAP(logistic, optax.adam(args.learning_rate), ensemble_size=members,
                              subsample=mode)
            row[mode] = timed(
                lambda ens=ens: ens.run(random.key(0), args.steps, x, y, batch=args.batch,
                                        progress_bar=False).params,
                args.repeats,
            )
        rate = lambda t, m=members: m * args.steps / t  # noqa: E731
        print(f"{members:>6} " + " ".join(f"{rate(row[k]):>12.3g}" for k in ("floor", "epoch", "iid", "numpyro")))
        print(f"{'':>6} {1.0:>12.2f} " + " ".join(f"{row[k] / row['floor']:>12.2f}" for k in ("epoch", "iid", "numpyro")))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
