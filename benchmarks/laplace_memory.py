"""Memory and time of laplace_members on MLPs of 1k to 1M weights, next to the fit's.

For each width (a 1-H-H-1 tanh network of the sinc tutorial's form, N(0, 1) weights,
80 sinc points, known noise 0.1) two fresh processes run: one the fit alone
(``EnsembleMAP(net, optax.adam(1e-3), ensemble_size=E).run(..., steps)``), one the
same fit then ``laplace_members(ens, params, x, y, curvature="ggn", structure=S)``
(low-rank, k = 20, and diagonal up to ``--diagonal-max`` weights: its exact
diagonal costs one backward pass per likelihood output). Each prints its peak resident memory
(``ru_maxrss``) and the wall time of each call (first call: compiling included,
``block_until_ready`` before the clock stops). The table gives the peak of the
Laplace process over the fit's, and the Laplace call's time over the fit's, measured
side by side on the same machine.

    python benchmarks/laplace_memory.py                       # E = 8, 1k to 1M weights
    python benchmarks/laplace_memory.py --widths 32 100 --ensemble-size 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

WIDTHS = (32, 100, 316, 1000)  # 1,153 / 10,401 / 101,121 / 1,004,001 weights


def weights(width: int) -> int:
    return (1 * width + width) + (width * width + width) + (width + 1)


def child(width, structure, ensemble_size, steps, rank):
    import jax
    from jax import random
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    import optax

    from numpyro_ensemble import EnsembleMAP, laplace_exclusions, laplace_members

    def net(x, y=None):
        h = x[:, None]
        for i, (n_in, n_out) in enumerate([(1, width), (width, width), (width, 1)], start=1):
            w = numpyro.sample(f"W{i}", dist.Normal(0.0, 1.0).expand([n_in, n_out]).to_event(2))
            b = numpyro.sample(f"b{i}", dist.Normal(0.0, 1.0).expand([n_out]).to_event(1))
            h = h @ w / jnp.sqrt(n_in) + b
            if i < 3:
                h = jnp.tanh(h)
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(h[:, 0], 0.1), obs=y)

    x = random.uniform(random.key(0), (80,), minval=-10.0, maxval=10.0)
    y = jnp.sinc(x / jnp.pi) + 0.1 * random.normal(random.key(1), (80,))
    ens = EnsembleMAP(net, optax.adam(1e-3), ensemble_size=ensemble_size)
    start = time.perf_counter()
    params = ens.run(random.key(2), steps, x, y, progress_bar=False).params
    jax.block_until_ready(params)
    out = {"fit_s": time.perf_counter() - start}
    # the same work as the fit's: one point per member, every weight
    assert sum(v.size for v in jax.tree.leaves(params)) == ensemble_size * weights(width)
    if structure != "fit":
        start = time.perf_counter()
        laplace, lp = laplace_members(ens, params, x, y, curvature="ggn", structure=structure,
                                      rank=rank)
        jax.block_until_ready(lp)
        out["laplace_s"] = time.perf_counter() - start
        out["excluded"] = len(laplace_exclusions(laplace))
        assert lp["auto_loc"].shape == (ensemble_size, weights(width))
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run_child(*argv):
    done = subprocess.run([sys.executable, __file__, "--child", *map(str, argv)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--ensemble-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--structures", nargs="+", default=["lowrank", "diagonal"])
    parser.add_argument("--diagonal-max", type=int, default=200_000,
                        help="skip the diagonal structure above this many weights")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        width, structure, e, steps, rank = args.child
        return child(int(width), structure, int(e), int(steps), int(rank))
    print(f"E={args.ensemble_size}, {args.steps} fit steps, rank {args.rank}")
    print(f"{'weights':>9s} {'structure':9s} {'fit s':>7s} {'fit MB':>7s} {'laplace s':>9s} "
          f"{'peak MB':>8s} {'peak/fit':>8s} {'time/fit':>8s} {'excl':>4s}", flush=True)
    rows = []
    for width in args.widths:
        fit = run_child(width, "fit", args.ensemble_size, args.steps, args.rank)
        for structure in args.structures:
            if structure == "diagonal" and weights(width) > args.diagonal_max:
                continue
            lap = run_child(width, structure, args.ensemble_size, args.steps, args.rank)
            r = {"weights": weights(width), "structure": structure,
                 "fit_s": fit["fit_s"], "fit_peak_mb": fit["peak_mb"],
                 "laplace_s": lap["laplace_s"], "peak_mb": lap["peak_mb"],
                 "excluded": lap["excluded"],
                 "peak_ratio": lap["peak_mb"] / fit["peak_mb"],
                 "time_ratio": lap["laplace_s"] / fit["fit_s"]}
            rows.append(r)
            print(f"{r['weights']:9d} {r['structure']:9s} {r['fit_s']:7.1f} "
                  f"{r['fit_peak_mb']:7.0f} {r['laplace_s']:9.1f} {r['peak_mb']:8.0f} "
                  f"{r['peak_ratio']:8.2f} {r['time_ratio']:8.2f} {r['excluded']:4d}", flush=True)
    return rows


if __name__ == "__main__":
    main()
