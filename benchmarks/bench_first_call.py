"""Time to a first result: a fresh process's first ``init`` and ``run``, against plain NumPyro.

Each measurement runs in a fresh Python process (nothing compiled yet), on the
sinc BNN with ``--steps`` steps, through public calls only:

  plain     ``SVI(bnn, AutoNormal(bnn), ...)``: its first ``init`` (NumPyro's eager
            guide set-up and init), then its first ``run(..., init_state=state)``
            (the scan's compile and the steps);
  ensemble  ``EnsembleSVI(..., ensemble_size=E)``: its first ``init`` (the same eager
            set-up plain SVI makes, then the per-member init program: compile + run),
            then its first ``run(..., init_state=state)`` (the scan's compile, the
            steps and ``get_params``);
  cached    the same ensemble in a second process with ``enable_compilation_cache``
            (the first process filled the cache); once as is, once with a fixed
            ``PYTHONHASHSEED`` in both processes (NumPyro's ``Trace_ELBO`` sums its
            sites in ``set`` order, which Python randomises per process; the ensemble
            adds them by name, so both rows should hit the cache alike);
  again     in the ensemble's process, once compiled: the fixed cost of a whole
            ``run(rng_key, s, ...)`` (init included) beyond its steps, from steady runs
            of ``s`` steps and of one step (best of ``--repeats`` each): a step takes
            (t(s) - t(1)) / (s - 1), so the rest is t(1) less one step. (A short run
            for the rest, not t(2s) - t(s): its noise is a share of a short time.)

    python benchmarks/bench_first_call.py               # E = 16, 200 steps
    python benchmarks/bench_first_call.py --size 1024
    python benchmarks/bench_first_call.py --size 2 --steps 5 --no-cache --shared-cache /tmp/c
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
t_start = time.perf_counter()
sys.path.insert(0, {examples!r})
import jax
from jax import random
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from sinc_regression import bnn, sinc_data
from numpyro_ensemble import EnsembleSVI, enable_compilation_cache

mode, size, steps, repeats, cache = {mode!r}, {size}, {steps}, {repeats}, {cache!r}
if cache:
    enable_compilation_cache(cache)
x, y, *_ = sinc_data(random.key(0))
jax.block_until_ready(x)
out = {{"import": time.perf_counter() - t_start}}

def clock(fn):
    t = time.perf_counter(); result = jax.block_until_ready(fn()); return result, time.perf_counter() - t

if mode == "plain":
    svi = SVI(bnn, AutoNormal(bnn), optax.adam(5e-3), Trace_ELBO())
else:
    svi = EnsembleSVI(bnn, AutoNormal(bnn), optax.adam(5e-3), Trace_ELBO(), ensemble_size=size)
state, out["init"] = clock(lambda: svi.init(random.key(0), x, y))
result, out["run"] = clock(
    lambda: svi.run(random.key(0), steps, x, y, progress_bar=False, init_state=state)
)
out["total"] = out["init"] + out["run"]
out["shape"] = list(result.losses.shape)
if mode == "ensemble":
    def best(num_steps):
        run = lambda: svi.run(random.key(1), num_steps, x, y, progress_bar=False).params
        clock(run)  # compiles the scan of this length, if new
        return min(clock(run)[1] for _ in range(repeats))

    whole, one = best(steps), best(1)
    step = (whole - one) / (steps - 1)
    out["steps"] = steps * step
    out["again"] = one - step
print("RESULT", json.dumps(out))
"""


def child(mode, size, steps, repeats, cache="", hash_seed=None):
    examples = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
    code = CHILD.format(examples=examples, mode=mode, size=size, steps=steps, repeats=repeats,
                        cache=cache)
    env = {**os.environ}
    env.pop("PYTHONHASHSEED", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # fresh means fresh: only ``cache`` caches
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = str(hash_seed)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode:
        raise SystemExit(out.stderr[-4000:])
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.split(" ", 1)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5,
                        help="steady runs of s steps and of one step, each the best of this many")
    parser.add_argument("--no-cache", action="store_true",
                        help="skip the four processes with a compilation cache")
    parser.add_argument(
        "--shared-cache", metavar="DIR", default="",
        help="a compilation cache for the plain and ensemble processes too, so the "
             "second loads what the first compiled: a quick check, not a measurement",
    )
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the fixed cost compares s steps with one)")

    rows = {
        "plain": child("plain", 1, args.steps, args.repeats, args.shared_cache),
        "ensemble": child("ensemble", args.size, args.steps, args.repeats, args.shared_cache),
    }
    if not args.no_cache:
        with tempfile.TemporaryDirectory() as cache:
            child("ensemble", args.size, args.steps, args.repeats, cache)  # fills the cache
            rows["cached"] = child("ensemble", args.size, args.steps, args.repeats, cache)
        with tempfile.TemporaryDirectory() as cache:
            child("ensemble", args.size, args.steps, args.repeats, cache, hash_seed=0)
            rows["pinned"] = child("ensemble", args.size, args.steps, args.repeats, cache,
                                   hash_seed=0)

    plain, ensemble = rows["plain"], rows["ensemble"]
    print(f"sinc BNN, AutoNormal, {args.steps} steps; fresh processes")
    print(f"{'':<36} {'plain SVI':>10} {f'EnsembleSVI E={args.size}':>18} {'ratio':>6}")
    for phase, what in (("init", "first init"), ("run", "first run(init_state=...)"),
                        ("total", "time to first result")):
        print(f"{what:<36} {plain[phase]:>9.2f}s {ensemble[phase]:>17.2f}s"
              f" {ensemble[phase] / plain[phase]:>6.2f}")
    print(f"{'(import jax, numpyro, the library)':<36} {plain['import']:>9.2f}s"
          f" {ensemble['import']:>17.2f}s")
    for name, what in (("cached", "second process, compilation cache"),
                       ("pinned", "... and a fixed PYTHONHASHSEED")):
        if name in rows:
            print(f"{what:<36} {'':>10} {rows[name]['total']:>17.2f}s"
                  f" {rows[name]['total'] / ensemble['total']:>6.2f}   x the first process")
    print(f"steady run of {args.steps} steps in the same process: its steps "
          f"{1000 * ensemble['steps']:.1f} ms, the rest {1000 * ensemble['again']:.1f} ms")
    return rows


if __name__ == "__main__":
    main()
