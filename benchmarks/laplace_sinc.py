"""Mixtures of Laplace approximations on the sinc network, against the deep ensemble.

Fits the tutorial's deep ensemble (examples/sinc_regression.py: a 1-32-32-1 tanh
network, 1,153 weights, 80 points; ``EnsembleMAP(bnn, optax.adam(5e-3))``, ``--steps``
steps), then turns every member into a Laplace approximation with
``laplace_members`` for each structure (full, diagonal, low-rank k=20, and full over
the last layer with the other layers held at the points, ``sites=["W3", "b3"]``; the GGN) and
prior precision (the model's, and the evidence's per member), and scores each
mixture's predictive on 200 noisy test points on [-12, 12] (the training inputs
cover [-10, 10]) -- test NLL, 95% coverage, RMSE against the true function -- with
the predictive by weight draws through the network (``ensemble_predictive``) and
linearized (``linearized_predictive``), next to the deep ensemble and the oracle
(the true function with the known noise), all scored by the tutorial's ``scores``.
Also printed: each ``laplace_members`` call's wall time (first call, compiling),
the members excluded and the median prior-precision factor.

    python benchmarks/laplace_sinc.py                 # E = 16, 3000 steps
    python benchmarks/laplace_sinc.py --ensemble-size 4 --steps 300 --num-samples 50
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
from jax import random
import numpy as np
import optax

from numpyro_ensemble import (
    EnsembleMAP,
    ensemble_predictive,
    laplace_exclusions,
    laplace_members,
    laplace_prior_precision,
    linearized_predictive,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from sinc_regression import bnn, scores, sinc_data, truth  # noqa: E402

STRUCTURES = ("full", "diagonal", "lowrank", "last_layer")
# laplace_members' arguments for each of STRUCTURES: last_layer is full over the last
# layer's 33 weights (W3, b3), the other layers held at each member's point
ARGUMENTS = {
    "full": {"structure": "full"},
    "diagonal": {"structure": "diagonal"},
    "lowrank": {"structure": "lowrank"},
    "last_layer": {"structure": "full", "sites": ["W3", "b3"]},
}
PRIORS = ("model", "evidence")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree.leaves(out))
    return out, time.perf_counter() - start


def row(name, f, y_truth, y_test, **extra):
    s = scores(np.asarray(f).reshape(-1, y_test.shape[0]), y_truth, y_test, random.key(3))
    return {"method": name, "nll": s["nll"], "coverage95": s["coverage95"],
            "rmse_truth": s["rmse_truth"], **extra}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ensemble-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES), choices=STRUCTURES)
    args = parser.parse_args(argv)
    E, S = args.ensemble_size, args.num_samples
    x, y, x_test, y_test = sinc_data(random.key(0))
    y_truth = truth(x_test)
    ens = EnsembleMAP(bnn, optax.adam(5e-3), ensemble_size=E)
    result, fit_s = timed(lambda: ens.run(random.key(1), args.steps, x, y, progress_bar=False))
    points = ensemble_predictive(ens, random.key(2), result.params, x_test, num_samples=1,
                                 return_sites=["f"])["f"]
    assert points.shape == (E, 1, x_test.shape[0])  # one point per member
    rows = [row("oracle (true f, known sigma)", y_truth[None], y_truth, y_test),
            row("deep ensemble (MAP points)", points, y_truth, y_test, seconds=fit_s)]
    for structure in args.structures:
        for prior in PRIORS:
            (laplace, lp), seconds = timed(lambda s=structure, p=prior: laplace_members(
                ens, result.params, x, y, curvature="ggn", rank=args.rank,
                prior_precision=p, **ARGUMENTS[s]))
            excluded = len(laplace_exclusions(laplace))
            factor = float(np.nanmedian(laplace_prior_precision(laplace)))
            assert np.asarray(lp["auto_loc"]).shape[0] == E  # every member, one Laplace each
            extra = {"seconds": seconds, "excluded": excluded, "prior_factor": factor}
            sampled = ensemble_predictive(laplace, random.key(4), lp, x_test, num_samples=S,
                                          return_sites=["f"])["f"]
            linear = linearized_predictive(laplace, random.key(4), lp, x_test, num_samples=S,
                                           return_sites=["f"])["f"]
            assert sampled.shape == linear.shape == (E, S, x_test.shape[0])
            name = f"Laplace {structure}, {prior} prior"
            rows.append(row(f"{name}, sampled", sampled, y_truth, y_test, **extra))
            rows.append(row(f"{name}, linearized", linear, y_truth, y_test, **extra))
    print(f"sinc network, E={E}, {args.steps} steps, S={S} draws per member, "
          f"rank {args.rank}; test points on [-12, 12]")
    print(f"{'method':48s} {'NLL':>7s} {'cov95':>6s} {'RMSE':>6s} {'excl':>4s} "
          f"{'prior x':>8s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['method']:48s} {r['nll']:7.3f} {r['coverage95']:6.3f} {r['rmse_truth']:6.3f} "
              f"{r.get('excluded', ''):>4} {r.get('prior_factor', float('nan')):8.3g} "
              f"{r.get('seconds', float('nan')):8.2f}")
    return rows


if __name__ == "__main__":
    main()
