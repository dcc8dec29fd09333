"""Time ``EnsembleSVI.run`` against plain NumPyro and plain JAX on the sinc BNN, in one process.

Ways to fit E members of the sinc model (examples/sinc_regression.py), all on the
same data, each member from its own start: the ensemble's (``ens.init(key)``), which
the other ways are handed, so every way fits the same E members:

  loop   a Python loop of ``SVI.run(key_e, ..., init_params=start_e)``, one member per
         call (each call traces and compiles its scan again); small E only;
  vmap   ``jax.jit(jax.vmap(lambda k, p: SVI.run(k, ..., init_params=p)))`` over the
         members' keys and starts: the hand-made NumPyro baseline (with the guide's
         prototype built beforehand, else it leaks tracers);
  floor  pure JAX: the BNN's log joint written by hand, optax Adam, ``vmap`` over
         members inside ``lax.scan`` (MAP for ``delta``; a one-sample
         reparameterised mean-field ELBO with softplus scales for ``normal``, whose
         raw scales start at softplus^-1 of the ensemble's starting scales);
  ens    ``EnsembleSVI.run``, with ``progress_bar`` off and on.

The data are jit arguments of vmap, floor and ens (none closes over it). For each E, the
first call (compile + run) and a steady call with the same shapes (best of 3) are
timed; compile = first - steady. Reported as member-steps per second and as ratios
measured side by side in this process, so the machine's speed cancels.

Every way's params are checked to have the member axis (leading size E on every leaf)
and, for E > 1, E distinct members: a baseline that fitted one member and copied it
(as ``vmap`` over keys alone does with AutoDelta, whose start comes from the guide's
prototype, not the key) fails here. Member e of ``vmap`` is plain ``SVI`` on member
e's key and start, which the ensemble claims to equal: "vmap - ens" is the largest
difference of their fitted params (float32 rounding, grown over the steps).

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
import numpy as np
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoNormal
import optax

from numpyro_ensemble import EnsembleSVI

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
from sinc_regression import HIDDEN, SIGMA, bnn, sinc_data  # noqa: E402

GUIDES = {"normal": AutoNormal, "delta": AutoDelta}
SHAPES = {"W1": (1, HIDDEN), "b1": (HIDDEN,), "W2": (HIDDEN, HIDDEN), "b2": (HIDDEN,),
          "W3": (HIDDEN, 1), "b3": (1,)}
LEARNING_RATE = 5e-3


def timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def first_and_steady(fn, repeats=3):
    out, first = timed(fn)
    steady = min(timed(fn)[1] for _ in range(repeats))  # the least disturbed of a few calls
    return out, first, steady


def check_members(params, size, name):
    """Every leaf has the member axis, and (E > 1) the E members are distinct fits."""
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
    shapes = sorted({leaf.shape for leaf in leaves})
    assert leaves and all(leaf.shape[:1] == (size,) for leaf in leaves), (
        f"{name}: a leaf without the member axis ({size},): shapes {shapes}"
    )
    flat = np.concatenate([leaf.reshape(size, -1) for leaf in leaves], axis=1)
    assert np.isfinite(flat).all(), f"{name}: non-finite params"
    distinct = len(np.unique(flat, axis=0))
    assert size == 1 or distinct == size, (
        f"{name}: only {distinct} distinct members of {size}: one fit copied?"
    )
    return distinct


def floor_fn(guide, steps):
    """The same fits in plain JAX (no NumPyro): the floor any ensemble runner can reach.
    ``run(keys, params, x, y)`` with the members' keys and starting params."""
    opt = optax.adam(LEARNING_RATE)

    def log_joint(w, x, y):
        h = jnp.tanh(x[:, None] @ w["W1"] + w["b1"])
        h = jnp.tanh(h @ w["W2"] + w["b2"])
        f = (h @ w["W3"] + w["b3"])[:, 0]
        log_prior = sum(norm.logpdf(v).sum() for v in w.values())
        return norm.logpdf(y, f, SIGMA).sum() + log_prior

    if guide == "delta":
        def loss(params, key, x, y):
            return -log_joint(params, x, y)
    else:
        def loss(params, key, x, y):
            keys = dict(zip(SHAPES, random.split(key, len(SHAPES)), strict=True))
            scale = {k: jax.nn.softplus(params["raw_scale"][k]) for k in SHAPES}
            eps = {k: random.normal(keys[k], s) for k, s in SHAPES.items()}
            w = {k: params["loc"][k] + scale[k] * eps[k] for k in SHAPES}
            log_q = sum(norm.logpdf(w[k], params["loc"][k], scale[k]).sum() for k in SHAPES)
            return log_q - log_joint(w, x, y)

    def member_step(carry, x, y):
        params, opt_state, key = carry
        key, sub = random.split(key)
        value, grads = jax.value_and_grad(loss)(params, sub, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, key), value

    @jax.jit
    def run(keys, params, x, y):
        carry = (params, jax.vmap(opt.init)(params), keys)
        step = jax.vmap(member_step, in_axes=(0, None, None))
        (params, _, _), _ = lax.scan(lambda c, _: step(c, x, y), carry, None, length=steps)
        return params

    return run


def floor_starts(guide, starts):
    """The ensemble's starting params in the floor's parametrisation: AutoNormal's
    scales are softplus-constrained, so the floor's raw scales are softplus^-1 of them."""
    loc = {k: starts[f"{k}_auto_loc"] for k in SHAPES}
    if guide == "delta":
        return loc
    scale = {k: starts[f"{k}_auto_scale"] for k in SHAPES}
    return {"loc": loc, "raw_scale": {k: v + jnp.log(-jnp.expm1(-v)) for k, v in scale.items()}}


def bench(size, steps, guide_name, loop_max, x, y):
    guide = GUIDES[guide_name](bnn)
    optim = optax.adam(LEARNING_RATE)
    loss = Trace_ELBO()
    rng_key = random.key(0)
    row = {"guide": guide_name, "E": size, "distinct": {}}

    ens = EnsembleSVI(bnn, guide, optim, loss, ensemble_size=size)
    # The members' keys and starts of ens.run(rng_key): every way fits these members.
    keys = ens.member_keys(rng_key)
    starts = ens.get_params(ens.init(rng_key, x, y))
    row["distinct"]["starts"] = check_members(starts, size, "starts")

    if size <= loop_max:
        def loop():
            return [
                SVI(bnn, guide, optim, loss).run(
                    keys[e], steps, x, y, progress_bar=False,
                    init_params=jax.tree.map(lambda leaf, e=e: leaf[e], starts),
                ).params
                for e in range(size)
            ]

        fits, row["loop"] = timed(loop)  # every call compiles: there is no steady state
        loop_params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *fits)
        row["distinct"]["loop"] = check_members(loop_params, size, "loop")

    svi = SVI(bnn, guide, optim, loss)
    svi.init(rng_key, x, y)  # the prototype, before any transform
    vmapped = jax.jit(jax.vmap(
        lambda k, p, x, y: svi.run(k, steps, x, y, progress_bar=False, init_params=p).params,
        in_axes=(0, 0, None, None),
    ))
    vmap_params, row["vmap_first"], row["vmap"] = first_and_steady(
        lambda: vmapped(keys, starts, x, y)
    )
    row["distinct"]["vmap"] = check_members(vmap_params, size, "vmap")

    floor, start = floor_fn(guide_name, steps), floor_starts(guide_name, starts)
    floor_params, row["floor_first"], row["floor"] = first_and_steady(
        lambda: floor(keys, start, x, y)
    )
    row["distinct"]["floor"] = check_members(floor_params, size, "floor")

    ens_params, row["ens_first"], row["ens"] = first_and_steady(
        lambda: ens.run(rng_key, steps, x, y, progress_bar=False).params
    )
    row["distinct"]["ens"] = check_members(ens_params, size, "ens")
    bar_params, row["bar_first"], row["bar"] = first_and_steady(
        lambda: ens.run(rng_key, steps, x, y, progress_bar=True).params
    )
    row["distinct"]["bar"] = check_members(bar_params, size, "bar")
    row["vmap_vs_ens"] = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(vmap_params), jax.tree.leaves(ens_params), strict=True)
    )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--guides", choices=sorted(GUIDES), nargs="+", default=["normal", "delta"])
    parser.add_argument(
        "--loop-max", type=int, default=4,
        help="largest E for the Python loop of SVI.run (it compiles once per member)",
    )
    args = parser.parse_args(argv)

    x, y, *_ = sinc_data(random.key(0))
    print(
        f"sinc BNN, {args.steps} steps, jax {jax.__version__}, {jax.devices()[0].device_kind}"
    )
    print(
        f"\n{'guide':<11} {'E':>5} {'ens member-steps/s':>19} {'ens/floor':>10} {'ens/vmap':>9}"
        f" {'bar on/off':>11} {'ens compile':>12} {'vs E=' + str(args.sizes[0]):>8}"
        f" {'vmap compile':>13} {'loop/ens':>9} {'vmap - ens':>11}"
    )
    rows = []
    for guide in args.guides:
        base_compile = None
        for size in args.sizes:
            r = bench(size, args.steps, guide, args.loop_max, x, y)
            rows.append(r)
            ens_compile = r["ens_first"] - r["ens"]
            base_compile = ens_compile if base_compile is None else base_compile
            loop = f"{r['loop'] / r['ens_first']:>9.1f}" if "loop" in r else f"{'-':>9}"
            print(
                f"{GUIDES[guide].__name__:<11} {size:>5} {size * args.steps / r['ens']:>19.3g}"
                f" {r['ens'] / r['floor']:>10.2f} {r['ens'] / r['vmap']:>9.2f}"
                f" {r['bar'] / r['ens']:>11.2f} {ens_compile:>11.2f}s"
                f" {ens_compile / base_compile:>8.2f} {r['vmap_first'] - r['vmap']:>12.2f}s"
                f" {loop} {r['vmap_vs_ens']:>11.1e}",
                flush=True,
            )
    print(
        "\nens/floor, ens/vmap, bar on/off: steady-time ratios; 'vs E=': ensemble compile time"
        "\nrelative to the smallest E (flat = not growing with E); loop/ens: a Python loop of"
        "\nSVI.run against the first (compiling) EnsembleSVI.run; vmap - ens: the largest"
        "\n|difference| of their fitted params. Every way's params have the member axis and"
        "\nE distinct members (checked)."
    )
    return rows


if __name__ == "__main__":
    main()
