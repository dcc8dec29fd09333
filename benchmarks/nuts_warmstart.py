"""NUTS warm-started from an ensemble against NUTS's defaults: gradient evaluations.

For each posterior of ``posteriordb.py`` (posteriordb's reference draws, the NumPyro
translations in ``posteriordb_models.py``) one process runs, in float64:

1. ``default``: NumPyro's NUTS with default settings (1000 warm-up iterations,
   1000 draws, 4 chains, sequential);
2. ``warm``: an ensemble fit (``EnsembleMAP``, L-BFGS, E = 8, then
   ``laplace_members`` and ``importance_weights``), then for each of ``--keys``
   warm-start keys (default 5) ``nuts_warm_start`` and ``NUTSWarmStart.run`` (the
   check after warm-up, restarts included) with the warm start's starts, metric,
   step size and warm-up (150 iterations with a trusted, dense metric, else 500
   adapting a diagonal one), 1000 draws, 4 chains, once per chain method
   (``vectorized`` and ``sequential``: the same starts and keys; batched rounding
   makes their chains differ slightly).

Every run's chains are counted as *stranded* by the measure of the issue that found
one, computed here on the draws, not by the package's check: more than 50% of its
transitions divergent, or a step size below 1e-3 x the chains' median. The warm
rows also count the chains the check restarted and those it left stranded.

Gradient evaluations are NUTS's leapfrog steps: NumPyro's ``num_steps`` extra field,
summed over the warm-up (``MCMC.warmup(..., collect_warmup=True)``) and the draws
(``MCMC.run`` from ``post_warmup_state``). Not counted, for either method: the few
steps of NumPyro's step-size search (``find_reasonable_step_size``, at the start and
at each end of a warm-up window). The ensemble fit's own evaluations are counted
separately ("fit grad evals", :func:`fit_evaluations`): L-BFGS's value-and-gradient
evaluations (its linesearch's trial points included), one Hessian per member as
``D`` gradients and each importance-weight density as one. The ratios are default
NUTS's gradient evaluations over the warm method's, NUTS alone and with the fit, and
per effective draw (total evaluations over the minimum bulk ESS, the fit included):
at the same number of draws the first two cannot pass default NUTS's total over the
warm method's sampling evaluations, however cheap its warm-up and fit.

Each method is scored over the reference's parameters (Stan names): the minimum bulk
ESS (``numpyro.diagnostics.effective_sample_size``) and the minimum ESS per second
of total time, the maximum split R-hat, and, as ``posteriordb.py``, the maximum
``|mean - ref mean| / ref sd`` and ``|log(sd / ref sd)|``. Times are wall times of
first calls, compilation included; a warm row's fit time (L-BFGS, Laplace,
importance weights, ``nuts_warm_start``) and NUTS time are given separately.

    git clone https://github.com/stan-dev/posteriordb ../posteriordb
    python benchmarks/nuts_warmstart.py --posteriordb ../posteriordb --json rows.json
    python benchmarks/nuts_warmstart.py --synthetic --quick        # no data needed
    python benchmarks/nuts_warmstart.py --posteriordb ../posteriordb --keys 5 \
        --chain-methods vectorized sequential --posteriors arma-arma11 ...

``--posteriordb`` takes a clone or a bare git directory. The data are not part of
this repository.
"""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS
import optax

from numpyro_ensemble import (
    EarlyStopping,
    EnsembleMAP,
    clear_compiled_programs,
    importance_weights,
    laplace_members,
    nuts_warm_start,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import posteriordb as pdb  # noqa: E402

METHODS = ("default", "warm")
CHAIN_METHODS = ("vectorized", "sequential")
# EnsembleMAP's default rule with its default L-BFGS (numpyro_ensemble.fit.optim), given
# explicitly because the benchmark passes that L-BFGS wrapped in a counter.
DEFAULT_STOPPING = EarlyStopping(patience=10, smoothing=0.0, grad_tol=1e-5)


class Sizes:
    """Steps and draws; ``--quick`` shrinks them for the smoke test (the warm start's
    own warm-up, 150 or 500 iterations, is kept)."""

    def __init__(self, quick: bool):
        self.ensemble_size = 4 if quick else 8
        self.lbfgs_steps = 100 if quick else 1000  # at most: members stop at their tolerance
        self.draws = 50 if quick else 500  # importance-weight draws per member
        self.warmup = 50 if quick else 1000  # the default NUTS's
        self.samples = 50 if quick else 1000
        self.chains = 2 if quick else 4


def run_nuts(model, args, sizes, key, num_warmup, init_params=None, **nuts_kwargs):
    """NUTS's warm-up then its draws, counting leapfrog steps in each."""
    mcmc = MCMC(
        NUTS(model, **nuts_kwargs), num_warmup=num_warmup, num_samples=sizes.samples,
        num_chains=sizes.chains, chain_method="sequential", progress_bar=False,
    )

    def go():
        mcmc.warmup(key, *args, extra_fields=("num_steps",), collect_warmup=True,
                    init_params=init_params)
        warmup_steps = mcmc.get_extra_fields()["num_steps"]
        # run continues from post_warmup_state: no second warm-up, the adapted kernel
        mcmc.run(mcmc.post_warmup_state.rng_key, *args, extra_fields=("num_steps", "diverging"))
        return warmup_steps, mcmc.get_samples()

    (warmup_steps, samples), seconds = pdb.timed(go)
    fields = mcmc.get_extra_fields(group_by_chain=True)
    diverging = np.asarray(fields["diverging"]).reshape(sizes.chains, -1)
    return {
        "samples": samples, "nuts_seconds": seconds,
        "warmup_grads": int(np.asarray(warmup_steps).sum()),
        "sampling_grads": int(np.asarray(fields["num_steps"]).sum()),
        "divergences": int(diverging.sum()),
        "stranded": stranded_count(diverging, mcmc.post_warmup_state.adapt_state.step_size),
    }


def counting(transformation):
    """``transformation`` (an optax linesearch method) with a count, per member, of the
    loss-and-gradient evaluations it asked for in its state: one per step (SVI's
    ``value_and_grad`` at the params) plus the linesearch's trial points
    (``num_linesearch_steps``, each a value and a gradient). The updates are
    ``transformation``'s own."""

    def init(params):
        return transformation.init(params), jnp.zeros((), jnp.int32)

    def update(updates, state, params=None, **extra):
        inner, count = state
        updates, inner = transformation.update(updates, inner, params, **extra)
        trials = optax.tree_utils.tree_get(inner, "num_linesearch_steps")
        return updates, (inner, count + (1 + trials).astype(count.dtype))

    return optax.GradientTransformationExtraArgs(init, update)


def fit_ensemble(model, args, sizes, keys):
    """L-BFGS points, their Laplace members and importance weights; and the fit's
    evaluations of the model's log density (see :func:`fit_evaluations`)."""
    key = next(keys)
    default = EnsembleMAP(model, ensemble_size=sizes.ensemble_size)
    default.init(key, *args)  # EnsembleMAP picks its optimizer for the model: L-BFGS here
    lbfgs = EnsembleMAP(model, counting(default.optim.transformation),
                        ensemble_size=sizes.ensemble_size)
    result = lbfgs.run(key, sizes.lbfgs_steps, *args, progress_bar=False,
                       early_stopping=DEFAULT_STOPPING)
    stopped = np.asarray(lbfgs.get_extra_fields()["stopped_at"])
    lbfgs_evals = int(np.asarray(result.state.optim_state[1][1][1]).sum())
    assert lbfgs_evals >= 2 * stopped.sum(), "each step: the params and >= 1 trial point"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not positive definite")  # counted below
        laplace, laplace_params = laplace_members(lbfgs, result.params, *args)
    weights = importance_weights(
        laplace, next(keys), laplace_params, *args, num_samples=sizes.draws
    )
    excluded = int((~np.isfinite(np.asarray(laplace_params["auto_loc"])).all(axis=1)).sum())
    evals = fit_evaluations(lbfgs_evals, sizes, np.shape(laplace_params["auto_loc"])[1])
    return laplace, laplace_params, weights, stopped, excluded, evals


def run_warm(warm, model, args, sizes, key, chain_method):
    """``NUTSWarmStart.run`` (the check after warm-up and restarts included), counting
    leapfrog steps in the warm-ups (restarts' included) and the draws."""

    def go():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            run = warm.run(model, key, *args, num_samples=sizes.samples,
                           chain_method=chain_method, progress_bar=False,
                           extra_fields=("num_steps",))
        return run, [str(w.message) for w in caught]

    (run, caught), seconds = pdb.timed(go)
    fields = run.mcmc.get_extra_fields(group_by_chain=True)
    diverging = np.asarray(fields["diverging"]).reshape(sizes.chains, -1)
    return {
        "samples": run.get_samples(), "nuts_seconds": seconds,
        "warmup_grads": int(run.warmup_num_steps.sum()),
        "sampling_grads": int(np.asarray(fields["num_steps"]).sum()),
        "divergences": int(diverging.sum()),
        "restarted": len(run.restarted), "left_stranded": len(run.stranded),
        "stranded": stranded_count(diverging, run.mcmc.post_warmup_state.adapt_state.step_size),
        "warnings": caught,
    }


def stranded_count(diverging: np.ndarray, step_size) -> int:
    """Chains stranded by the issue's measure, on the draws: more than 50% divergent
    transitions, or a step size below 1e-3 x the chains' median. Computed here, not by
    the package's own check, so that the check is measured."""
    step = np.asarray(step_size, np.float64).reshape(-1)
    bad = (diverging.mean(axis=1) > 0.5) | ~(step >= 1e-3 * np.median(step))
    return int(bad.sum())


def fit_evaluations(lbfgs_evals: int, sizes, dim: int) -> int:
    """The ensemble fit's evaluations of the log density, in gradient evaluations:
    L-BFGS's value-and-gradient evaluations summed over members (:func:`counting`),
    one Hessian per member counted as ``D`` gradients (forward-over-reverse: one
    Hessian-vector product per dimension), and the importance weights' log densities,
    ``E x draws``, each counted as a gradient (a density costs less: an upper bound).
    Members that stopped early cost nothing more in this count; the vmapped run still
    computes them until the last member stops."""
    return lbfgs_evals + sizes.ensemble_size * (dim + sizes.draws)


def benchmark(name, translation, data, reference_chains, sizes, seed=0, num_keys=5,
              chain_methods=CHAIN_METHODS):
    """Default NUTS, then the warm start with ``num_keys`` keys, each run with every
    chain method: ``1 + num_keys x len(chain_methods)`` rows (a run that raises gets a
    row saying so). The ensemble fit (L-BFGS, Laplace, importance weights) is the same
    for every key; each key draws its own starts and spares and runs its own NUTS."""
    model, args = translation.model, translation.args(data)
    reference = pdb.pooled(reference_chains)
    keys = iter(random.split(random.key(seed), 8))
    rows = []

    def row(method, out, fit_seconds=0.0, **extra):
        chains = sizes.chains
        draws = pdb.stan_names(pdb.with_deterministic(model, args, dict(out["samples"]),
                                                      set(reference)))
        errors = pdb.score(draws, reference)
        by_chain = np.stack([draws[k].reshape(chains, -1) for k in reference], axis=-1)
        ess = np.asarray(effective_sample_size(by_chain))
        rhat = np.asarray(split_gelman_rubin(by_chain))
        seconds = fit_seconds + out["nuts_seconds"]
        rows.append({
            "posterior": name, "method": method, "warmup_grads": out["warmup_grads"],
            "sampling_grads": out["sampling_grads"],
            "grads": out["warmup_grads"] + out["sampling_grads"],
            "fit_seconds": fit_seconds, "nuts_seconds": out["nuts_seconds"], "seconds": seconds,
            "min_ess": float(ess.min()), "ess_per_second": float(ess.min() / seconds),
            "max_rhat": float(rhat.max()), "mean_err": errors["mean"],
            "log_sd_err": errors["sd"], "worst_mean": errors["worst_mean"],
            "worst_sd": errors["worst_sd"], "divergences": out["divergences"],
            "fit_grads": 0, "ratio": np.nan, "ratio_with_fit": np.nan,
            "ratio_per_ess": np.nan, "key": "", "chain_method": "sequential",
            "stranded": 0, "restarted": 0, "left_stranded": 0, "note": "", **extra,
        })

    def failed(method, error):
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        rows.append({"posterior": name, "method": method,
                     "note": f"failed: {type(error).__name__}: {message[:90]}"})

    try:
        out = run_nuts(model, args, sizes, next(keys), sizes.warmup)
        row("default", out, note=f"warm-up {sizes.warmup}")
    except Exception as error:  # noqa: BLE001 -- any failure is a row of the table
        failed("default", error)

    try:
        (laplace, laplace_params, weights, stopped, excluded, fit_evals), fit_seconds = \
            pdb.timed(lambda: fit_ensemble(model, args, sizes, keys))
    except Exception as error:  # noqa: BLE001 -- any failure is a row of the table
        failed("warm", error)
        return finish(rows)
    for j in range(num_keys):
        warm_key = random.fold_in(random.key(seed), 1000 + j)
        try:
            warm, start_seconds = pdb.timed(lambda warm_key=warm_key: nuts_warm_start(
                laplace, warm_key, laplace_params, *args, weights=weights,
                num_chains=sizes.chains))
        except Exception as error:  # noqa: BLE001
            failed("warm", error)
            continue
        for chain_method in chain_methods:
            try:
                out = run_warm(warm, model, args, sizes, random.fold_in(warm_key, 1),
                               chain_method)
            except Exception as error:  # noqa: BLE001
                failed("warm", error)
                continue
            trusted = not warm.nuts_kwargs["adapt_mass_matrix"]
            notes = [f"warm-up {warm.num_warmup}", f"k {weights.pareto_k:.2f}",
                     "metric kept" if trusted else "metric adapted"]
            if excluded:
                notes.append(f"{excluded} members excluded (Hessian)")
            at_limit = int((stopped >= sizes.lbfgs_steps).sum())
            if at_limit:
                notes.append(f"{at_limit} members at the L-BFGS limit")
            if out["restarted"]:
                notes.append(f"{out['restarted']} restarted")
            row("warm", out, fit_seconds + start_seconds, fit_grads=fit_evals,
                pareto_k=float(weights.pareto_k), key=j, chain_method=chain_method,
                stranded=out["stranded"], restarted=out["restarted"],
                left_stranded=out["left_stranded"], note=", ".join(notes))
    return finish(rows)


def finish(rows):
    """Per-ESS costs on every row; on each warm row the ratios to the default row."""
    done = [r for r in rows if "grads" in r]
    for r in done:
        r["grads_per_ess"] = (r["grads"] + r["fit_grads"]) / r["min_ess"]
    defaults = [r for r in done if r["method"] == "default"]
    for warm in (r for r in done if r["method"] == "warm" and defaults):
        default = defaults[0]
        warm["ratio"] = default["grads"] / warm["grads"]
        warm["ratio_with_fit"] = default["grads"] / (warm["grads"] + warm["fit_grads"])
        warm["ratio_per_ess"] = default["grads_per_ess"] / warm["grads_per_ess"]
    return rows


# --- tables ----------------------------------------------------------------------------

_num = pdb._num


def table(rows) -> str:
    lines = [
        "| posterior | method | key | chains | stranded | restarted | warm-up grad evals | sampling grad evals | fit grad evals "
        "| fit time (s) | NUTS time (s) | min ESS | grad evals per ESS (fit incl.) "
        "| min ESS/s (fit + NUTS) | max R-hat | max mean err (sd) | max log sd ratio "
        "| divergent | default/warm grad evals: NUTS | fit incl. | per ESS | notes |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "grads" not in r:
            lines.append(f"| {r['posterior']} | {r['method']} |" + " – |" * 19 + f" {r['note']} |")
            continue
        warm = r["method"] == "warm"
        lines.append(
            f"| {r['posterior']} | {r['method']} | {r['key']} | {r['chain_method']} "
            f"| {r['stranded']} | {r['restarted'] if warm else ''} "
            f"| {r['warmup_grads']} | {r['sampling_grads']} "
            f"| {r['fit_grads'] if warm else ''} | {_num(r['fit_seconds'], 1) if warm else ''} "
            f"| {_num(r['nuts_seconds'], 1)} | {_num(r['min_ess'], 0)} "
            f"| {_num(r['grads_per_ess'], 1)} | {_num(r['ess_per_second'], 1)} "
            f"| {_num(r['max_rhat'], 3)} | {_num(r['mean_err'])} {r['worst_mean']} "
            f"| {_num(r['log_sd_err'])} {r['worst_sd']} | {r['divergences']} "
            f"| {_num(r['ratio'], 1)} | {_num(r['ratio_with_fit'], 1)} "
            f"| {_num(r['ratio_per_ess'], 1)} | {r['note']} |"
        )
    return "\n".join(lines)


def stranded_table(rows) -> str:
    """Per posterior, over its warm runs (keys x chain methods): chains stranded (the
    issue's measure, on the draws), restarted and left stranded by the check, the
    worst errors, and the median gradient-evaluation ratios to default NUTS."""
    lines = [
        "| posterior | warm runs | stranded chains (default NUTS) | stranded chains (warm) "
        "| restarted | left stranded | max mean err (sd) | max log sd ratio "
        "| median default/warm grad evals: NUTS | fit incl. | failed runs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in dict.fromkeys(r["posterior"] for r in rows):
        mine = [r for r in rows if r["posterior"] == name]
        warm = [r for r in mine if r["method"] == "warm" and "grads" in r]
        default = [r for r in mine if r["method"] == "default" and "grads" in r]
        failed = sum("grads" not in r for r in mine)
        if not warm:
            lines.append(f"| {name} | 0 |" + " – |" * 8 + f" {failed} |")
            continue

        def most(key, rs=warm):
            return _num(max(r[key] for r in rs))

        ratios = [r["ratio"] for r in warm if np.isfinite(r["ratio"])]
        with_fit = [r["ratio_with_fit"] for r in warm if np.isfinite(r["ratio_with_fit"])]
        lines.append(
            f"| {name} | {len(warm)} | {default[0]['stranded'] if default else '–'} "
            f"| {sum(r['stranded'] for r in warm)} | {sum(r['restarted'] for r in warm)} "
            f"| {sum(r['left_stranded'] for r in warm)} | {most('mean_err')} "
            f"| {most('log_sd_err')} | {_num(np.median(ratios), 1) if ratios else '–'} "
            f"| {_num(np.median(with_fit), 1) if with_fit else '–'} | {failed} |"
        )
    return "\n".join(lines)


def mean_ratio(rows) -> str:
    """The averages the issue's goals are stated in."""
    warm = [r for r in rows if np.isfinite(r.get("ratio", np.nan))]
    if not warm:
        return "default/warm grad evals: no posterior with both methods"

    def averages(key):
        ratios = np.array([r[key] for r in warm])
        return (f"mean {np.mean(ratios):.2f}, geometric mean "
                f"{np.exp(np.mean(np.log(ratios))):.2f}, min {ratios.min():.2f}")

    fractions = np.array([1.0 / r["ratio_with_fit"] for r in warm])
    return "\n".join([
        f"over {len(warm)} warm runs, default/warm grad evals:",
        f"  NUTS only: {averages('ratio')}",
        f"  the fit included: {averages('ratio_with_fit')}; warm/default on average "
        f"{fractions.mean():.3f}",
        f"  per min ESS, the fit included: {averages('ratio_per_ess')}",
    ])


def main(argv=None):
    parser = pdb.argument_parser(__doc__.split("\n\n")[0], check=False)
    parser.add_argument("--keys", type=int, default=None,
                        help="warm-start keys per posterior (default 5; 1 with --quick)")
    parser.add_argument("--chain-methods", nargs="+", choices=CHAIN_METHODS,
                        default=list(CHAIN_METHODS), help="MCMC chain methods of the warm runs")
    args = pdb.parse_args(argv, parser)
    num_keys = args.keys if args.keys is not None else (1 if args.quick else 5)
    x64 = bool(jax.config.jax_enable_x64)
    numpyro.enable_x64()  # posteriors with sds from 1e-3 to 1e4: float32 is not enough
    try:
        sizes = Sizes(args.quick)
        rows = []
        for name, translation, data, reference in pdb.posteriors(args):
            new = benchmark(name, translation, data, reference, sizes, args.seed, num_keys,
                            tuple(args.chain_methods))
            rows.extend(new)
            print(table(new), flush=True)
            print(stranded_table(new), flush=True)
            if args.json:  # after every posterior: a long run keeps what it measured
                pathlib.Path(args.json).write_text(
                    json.dumps(rows, indent=1, default=pdb._json_value))
            clear_compiled_programs()  # a posterior's programs are not used again
        print()
        print(table(rows))
        print()
        print(stranded_table(rows))
        print(mean_ratio(rows))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1, default=pdb._json_value))
        return rows
    finally:
        jax.config.update("jax_enable_x64", x64)  # callers in one process keep their setting


if __name__ == "__main__":
    main()
