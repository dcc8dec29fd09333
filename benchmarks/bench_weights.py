"""Cost of importance and stacking weights on the sinc BNN, in one process.

Fits an E-member AutoNormal ensemble of the sinc model (examples/sinc_regression.py:
``EnsembleSVI(bnn, AutoNormal(bnn, init_scale=1e-2), optax.adam(5e-3), Trace_ELBO())``)
for ``--steps`` steps, then times ``importance_weights`` (E^2 * S guide evaluations and
E * S model evaluations in one jitted pass, plus PSIS) and ``stacking_weights``
(E * S draws, pointwise log-likelihoods, PSIS-LOO per member, L-BFGS-B), first call
(compiling) and second call, next to the fit itself (its first ``run``, compile included).

    python benchmarks/bench_weights.py                      # E = 64, S = 100
    python benchmarks/bench_weights.py --sizes 16 64 256 --num-samples 100
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import jax
from jax import random
import numpy as np
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_ensemble import EnsembleSVI, importance_weights, stacking_weights

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from sinc_regression import bnn, sinc_data  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree.leaves(out))
    return out, time.perf_counter() - start


def measure(E, steps, S, x, y):
    # As the sinc tutorial builds its SVI ensembles (there with a cosine-decayed Adam).
    svi = EnsembleSVI(bnn, AutoNormal(bnn, init_scale=1e-2), optax.adam(5e-3), Trace_ELBO(),
                      ensemble_size=E)
    result, run_s = timed(lambda: svi.run(random.key(1), steps, x, y, progress_bar=False))
    params = result.params
    iw = lambda: importance_weights(svi, random.key(2), params, x, y, num_samples=S)  # noqa: E731
    st = lambda: stacking_weights(svi, random.key(3), params, x, y, num_samples=S)  # noqa: E731
    w, iw_first = timed(iw)
    _, iw_again = timed(iw)
    stacked, st_first = timed(st)
    _, st_again = timed(st)
    # The weights are of E members (each sums to 1): a wrong axis would not.
    for weights in (w.member_weights, stacked.member_weights):
        assert weights.shape == (E,) and math.isclose(float(np.sum(weights)), 1.0, rel_tol=1e-4)
    assert w.log_weights.shape == (E, S)
    row = {"E": E, "run": run_s, "iw_first": iw_first, "iw_again": iw_again,
           "stack_first": st_first, "stack_again": st_again, "pareto_k": w.pareto_k,
           "ess": w.ess}
    print(f"{E:>5} {run_s:>9.2f} {iw_first:>9.2f} {iw_again:>9.2f} {st_first:>12.2f} "
          f"{st_again:>12.2f} {w.pareto_k:>9.2f} {w.ess:>8.1f}")
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args(argv)
    x, y, *_ = sinc_data(random.key(0))
    S = args.num_samples
    print(f"sinc BNN ({x.shape[0]} points), AutoNormal, {args.steps} steps, S={S} draws per "
          f"member; jax {jax.__version__}, {jax.default_backend()}")
    print(f"{'E':>5} {'run [s]':>9} {'iw first':>9} {'iw again':>9} {'stack first':>12} "
          f"{'stack again':>12} {'pareto k':>9} {'ess':>8}")
    rows = [measure(E, args.steps, S, x, y) for E in args.sizes]
    print("times in s; 'run': the fit's first EnsembleSVI.run (compile included); "
          "'first' includes compiling.")
    return rows


if __name__ == "__main__":
    main()
