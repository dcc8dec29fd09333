"""Time ``EnsembleSVI.run`` against plain NumPyro on the sinc BNN, in one process.

Three ways to fit E members of the sinc model (examples/sinc_regression.py):

  loop  a Python loop of ``SVI.run(progress_bar=False)``, one member per call
        (each call traces and compiles its scan again);
  vmap  ``jax.jit(jax.vmap(lambda k: SVI.run(k, ...)))``: the hand-made baseline
        (with the guide's prototype built beforehand, else it leaks tracers);
  ens   ``EnsembleSVI.run``, with ``progress_bar`` off and on.

For each E, the first call (compile + run) and a second, steady call with the
same shapes are timed; compile = first - steady. Everything is reported as
ratios measured side by side in this process, so the machine's speed cancels.

    python benchmarks/bench_run.py                       # E in 1 4 16 64, 2000 steps
    python benchmarks/bench_run.py --sizes 1 4 --steps 200 --loop-max 4
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
from jax import random
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoNormal
import optax

from numpyro_ensemble import EnsembleSVI

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from sinc_regression import bnn, sinc_data  # noqa: E402

GUIDES = {"normal": AutoNormal, "delta": AutoDelta}


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def first_and_steady(fn, repeats=3):
    first = timed(fn)
    steady = min(timed(fn) for _ in range(repeats))  # the least disturbed of a few calls
    return first, steady


def bench(size, steps, guide, loop_max, x, y):
    optim = optax.adam(5e-3)
    loss = Trace_ELBO()
    keys = random.split(random.key(0), size)
    row = {"E": size}

    if size <= loop_max:
        def loop():
            return [
                SVI(bnn, guide, optim, loss).run(k, steps, x, y, progress_bar=False).params
                for k in keys
            ]

        row["loop"] = timed(loop)  # every call compiles: there is no steady state

    svi = SVI(bnn, guide, optim, loss)
    vmapped = jax.jit(jax.vmap(lambda k: svi.run(k, steps, x, y, progress_bar=False).params))
    row["vmap_first"], row["vmap"] = first_and_steady(lambda: vmapped(keys))

    ens = EnsembleSVI(bnn, guide, optim, loss, ensemble_size=size)
    row["ens_first"], row["ens"] = first_and_steady(
        lambda: ens.run(random.key(0), steps, x, y, progress_bar=False).params
    )
    row["bar_first"], row["bar"] = first_and_steady(
        lambda: ens.run(random.key(0), steps, x, y, progress_bar=True).params
    )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--guide", choices=sorted(GUIDES), default="normal")
    parser.add_argument(
        "--loop-max", type=int, default=4,
        help="largest E for the Python loop of SVI.run (it compiles once per member)",
    )
    args = parser.parse_args(argv)

    x, y, *_ = sinc_data(random.key(0))
    guide = GUIDES[args.guide](bnn)
    setup = timed(lambda: SVI(bnn, guide, optax.adam(5e-3), Trace_ELBO()).init(random.key(0), x, y))
    print(
        f"sinc BNN, {args.steps} steps, guide {type(guide).__name__}, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}"
    )
    print(f"guide setup (numpyro's initialize_model, once per guide, paid by SVI too): {setup:.1f} s")

    rows = [bench(size, args.steps, guide, args.loop_max, x, y) for size in args.sizes]
    base_compile = rows[0]["ens_first"] - rows[0]["ens"]
    print()
    print(
        f"{'E':>4} {'ens steady':>11} {'vmap steady':>12} {'ens/vmap':>9} {'bar on/off':>11}"
        f" {'ens compile':>12} {'vs E=' + str(rows[0]['E']):>8} {'vmap compile':>13} {'loop/ens':>9}"
    )
    for r in rows:
        ens_compile = r["ens_first"] - r["ens"]
        loop = f"{r['loop'] / r['ens_first']:>9.1f}" if "loop" in r else f"{'-':>9}"
        print(
            f"{r['E']:>4} {r['ens']:>10.3f}s {r['vmap']:>11.3f}s {r['ens'] / r['vmap']:>9.2f}"
            f" {r['bar'] / r['ens']:>11.2f} {ens_compile:>11.2f}s {ens_compile / base_compile:>8.2f}"
            f" {r['vmap_first'] - r['vmap']:>12.2f}s {loop}"
        )
    print(
        "\nens/vmap and bar on/off: steady-time ratios (targets <= 1.1); 'vs E=': ensemble compile"
        "\ntime relative to the smallest E (flat = not growing with E); loop/ens: a Python loop"
        "\nof SVI.run against the first (compiling) EnsembleSVI.run."
    )
    return rows


if __name__ == "__main__":
    main()
