"""Time ``EnsembleSVI.run`` against plain NumPyro and plain JAX on the sinc BNN, in one process.

Ways to fit E members of the sinc model (examples/sinc_regression.py), all on the
same data:

  loop   a Python loop of ``SVI.run(progress_bar=False)``, one member per call (each
         call traces and compiles its scan again); small E only;
  vmap   ``jax.jit(jax.vmap(lambda k: SVI.run(k, ...)))``: the hand-made NumPyro
         baseline (with the guide's prototype built beforehand, else it leaks tracers);
  floor  pure JAX: the BNN's log joint written by hand, optax Adam, ``vmap`` over
         members inside ``lax.scan`` (MAP for ``--guide delta``; a one-sample
         reparameterised mean-field ELBO with softplus scales for ``--guide normal``);
  ens    ``EnsembleSVI.run``, with ``progress_bar`` off and on.

For each E, the first call (compile + run) and a steady call with the same shapes
(best of 3) are timed; compile = first - steady. Reported as member-steps per second
and as ratios measured side by side in this process, so the machine's speed cancels.

    python benchmarks/bench_run.py                                   # E = 1 4 16 64
    python benchmarks/bench_run.py --sizes 1 64 1024 8192 --steps 1000 --loop-max 0   # a GPU
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
from jax import lax, random
import jax.numpy as jnp
from jax.scipy.stats import norm
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoNormal
import optax

from numpyro_ensemble import EnsembleSVI

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from sinc_regression import HIDDEN, SIGMA, bnn, sinc_data  # noqa: E402

GUIDES = {"normal": AutoNormal, "delta": AutoDelta}
SHAPES = {"W1": (1, HIDDEN), "b1": (HIDDEN,), "W2": (HIDDEN, HIDDEN), "b2": (HIDDEN,),
          "W3": (HIDDEN, 1), "b3": (1,)}


def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def first_and_steady(fn, repeats=3):
    first = timed(fn)
    steady = min(timed(fn) for _ in range(repeats))  # the least disturbed of a few calls
    return first, steady


def floor_fn(size, steps, guide, x, y):
    """The same fits in plain JAX (no NumPyro): the floor any ensemble runner can reach."""
    opt = optax.adam(5e-3)

    def log_joint(w):
        h = jnp.tanh(x[:, None] @ w["W1"] + w["b1"])
        h = jnp.tanh(h @ w["W2"] + w["b2"])
        f = (h @ w["W3"] + w["b3"])[:, 0]
        log_prior = sum(norm.logpdf(v).sum() for v in w.values())
        return norm.logpdf(y, f, SIGMA).sum() + log_prior

    if guide == "delta":
        def loss(params, key):
            return -log_joint(params)

        def init(key):
            keys = dict(zip(SHAPES, random.split(key, len(SHAPES)), strict=True))
            return {k: random.normal(keys[k], s) for k, s in SHAPES.items()}
    else:
        def loss(params, key):
            keys = dict(zip(SHAPES, random.split(key, len(SHAPES)), strict=True))
            scale = {k: jax.nn.softplus(params["raw_scale"][k]) for k in SHAPES}
            eps = {k: random.normal(keys[k], s) for k, s in SHAPES.items()}
            w = {k: params["loc"][k] + scale[k] * eps[k] for k in SHAPES}
            log_q = sum(norm.logpdf(w[k], params["loc"][k], scale[k]).sum() for k in SHAPES)
            return log_q - log_joint(w)

        def init(key):
            keys = dict(zip(SHAPES, random.split(key, len(SHAPES)), strict=True))
            loc = {k: random.uniform(keys[k], s, minval=-2.0, maxval=2.0) for k, s in SHAPES.items()}
            raw = {k: jnp.full(s, jnp.log(jnp.expm1(0.1))) for k, s in SHAPES.items()}
            return {"loc": loc, "raw_scale": raw}

    def member_step(carry):
        params, opt_state, key = carry
        key, sub = random.split(key)
        value, grads = jax.value_and_grad(loss)(params, sub)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), value

    @jax.jit
    def run(key):
        keys = random.split(key, size)
        params = jax.vmap(init)(keys)
        carry = (params, jax.vmap(opt.init)(params), keys)
        (params, _, _), losses = lax.scan(lambda c, _: jax.vmap(member_step)(c), carry, None, length=steps)
        return params

    return lambda: run(random.key(0))


def bench(size, steps, guide_name, loop_max, x, y):
    guide = GUIDES[guide_name](bnn)
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
    svi.init(random.key(0), x, y)  # the prototype, before any transform
    vmapped = jax.jit(jax.vmap(lambda k: svi.run(k, steps, x, y, progress_bar=False).params))
    row["vmap_first"], row["vmap"] = first_and_steady(lambda: vmapped(keys))
    row["floor_first"], row["floor"] = first_and_steady(floor_fn(size, steps, guide_name, x, y))

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
    print(
        f"sinc BNN, {args.steps} steps, guide {GUIDES[args.guide].__name__}, "
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}"
    )
    rows = [bench(size, args.steps, args.guide, args.loop_max, x, y) for size in args.sizes]
    base_compile = rows[0]["ens_first"] - rows[0]["ens"]
    print(
        f"\n{'E':>5} {'ens member-steps/s':>19} {'ens/floor':>10} {'ens/vmap':>9} {'bar on/off':>11}"
        f" {'ens compile':>12} {'vs E=' + str(rows[0]['E']):>8} {'vmap compile':>13} {'loop/ens':>9}"
    )
    for r in rows:
        ens_compile = r["ens_first"] - r["ens"]
        loop = f"{r['loop'] / r['ens_first']:>9.1f}" if "loop" in r else f"{'-':>9}"
        print(
            f"{r['E']:>5} {r['E'] * args.steps / r['ens']:>19.3g} {r['ens'] / r['floor']:>10.2f}"
            f" {r['ens'] / r['vmap']:>9.2f} {r['bar'] / r['ens']:>11.2f} {ens_compile:>11.2f}s"
            f" {ens_compile / base_compile:>8.2f} {r['vmap_first'] - r['vmap']:>12.2f}s {loop}"
        )
    print(
        "\nens/floor, ens/vmap, bar on/off: steady-time ratios; 'vs E=': ensemble compile time"
        "\nrelative to the smallest E (flat = not growing with E); loop/ens: a Python loop of"
        "\nSVI.run against the first (compiling) EnsembleSVI.run."
    )
    return rows


if __name__ == "__main__":
    main()
