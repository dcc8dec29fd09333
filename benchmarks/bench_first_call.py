"""Time to a first result: a fresh process's first ``run``, against plain NumPyro.

Each measurement runs in a fresh Python process (nothing compiled yet), on the
sinc BNN with ``--steps`` steps:

  plain     ``SVI(bnn, AutoNormal(bnn), ...).run(...)``: one fit, its first call
            (NumPyro's eager guide set-up, the scan's compile, the steps);
  ensemble  ``EnsembleSVI(..., ensemble_size=E).run(...)``, its first call, split into
            NumPyro's guide set-up (the same eager pass plain SVI makes), the per-member
            init (compile + run), the scan (compile + steps) and the rest;
  cached    the same ensemble in a second process with ``enable_compilation_cache``
            (the first process filled the cache); once as is, once with a fixed
            ``PYTHONHASHSEED`` in both processes: NumPyro's ``Trace_ELBO`` sums its sites
            in ``set`` order, which Python randomises per process, so without it the
            step programs differ from process to process and are compiled again;
  again     in the ensemble's process: a second ``run`` with the same shapes, minus its
            steps alone (the scanned program called directly): the fixed cost of a run.

    python benchmarks/bench_first_call.py               # E = 16, 200 steps
    python benchmarks/bench_first_call.py --size 1024
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
import json, pathlib, sys, time
t_start = time.perf_counter()
sys.path.insert(0, {examples!r})
import jax
from jax import random
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from sinc_regression import bnn, sinc_data
from numpyro_ensemble import EnsembleSVI, enable_compilation_cache, loop

mode, size, steps, cache = {mode!r}, {size}, {steps}, {cache!r}
if cache:
    enable_compilation_cache(cache)
x, y, *_ = sinc_data(random.key(0))
jax.block_until_ready(x)
out = {{"import": time.perf_counter() - t_start}}

def clock(fn):
    t = time.perf_counter(); result = jax.block_until_ready(fn()); return result, time.perf_counter() - t

if mode == "plain":
    svi = SVI(bnn, AutoNormal(bnn), optax.adam(5e-3), Trace_ELBO())
    _, out["total"] = clock(lambda: svi.run(random.key(0), steps, x, y, progress_bar=False).params)
else:
    ens = EnsembleSVI(bnn, AutoNormal(bnn), optax.adam(5e-3), Trace_ELBO(), ensemble_size=size)
    t0 = time.perf_counter()
    # The phases of run(), in order (the same calls run() makes).
    split = ens._split((x, y), {{}}); ens._inspect(split)
    keys = ens.member_keys(random.key(0))
    progs = loop.programs(ens)
    _, out["numpyro setup"] = clock(lambda: ens._set_up(keys[0], (x, y), {{}}, progs, False) or 0)
    state, out["init"] = clock(lambda: ens.init(random.key(0), x, y))
    stream = loop.batching.position_at((), ens.subsample, 0)
    dyn = ens._put_args(split)
    chunk = lambda: progs.chunk(state, stream, None, dyn, static=split.static, axes=split.axes,
                                plates=(), length=steps, stable_update=False, forward_mode=False)
    _, out["scan"] = clock(chunk)
    _, out["rest"] = clock(lambda: progs.get_params(state))
    out["total"] = time.perf_counter() - t0
    _, out["steps"] = clock(chunk)
    _, second = clock(lambda: ens.run(random.key(1), steps, x, y, progress_bar=False).params)
    out["again"] = second - out["steps"]
print("RESULT", json.dumps(out))
"""


def child(mode, size, steps, cache="", hash_seed=None):
    examples = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
    code = CHILD.format(examples=examples, mode=mode, size=size, steps=steps, cache=cache)
    env = {**os.environ}
    env.pop("PYTHONHASHSEED", None)
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
    args = parser.parse_args(argv)

    plain = child("plain", 1, args.steps)
    ensemble = child("ensemble", args.size, args.steps)
    with tempfile.TemporaryDirectory() as cache:
        child("ensemble", args.size, args.steps, cache)  # fills the cache
        cached = child("ensemble", args.size, args.steps, cache)
    with tempfile.TemporaryDirectory() as cache:
        child("ensemble", args.size, args.steps, cache, hash_seed=0)
        pinned = child("ensemble", args.size, args.steps, cache, hash_seed=0)

    print(f"sinc BNN, AutoNormal, {args.steps} steps; fresh processes")
    print(f"plain SVI.run first call (one fit):          {plain['total']:7.2f} s")
    print(f"EnsembleSVI.run first call (E={args.size}):  {ensemble['total']:7.2f} s"
          f"   = {ensemble['total'] / plain['total']:.2f} x plain")
    for phase in ("numpyro setup", "init", "scan", "rest"):
        print(f"    {phase:<14} {ensemble[phase]:7.2f} s")
    print(f"    (the steps alone: {ensemble['steps']:.3f} s)")
    print(f"second process, compilation cache:           {cached['total']:7.2f} s"
          f"   = {cached['total'] / ensemble['total']:.2f} x the first")
    print(f"    ... and a fixed PYTHONHASHSEED:          {pinned['total']:7.2f} s"
          f"   = {pinned['total'] / ensemble['total']:.2f} x the first")
    print(f"second run in-process, beyond its steps:     {1000 * ensemble['again']:7.1f} ms")
    return plain, ensemble, cached, pinned


if __name__ == "__main__":
    main()
