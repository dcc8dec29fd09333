"""Ensembles measured on real posteriors: posteriordb's reference draws.

For each posterior (a Stan model, its data and reference draws from
posteriordb, https://github.com/stan-dev/posteriordb; the NumPyro translations are
in ``posteriordb_models.py``) one process fits, in float64:

1. ``adam``: ``EnsembleSVI`` with ``AutoNormal``, Adam 0.01, 5000 steps, E = 8,
   equal-weight pooled draws;
2. ``lbfgs``: ``EnsembleMAP`` (L-BFGS, stopped at its gradient tolerance), E = 8:
   the points only;
3. ``laplace`` / ``laplace IS``: ``laplace_members`` around the L-BFGS points,
   the mixture with equal weights and with importance weights;
4. ``mvn warm`` / ``mvn warm IS``: ``AutoMultivariateNormal`` members started at
   the Laplace members (``init_params``), Adam 1e-3, equal and importance weights;
5. ``nuts``: NumPyro's NUTS with default settings (1000 warm-up, 1000 draws,
   4 chains, sequential), the reference for time.

Each method is scored against the reference draws, per parameter in reference sds:
``|mean - ref mean| / ref sd`` and ``|log(sd / ref sd)|``, the table showing the
maximum over the parameters (the Stan program's parameters and the transformed
parameters posteriordb keeps). Weighted rows use the self-normalised importance
weights directly (weighted mean and sd of the ``E * S`` draws, no resampling).
Times are wall times of first calls, compilation included, and cumulative: a
Laplace row includes its L-BFGS fit, a warm-started row its Laplace members.

    git clone https://github.com/stan-dev/posteriordb ../posteriordb
    python benchmarks/posteriordb.py --posteriordb ../posteriordb --json rows.json  # the docs' run
    python benchmarks/posteriordb.py --posteriordb ../posteriordb --check    # NUTS vs reference
    python benchmarks/posteriordb.py --synthetic --quick                     # no data needed

``--posteriordb`` takes a clone (with a work tree) or a bare git directory (read
with ``git show HEAD:...``). The data are not part of this repository.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import re
import subprocess
import sys
import time
import warnings
import zipfile

import jax
from jax import random
import numpy as np
import numpyro
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
import optax

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    clear_compiled_programs,
    ensemble_summary,
    importance_weights,
    laplace_members,
    sample_posterior,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from posteriordb_models import POSTERIORS, synthetic  # noqa: E402

SYNTHETIC = "synthetic-correlated_regression"
METHODS = ("adam", "lbfgs", "laplace", "laplace IS", "mvn warm", "mvn warm IS", "nuts")
# --methods: "lbfgs" runs the L-BFGS points and everything built on them.
GROUPS = ("adam", "lbfgs", "nuts")
# Thresholds of the translation check (--check): NUTS against the reference draws.
CHECK_MEAN, CHECK_LOG_SD = 0.1, math.log(1.1)


class Sizes:
    """Steps and draws; ``--quick`` shrinks them for the smoke test."""

    def __init__(self, quick: bool):
        self.ensemble_size = 8
        self.adam_steps = 200 if quick else 5000
        self.lbfgs_steps = 100 if quick else 1000  # at most: members stop at their tolerance
        self.mvn_steps = 200 if quick else 2000
        self.draws = 100 if quick else 500  # per member
        self.warmup = 100 if quick else 1000
        self.samples = 100 if quick else 1000
        self.chains = 1 if quick else 4
        # --check: draws per chain, 10000 in all like the reference (sds of heavy tails,
        # eight schools' tau, vary by ~10% between runs of 4000 draws)
        self.check_samples = 100 if quick else 2500
        self.summary_draws = 20 if quick else 100


# --- posteriordb -----------------------------------------------------------------------


class PosteriorDB:
    """posteriordb's files, from a clone or a bare git directory."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.tree = self.path / "posterior_database"
        if not self.tree.is_dir():
            self.tree = None
            self._git("rev-parse", "HEAD")  # fails early on a path that is no git directory

    def _git(self, *args) -> bytes:
        return subprocess.run(
            ["git", f"--git-dir={self.path}", *args], capture_output=True, check=True
        ).stdout

    def read(self, relative: str) -> bytes:
        if self.tree is not None:
            return (self.tree / relative).read_bytes()
        return self._git("show", f"HEAD:posterior_database/{relative}")

    def _zipped_json(self, relative: str):
        with zipfile.ZipFile(io.BytesIO(self.read(relative))) as archive:
            return json.loads(archive.read(archive.namelist()[0]))

    def posterior(self, name: str) -> tuple[dict, list[dict]]:
        """``(data, reference draws: a list of chains {parameter: draws})``."""
        info = json.loads(self.read(f"posteriors/{name}.json"))
        data = self._zipped_json(f"data/data/{info['data_name']}.json.zip")
        reference = self._zipped_json(
            f"reference_posteriors/draws/draws/{info['reference_posterior_name']}.json.zip"
        )
        return data, reference


def pooled(reference: list[dict]) -> dict[str, np.ndarray]:
    """The reference chains pooled: ``{parameter: (draws,)}``."""
    return {k: np.concatenate([np.asarray(c[k], np.float64) for c in reference]) for k in reference[0]}


# --- scoring ---------------------------------------------------------------------------


def stan_names(draws: dict, batch_ndims: int = 1) -> dict[str, np.ndarray]:
    """``{site: (n, *shape)}`` -> ``{"site[i,j]" (1-based, as Stan): (n,)}``."""
    out = {}
    for name, value in draws.items():
        value = np.asarray(value, np.float64)
        value = value.reshape((-1,) + value.shape[batch_ndims:])
        for index in np.ndindex(value.shape[1:]):
            key = f"{name}[{','.join(str(i + 1) for i in index)}]" if index else name
            out[key] = value[(slice(None), *index)]
    return out


def with_deterministic(model, args, draws: dict, wanted: set[str]) -> dict:
    """Adds the model's ``numpyro.deterministic`` sites the reference has (Stan's
    transformed parameters) to flat latent draws ``{site: (n, ...)}``."""
    missing = sorted({k.split("[")[0] for k in wanted} - set(draws))
    if not missing:
        return draws
    predictive = Predictive(model, posterior_samples=draws, return_sites=missing)
    return {**draws, **predictive(random.key(0), *args)}


def score(draws: dict, reference: dict, log_weights=None) -> dict:
    """Errors against the reference in reference sds; ``draws`` by Stan names, ``(n,)``.

    :return: ``{"mean": max |mean error|, "sd": max |log sd ratio|, "worst_mean": name,
        "worst_sd": name}`` (NaN where the draws are not finite)."""
    w = None
    if log_weights is not None:
        lw = np.asarray(log_weights, np.float64).reshape(-1)
        if np.isnan(lw).any() or not np.isfinite(lw).any():  # weights that failed
            nan = {"mean": np.nan, "sd": np.nan}
            return {**nan, "worst_mean": "", "worst_sd": ""}
        w = np.exp(lw - np.max(lw[np.isfinite(lw)]))
        w = w / w.sum()
    mean_err, sd_err = {}, {}
    for name, ref in reference.items():
        x = draws[name]
        keep = np.isfinite(x) if w is None else np.isfinite(x) & (w > 0)
        if not keep.any():
            mean_err[name] = sd_err[name] = np.nan
            continue
        if w is None:
            m, s = x[keep].mean(), x[keep].std()
        else:
            wk = w[keep] / w[keep].sum()
            m = np.sum(wk * x[keep])
            s = np.sqrt(np.sum(wk * (x[keep] - m) ** 2))
        mean_err[name] = abs(m - ref.mean()) / ref.std()
        with np.errstate(divide="ignore"):
            sd_err[name] = abs(np.log(s / ref.std()))
    worst_mean = max(mean_err, key=lambda k: -1 if np.isnan(mean_err[k]) else mean_err[k])
    worst_sd = max(sd_err, key=lambda k: -1 if np.isnan(sd_err[k]) else sd_err[k])
    nan = any(np.isnan(v) for v in mean_err.values())
    return {
        "mean": np.nan if nan else mean_err[worst_mean],
        "sd": np.nan if nan else sd_err[worst_sd],
        "worst_mean": worst_mean,
        "worst_sd": worst_sd,
    }


def short_verdict(verdict: str) -> str:
    """``ensemble_summary``'s verdict in a few words."""
    parts = []
    found = re.search(r"members (\[[\d, ]*\]) diverged", verdict)
    if found:
        parts.append(f"diverged {len(json.loads(found.group(1)))}")
    found = re.search(r"members (\[[\d, ]*\]) have not converged", verdict)
    if found:
        parts.append(f"not converged {len(json.loads(found.group(1)))}")
    found = re.search(r"(\d+) distinct modes", verdict)
    if found:
        parts.append(f"{found.group(1)} modes")
    if "one mode but r_hat" in verdict:
        parts.append("r_hat > 1.01")
    found = re.search(r"can be trusted.*?\(k ([^ )]+)", verdict)
    if found:
        parts.append(f"trusted k={found.group(1)}")
    found = re.search(r"unreliable \(k ([^ )]+)", verdict)
    if found:
        parts.append(f"unreliable k={found.group(1)}")
    found = re.search(r"one member carries (\d+%)", verdict)
    if found:
        parts.append(f"1 member {found.group(1)}")
    if not parts and "members agree" in verdict:
        parts.append("one mode")
    return ", ".join(parts) or verdict


# --- the methods -----------------------------------------------------------------------


def flat_draws(draws: dict) -> dict:
    """``{site: (E, S, ...)}`` -> ``{site: (E * S, ...)}``."""
    return {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in draws.items()}


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def run_nuts(model, args, sizes, key):
    mcmc = MCMC(
        NUTS(model),
        num_warmup=sizes.warmup,
        num_samples=sizes.samples,
        num_chains=sizes.chains,
        chain_method="sequential",
        progress_bar=False,
    )

    def go():
        mcmc.run(key, *args, extra_fields=("diverging",))
        return mcmc.get_samples()

    samples, seconds = timed(go)
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    by_chain = mcmc.get_samples(group_by_chain=True)
    # A chain that never moved from its start (every draw the same) samples nothing.
    moved = np.ones(sizes.chains, bool)
    for value in by_chain.values():
        value = np.asarray(value).reshape(sizes.chains, sizes.samples, -1)
        moved &= (value.std(axis=1) > 0).any(axis=1)
    return samples, seconds, divergences, moved


def benchmark(name, translation, data, reference_chains, sizes, seed=0, groups=GROUPS):
    """Every method on one posterior (those of ``groups``): a list of rows (dicts). A
    method that raises gets a row saying so (and the methods that start from it do
    too): a failure is a result. Each group draws from its own keys, so a group gives
    the same rows run alone (``--methods``) as in a full run."""
    model, args = translation.model, translation.args(data)
    reference = pooled(reference_chains)
    wanted = set(reference)
    all_keys = random.split(random.key(seed), 16)
    keys = iter(all_keys)
    E, S = sizes.ensemble_size, sizes.draws
    rows = []

    def row(method, draws, seconds, log_weights=None, k=np.nan, verdict="", note=""):
        draws = stan_names(with_deterministic(model, args, draws, wanted))
        errors = score(draws, reference, log_weights)
        rows.append({
            "posterior": name, "method": method, "mean_err": errors["mean"],
            "log_sd_err": errors["sd"], "worst_mean": errors["worst_mean"],
            "worst_sd": errors["worst_sd"], "seconds": seconds, "pareto_k": k,
            "verdict": verdict, "note": note,
        })

    def failed(methods, error):
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        for method in methods:
            if method not in {r["method"] for r in rows}:
                rows.append({
                    "posterior": name, "method": method, "mean_err": np.nan,
                    "log_sd_err": np.nan, "worst_mean": "", "worst_sd": "", "seconds": np.nan,
                    "pareto_k": np.nan, "verdict": "",
                    "note": f"failed: {type(error).__name__}: {message[:90]}",
                })

    def summary(ensemble, result, weights=None):
        key = next(keys)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = ensemble_summary(
                    ensemble, key, result, *args, num_samples=sizes.summary_draws,
                    weights=weights,
                )
        except ValueError as error:  # reported in the table, not hidden
            return None, f"summary failed: {str(error)[:40]}"
        return s, short_verdict(s.verdict)

    def weights_note(weights):
        if not np.isfinite(np.asarray(weights.member_weights)).all():
            return "weights NaN"
        return ""

    # 1. Adam, AutoNormal, equal weights
    try:
        if "adam" not in groups:
            raise _Skipped
        adam = EnsembleSVI(
            model, AutoNormal(model), optax.adam(0.01), Trace_ELBO(), ensemble_size=E
        )

        def fit_adam():
            result = adam.run(next(keys), sizes.adam_steps, *args, progress_bar=False)
            draws = sample_posterior(adam, next(keys), result.params, *args, num_samples=S)
            return result, draws

        (adam_result, adam_draws), t_adam = timed(fit_adam)
        _, verdict = summary(adam, adam_result)
        row("adam", flat_draws(adam_draws), t_adam, verdict=verdict)
    except _Skipped:
        pass
    except Exception as error:  # noqa: BLE001 -- any failure is a row of the table
        failed(["adam"], error)

    # 2. L-BFGS MAP points; 3. Laplace members around them; 4. AutoMVN started there
    keys = iter(all_keys[3:])  # Adam's group draws 3 keys
    try:
        if "lbfgs" not in groups:
            raise _Skipped
        lbfgs = EnsembleMAP(model, ensemble_size=E)

        def fit_map():
            result = lbfgs.run(next(keys), sizes.lbfgs_steps, *args, progress_bar=False)
            return result, lbfgs.get_points(result.params)

        (map_result, points), t_map = timed(fit_map)
        fields = lbfgs.get_extra_fields()
        stopped = np.asarray(fields["stopped_at"])
        iterations = (
            f"{stopped.min()}-{stopped.max()}" if stopped.min() != stopped.max()
            else str(stopped.min())
        )
        at_limit = int((stopped >= sizes.lbfgs_steps).sum())
        note = f"iters {iterations}" + (f" ({at_limit} at the limit)" if at_limit else "")
        # members at one optimum end at one loss: the spread says whether they got there
        note += f"; final loss spread {np.ptp(np.asarray(fields['final_loss'], np.float64)):.2g}"
        _, verdict = summary(lbfgs, map_result)
        row("lbfgs", dict(points), t_map, verdict=verdict, note=note)
        rows[-1]["log_sd_err"] = np.nan  # points: no spread to compare
        rows[-1]["iterations"] = stopped.tolist()

        def fit_laplace():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                laplace, laplace_params = laplace_members(lbfgs, map_result.params, *args)
            draws = sample_posterior(laplace, next(keys), laplace_params, *args, num_samples=S)
            return laplace, laplace_params, draws, caught

        (laplace, laplace_params, laplace_draws, caught), t_laplace = timed(fit_laplace)
        for w in caught:  # counted in the notes instead
            if "not positive definite" not in str(w.message):
                warnings.warn(w.message, w.category, stacklevel=1)
        excluded = int((~np.isfinite(np.asarray(laplace_params["auto_loc"])).all(axis=1)).sum())
        note = f"{excluded} members excluded (Hessian)" if excluded else ""
        laplace_weights, t_weights = timed(
            lambda: importance_weights(laplace, next(keys), laplace_params, *args, num_samples=S)
        )
        # Laplace members have no losses of their own; their points converged as the
        # L-BFGS members did, so the summary reads convergence from the L-BFGS losses.
        laplace_run = map_result._replace(params=laplace_params)
        _, verdict = summary(laplace, laplace_run, laplace_weights)
        row("laplace", flat_draws(laplace_draws), t_map + t_laplace, verdict=verdict, note=note)
        row(
            "laplace IS", flat_draws(laplace_weights.samples), t_map + t_laplace + t_weights,
            log_weights=laplace_weights.log_weights, k=laplace_weights.pareto_k,
            verdict=verdict, note=", ".join(n for n in (note, weights_note(laplace_weights)) if n),
        )

        mvn = EnsembleSVI(
            model, AutoMultivariateNormal(model), optax.adam(1e-3), Trace_ELBO(), ensemble_size=E
        )

        def fit_mvn():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NaN (excluded) Laplace members stay excluded
                result = mvn.run(
                    next(keys), sizes.mvn_steps, *args, init_params=laplace_params,
                    progress_bar=False,
                )
                draws = sample_posterior(mvn, next(keys), result.params, *args, num_samples=S)
            return result, draws

        (mvn_result, mvn_draws), t_mvn = timed(fit_mvn)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mvn_weights, t_mvn_weights = timed(
                lambda: importance_weights(mvn, next(keys), mvn_result.params, *args,
                                           num_samples=S)
            )
        _, verdict = summary(mvn, mvn_result, mvn_weights)
        t_warm = t_map + t_laplace + t_mvn
        row("mvn warm", flat_draws(mvn_draws), t_warm, verdict=verdict)
        row(
            "mvn warm IS", flat_draws(mvn_weights.samples), t_warm + t_mvn_weights,
            log_weights=mvn_weights.log_weights, k=mvn_weights.pareto_k, verdict=verdict,
            note=weights_note(mvn_weights),
        )
    except _Skipped:
        pass
    except Exception as error:  # noqa: BLE001 -- any failure is a row of the table
        failed(["lbfgs", "laplace", "laplace IS", "mvn warm", "mvn warm IS"], error)

    # 5. NUTS, default settings
    keys = iter(all_keys[12:])  # L-BFGS's group draws 9 keys
    try:
        if "nuts" not in groups:
            raise _Skipped
        samples, t_nuts, divergences, moved = run_nuts(model, args, sizes, next(keys))
        notes = [f"{divergences} divergent"] if divergences else []
        if not moved.all():
            notes.append(f"{int((~moved).sum())} of {moved.size} chains stuck at their start")
        row("nuts", dict(samples), t_nuts, note=", ".join(notes))
    except _Skipped:
        pass
    except Exception as error:  # noqa: BLE001 -- any failure is a row of the table
        failed(["nuts"], error)
    return rows


class _Skipped(Exception):
    """A group of methods left out with ``--methods``."""


def check(name, translation, data, reference_chains, sizes, seed=0):
    """The translation check: NUTS against the reference draws."""
    model, args = translation.model, translation.args(data)
    reference = pooled(reference_chains)
    samples, seconds, divergences, moved = run_nuts(model, args, sizes, random.key(seed))
    # Chains stuck at their start say nothing about the translation: they are left out
    # (and counted in the table).
    kept = {
        k: np.asarray(v).reshape((sizes.chains, sizes.samples) + v.shape[1:])[moved]
        .reshape((-1,) + v.shape[1:])
        for k, v in samples.items()
    }
    draws = stan_names(with_deterministic(model, args, kept, set(reference)))
    errors = score(draws, reference)
    # The sd of a heavy tail (eight schools' tau) is noisy even at 10000 draws: a log sd
    # ratio within 3 Monte Carlo standard errors (of both runs) also passes.
    chains = int(moved.sum())
    worst = errors["worst_sd"]
    z = abs(math.log(draws[worst].std() / reference[worst].std())) / relative_sd_error(
        draws[worst].reshape(chains, -1), reference[worst]
    )
    passed = errors["mean"] < CHECK_MEAN and (errors["sd"] < CHECK_LOG_SD or z < 3)
    return {
        "posterior": name, "mean_err": errors["mean"], "log_sd_err": errors["sd"],
        "worst_mean": errors["worst_mean"], "worst_sd": worst, "sd_z": z,
        "seconds": seconds, "divergences": divergences, "stuck": int((~moved).sum()),
        "passed": bool(passed),
    }


def relative_sd_error(chains: np.ndarray, reference: np.ndarray) -> float:
    """Monte Carlo standard error of ``log(sd / ref sd)``: of each run's variance
    estimate (the mean of squared deviations, with NUTS's effective sample size of
    them; the reference draws counted as independent), halved for the sd."""
    def relative(squares, ess):
        return squares.std() / math.sqrt(ess) / squares.mean()

    squares = (chains - chains.mean()) ** 2
    ess = float(effective_sample_size(squares[..., None])[0]) if chains.shape[0] > 1 else (
        squares.size
    )
    ref_squares = (reference - reference.mean()) ** 2
    return 0.5 * math.hypot(relative(squares, ess), relative(ref_squares, ref_squares.size))


# --- tables ----------------------------------------------------------------------------


def _num(value, digits=2):
    if value is not None and value == -np.inf:  # Pareto k of flat weights
        return "-inf"
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def table(rows) -> str:
    lines = [
        "| posterior | method | max mean err (sd) | max log sd ratio | time (s) | Pareto k "
        "| verdict | notes |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]

    def worst(value, name):
        return _num(value) + (f" {name}" if np.isfinite(value) and name else "")

    for r in rows:
        lines.append(
            f"| {r['posterior']} | {r['method']} | {worst(r['mean_err'], r['worst_mean'])} | "
            f"{worst(r['log_sd_err'], r['worst_sd'])} | {_num(r['seconds'], 1)} | "
            f"{_num(r['pareto_k'])} | {r['verdict']} | {r['note']} |"
        )
    return "\n".join(lines)


def check_table(rows) -> str:
    lines = [
        "| posterior | max mean err (sd) | worst | max log sd ratio | worst | its MC z "
        "| NUTS time (s) | divergent | stuck chains | passed |",
        "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['posterior']} | {_num(r['mean_err'], 3)} | {r['worst_mean']} | "
            f"{_num(r['log_sd_err'], 3)} | {r['worst_sd']} | {_num(r['sd_z'], 1)} | "
            f"{r['seconds']:.1f} | "
            f"{r['divergences']} | {r['stuck']} | {'yes' if r['passed'] else 'NO'} |"
        )
    return "\n".join(lines)


def _json_value(value):
    """numpy scalars for ``json.dumps`` (NaN and infinities as JSON's NaN / Infinity)."""
    return value.item() if isinstance(value, np.generic) else str(value)


def argument_parser(description: str, check: bool = True) -> argparse.ArgumentParser:
    """The command line of this script (and of ``nuts_warmstart.py``, without --check)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--posteriordb", help="a clone of stan-dev/posteriordb, or its git directory")
    parser.add_argument("--posteriors", nargs="+", default=list(POSTERIORS), metavar="NAME",
                        help=f"default: all translated ({', '.join(POSTERIORS)})")
    parser.add_argument("--synthetic", action="store_true",
                        help="only the synthetic Gaussian posterior (exact reference draws)")
    if check:
        parser.add_argument("--check", action="store_true",
                            help="the translation check: NUTS against the reference draws")
    parser.add_argument("--quick", action="store_true", help="few steps and draws (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    if check:
        parser.add_argument("--methods", nargs="+", choices=GROUPS, default=list(GROUPS),
                            help="groups of methods to run (lbfgs: L-BFGS, Laplace, warm "
                                 "AutoMVN); default: all")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    return parser


def parse_args(argv, parser: argparse.ArgumentParser | None = None):
    parser = parser or argument_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    if not args.synthetic and args.posteriordb is None:
        parser.error("--posteriordb PATH is needed (or --synthetic)")
    unknown = sorted(set(args.posteriors) - set(POSTERIORS))
    if unknown and not args.synthetic:
        parser.error(f"no translation of {unknown}; translated: {sorted(POSTERIORS)}")
    return args


def posteriors(args):
    """``(name, translation, data, reference chains)`` for every posterior asked for."""
    if args.synthetic:
        yield (SYNTHETIC, *synthetic())
        return
    db = PosteriorDB(args.posteriordb)
    for name in args.posteriors:
        yield (name, POSTERIORS[name], *db.posterior(name))


def main(argv=None):
    args = parse_args(argv)
    x64 = bool(jax.config.jax_enable_x64)
    numpyro.enable_x64()  # posteriors with sds from 1e-3 to 1e4: float32 is not enough
    try:
        sizes = Sizes(args.quick)
        rows = []
        for name, translation, data, reference in posteriors(args):
            if args.check:
                sizes.samples = sizes.check_samples
                rows.append(check(name, translation, data, reference, sizes, args.seed))
                print(check_table(rows[-1:]).splitlines()[-1], flush=True)
            else:
                new = benchmark(name, translation, data, reference, sizes, args.seed,
                                args.methods)
                rows.extend(new)
                print(table(new), flush=True)
                clear_compiled_programs()  # a posterior's programs are not used again
        print()
        print(check_table(rows) if args.check else table(rows))
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1, default=_json_value))
        return rows
    finally:
        jax.config.update("jax_enable_x64", x64)  # callers in one process keep their setting


if __name__ == "__main__":
    main()
