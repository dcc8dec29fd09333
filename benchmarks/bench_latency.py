"""Time to a trusted answer: each step of the recipe, its wall time and its compilations.

For four models (float64), in fresh processes, after imports and data loading:

  recipe  one process runs the recipe the docs recommend, step by step:
          ``EnsembleMAP(model, ensemble_size=8).run(key, 2000, ...)``,
          ``laplace_members``, ``importance_weights(..., num_samples=500)``,
          ``ensemble_summary(..., weights=iw)``, ``sample_posterior(..., weights=iw)``;
          then, in the same process, ``run`` again with a new ``EnsembleMAP`` and
          an equal optimizer built again (``optax.lbfgs()``: it should compile nothing);
  svi     plain ``SVI(model, AutoNormal(model), optax.adam(0.01), Trace_ELBO()).run(2000)``;
  nuts    default NUTS, 4 chains x (1,000 warm-up + 1,000 draws), vectorized;
  warm    NUTS warm-started from the ensemble, in one process: the recipe's fit,
          ``laplace_members`` and ``importance_weights``, then ``nuts_warm_start``
          and ``NUTSWarmStart.run`` (its own warm-up, 1,000 draws, 4 chains,
          vectorized; the check after warm-up and its restarts included).

Each step's wall time stops after ``jax.block_until_ready`` on its result; its
compilations are XLA backend compiles counted with a ``jax.monitoring`` listener.
The models (data made here, so nothing is downloaded):

  regression     ``kid_score ~ Normal(a + b * mom_iq, sigma)`` on 434 points with an
                 unscaled predictor (posteriordb's kidiq-kidscore_momiq form);
  eight_schools  the non-centred eight schools (``posteriordb_models.py``);
  gp             a Gaussian-process regression, 30 points (posteriordb's gp_regr form);
  sinc_bnn       the sinc tutorial's 1-32-32-1 network, 80 points (``examples/``).

    python benchmarks/bench_latency.py                       # all four, the docs' run
    python benchmarks/bench_latency.py --models regression --steps 200 --nuts-draws 100
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
MODELS = ("regression", "eight_schools", "gp", "sinc_bnn")
KINDS = ("recipe", "svi", "nuts", "warm")


def load(name):
    """``(model, args)`` of one of :data:`MODELS` (float64 data)."""
    import jax.numpy as jnp
    import numpy as np

    sys.path[:0] = [str(HERE), str(HERE.parent / "examples")]
    rng = np.random.default_rng(0)
    if name == "regression":
        import numpyro
        import numpyro.distributions as dist

        def regression(mom_iq, kid_score):
            a = numpyro.sample("a", dist.Normal(0.0, 100.0))
            b = numpyro.sample("b", dist.Normal(0.0, 10.0))
            sigma = numpyro.sample("sigma", dist.HalfNormal(50.0))
            with numpyro.plate("n", mom_iq.shape[0]):
                numpyro.sample("kid_score", dist.Normal(a + b * mom_iq, sigma), obs=kid_score)

        mom_iq = rng.normal(100.0, 15.0, 434)
        kid_score = 26.0 + 0.6 * mom_iq + rng.normal(0.0, 18.0, 434)
        return regression, (jnp.asarray(mom_iq), jnp.asarray(kid_score))
    if name == "eight_schools":
        from posteriordb_models import eight_schools_noncentered

        sigma = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
        y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
        return eight_schools_noncentered, (sigma, y)
    if name == "gp":
        from posteriordb_models import gp_regr

        x = np.linspace(-5.0, 5.0, 30)
        y = np.sin(x) + rng.normal(0.0, 0.3, 30)
        return gp_regr, (jnp.asarray(x), jnp.asarray(y))
    if name == "sinc_bnn":
        from jax import random
        from sinc_regression import bnn, sinc_data

        x, y, *_ = sinc_data(random.key(0))
        return bnn, (jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def child(name: str, kind: str, steps: int, nuts_draws: int) -> list:
    """Runs one kind of measurement in this (fresh) process; one row per step."""
    import jax

    jax.config.update("jax_enable_x64", True)
    from jax import random
    import jax.monitoring
    from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    import optax

    from numpyro_ensemble import (
        EnsembleMAP,
        ensemble_summary,
        importance_weights,
        laplace_members,
        nuts_warm_start,
        sample_posterior,
    )

    model, args = load(name)
    jax.block_until_ready(args)
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(duration)
        if event == "/jax/core/compile/backend_compile_duration" else None
    )
    rows = []

    def step(what, fn):
        before, start = len(compiles), time.perf_counter()
        out = fn()
        jax.block_until_ready(jax.tree.leaves(out))
        rows.append({"step": what, "wall": time.perf_counter() - start,
                     "compiles": len(compiles) - before})
        return out

    def fit_laplace_weights():
        """The first three steps of the recipe (and of the warm start)."""
        ens = EnsembleMAP(model, ensemble_size=8)
        result = step("EnsembleMAP.run", lambda: ens.run(random.key(0), steps, *args,
                                                        progress_bar=False))
        laplace, lp = step("laplace_members", lambda: laplace_members(ens, result.params, *args))
        iw = step("importance_weights", lambda: importance_weights(
            laplace, random.key(7), lp, *args, num_samples=500))
        return result, laplace, lp, iw

    if kind == "recipe":
        result, laplace, lp, iw = fit_laplace_weights()
        summary = step("ensemble_summary", lambda: ensemble_summary(
            laplace, random.key(3), result._replace(params=lp), *args, weights=iw))
        step("sample_posterior", lambda: sample_posterior(laplace, random.key(2), lp, *args,
                                                          weights=iw))
        again = EnsembleMAP(model, optax.lbfgs(), ensemble_size=8)
        step("EnsembleMAP.run, lbfgs built again", lambda: again.run(
            random.key(1), steps, *args, progress_bar=False))
        step("... and once more (equal optimizer)", lambda: EnsembleMAP(
            model, optax.lbfgs(), ensemble_size=8).run(random.key(2), steps, *args,
                                                        progress_bar=False))
        rows.append({"step": "verdict", "text": summary.verdict})
    elif kind == "svi":
        svi = SVI(model, AutoNormal(model), optax.adam(0.01), Trace_ELBO())
        step("plain SVI.run", lambda: svi.run(random.key(0), steps, *args, progress_bar=False))
    elif kind == "warm":
        _, laplace, lp, iw = fit_laplace_weights()
        warm = step("nuts_warm_start", lambda: nuts_warm_start(
            laplace, random.key(5), lp, *args, weights=iw))
        step("NUTSWarmStart.run", lambda: warm.run(
            model, random.key(0), *args, num_samples=nuts_draws, chain_method="vectorized",
            progress_bar=False).mcmc.get_samples())
    elif kind == "nuts":
        mcmc = MCMC(NUTS(model), num_warmup=nuts_draws, num_samples=nuts_draws, num_chains=4,
                    chain_method="vectorized", progress_bar=False)
        step("default NUTS", lambda: (mcmc.run(random.key(0), *args), mcmc.get_samples())[1])
    return rows


def measure(name, kind, steps, nuts_draws):
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import bench_latency as b; "
            f"print('RESULT', json.dumps(b.child({name!r}, {kind!r}, {steps}, {nuts_draws})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=3600)
    if out.returncode:
        raise SystemExit(out.stderr[-4000:])
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.split(" ", 1)[1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--nuts-draws", type=int, default=1000)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    table = {}
    for name in args.models:
        rows = {kind: measure(name, kind, args.steps, args.nuts_draws) for kind in KINDS}
        table[name] = rows
        recipe = [r for r in rows["recipe"] if "wall" in r]
        first = recipe[:5]  # the recipe itself
        total = sum(r["wall"] for r in first)
        nuts, svi = rows["nuts"][0], rows["svi"][0]
        warm_total = sum(r["wall"] for r in rows["warm"])
        print(f"\n{name}: fresh processes, float64")
        print(f"{'step':<40} {'wall':>8} {'compiles':>9}")
        for r in recipe:
            print(f"{r['step']:<40} {r['wall']:>7.2f}s {r['compiles']:>9}")
        print(f"{'the recipe, in all':<40} {total:>7.2f}s {sum(r['compiles'] for r in first):>9}")
        print(f"{'plain SVI.run (AutoNormal, Adam)':<40} {svi['wall']:>7.2f}s {svi['compiles']:>9}")
        print(f"{'default NUTS, 4 chains, vectorized':<40} {nuts['wall']:>7.2f}s {nuts['compiles']:>9}")
        for r in rows["warm"]:
            print(f"{'warm: ' + r['step']:<40} {r['wall']:>7.2f}s {r['compiles']:>9}")
        print(f"{'warm: fit + warm start + NUTS':<40} {warm_total:>7.2f}s "
              f"{sum(r['compiles'] for r in rows['warm']):>9}")
        print(f"(fit + warm start + NUTS) / default NUTS {warm_total / nuts['wall']:.2f}")
        print(f"recipe / NUTS {total / nuts['wall']:.2f}; "
              f"EnsembleMAP.run / plain SVI.run {recipe[0]['wall'] / svi['wall']:.2f}")
        print(f"verdict: {rows['recipe'][-1]['text']}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
