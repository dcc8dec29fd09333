"""TemperedTrace_ELBO: equals Trace_ELBO at kl_weight=1, tempers the right terms."""

from conftest import normal_model
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.handlers import replay, seed
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import compute_log_probs
from numpyro.primitives import mutable
import optax
import pytest

from numpyro_ensemble import EnsembleSVI, TemperedTrace_ELBO
from numpyro_ensemble.fit.elbo import in_name_order


def local_model(x, y=None):
    """A global and a local latent inside a subsampled plate, plus a factor."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    state = mutable("calls", {"n": jnp.array(0.0)})
    state["n"] = state["n"] + 1.0
    with numpyro.plate("data", x.shape[0], subsample_size=5) as idx:
        z = numpyro.sample("z", dist.Normal(mu, 1.0))
        numpyro.sample("y", dist.Normal(z + x[idx], 0.5), obs=None if y is None else y[idx])
    numpyro.factor("penalty", -0.1 * mu**2)


@pytest.fixture
def local_setup():
    x = jnp.linspace(0.0, 1.0, 20)
    y = 2.0 * x + 1.0
    guide = AutoNormal(local_model)
    svi = SVI(local_model, guide, optax.adam(0.01), Trace_ELBO())
    state = svi.init(random.key(0), x, y)
    params = svi.get_params(state)
    params.update(state.mutable_state)
    return x, y, guide, params


@pytest.mark.parametrize("num_particles", [1, 4])
def test_kl_weight_one_equals_trace_elbo(local_setup, num_particles):
    x, y, guide, params = local_setup
    for key in random.split(random.key(5), 3):
        # exactly the Trace_ELBO the ensembles run (its sites added by name); NumPyro's
        # adds them in the order of a set of the names (PYTHONHASHSEED): up to rounding
        ref = in_name_order(Trace_ELBO(num_particles=num_particles)).loss_with_mutable_state(
            key, params, local_model, guide, x, y
        )
        numpyro_ref = Trace_ELBO(num_particles=num_particles).loss(key, params, local_model, guide, x, y)
        got = TemperedTrace_ELBO(num_particles=num_particles, kl_weight=1.0).loss_with_mutable_state(
            key, params, local_model, guide, x, y
        )
        assert got["loss"] == ref["loss"]  # exactly
        np.testing.assert_allclose(got["loss"], numpyro_ref, rtol=1e-6)
        if num_particles == 1:
            n = params["calls"]["n"] + 1.0  # one more model call
            assert got["mutable_state"]["calls"]["n"] == ref["mutable_state"]["calls"]["n"] == n


@pytest.mark.parametrize("kl_weight", [0.0, 0.3, 2.5])
def test_tempered_loss_is_the_formula(local_setup, kl_weight):
    """-(log p(y|z) + beta (log p(z) - log q(z))), each site with its plate scale N/|B|."""
    x, y, guide, params = local_setup
    key = random.key(11)
    got = TemperedTrace_ELBO(kl_weight=kl_weight).loss(key, params, local_model, guide, x, y)

    model_seed, guide_seed = random.split(key)
    guide_lp, guide_trace = compute_log_probs(seed(guide, guide_seed), (x, y), {}, params)
    model_lp, model_trace = compute_log_probs(
        replay(seed(local_model, model_seed), guide_trace), (x, y), {}, params
    )
    observed = [n for n, s in model_trace.items() if s["type"] == "sample" and s["is_observed"]]
    assert set(observed) == {"y", "penalty"}  # the factor counts as likelihood
    assert model_trace["y"]["scale"] == 4.0 and model_trace["z"]["scale"] == 4.0
    log_lik = sum(model_lp[n] for n in observed)
    log_prior = sum(v for n, v in model_lp.items() if n not in observed)
    expected = -(log_lik + kl_weight * (log_prior - sum(guide_lp.values())))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_factor_sites_are_untempered():
    """A likelihood written as a factor gives the same tempered loss as the obs site."""
    y = jnp.array([0.5, 1.0, 2.0])

    def factor_model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        numpyro.factor("lik", dist.Normal(mu, 1.0).log_prob(y).sum())

    guide = AutoNormal(normal_model)
    svi = SVI(normal_model, guide, optax.adam(0.1), Trace_ELBO())
    params = svi.get_params(svi.init(random.key(0), y))
    elbo = TemperedTrace_ELBO(kl_weight=0.25)
    for key in random.split(random.key(1), 3):
        np.testing.assert_allclose(
            elbo.loss(key, params, factor_model, guide, y),
            elbo.loss(key, params, normal_model, guide, y),
            rtol=1e-6,
        )


@pytest.mark.slow
def test_tempered_optimum_is_the_tempered_posterior():
    """For Normal-Normal the optimum of the tempered ELBO over Normal q is
    N(m, s^2) with precision 1/tau^2 + n/(beta sigma^2), m = s^2 sum(y)/(beta sigma^2)."""
    y = jnp.array([0.3, 1.1, 0.8, 1.6, 0.9])
    tau, beta = 2.0, 0.5
    precision = 1 / tau**2 + y.size / beta
    mean, sd = (y.sum() / beta) / precision, precision**-0.5
    optim = optax.adam(optax.exponential_decay(0.05, 500, 0.5))
    svi = EnsembleSVI(
        normal_model, AutoNormal(normal_model), optim,
        TemperedTrace_ELBO(num_particles=32, kl_weight=beta), ensemble_size=8,
    )
    params = svi.run(random.key(0), 4000, y, progress_bar=False).params
    np.testing.assert_allclose(params["mu_auto_loc"].mean(), mean, rtol=0.02)
    np.testing.assert_allclose(params["mu_auto_scale"].mean(), sd, rtol=0.03)
    # beta = 1 would be the ordinary posterior: clearly different numbers.
    assert abs(sd - (1 / tau**2 + y.size) ** -0.5) > 0.05


@pytest.mark.parametrize("bad, exc", [(-0.1, ValueError), (float("inf"), ValueError), (float("nan"), ValueError), ("1", TypeError), (jnp.ones((2, 2)), ValueError), (jnp.array([1.0, -1.0]), ValueError)])
def test_bad_kl_weight(bad, exc):
    with pytest.raises(exc, match="kl_weight"):
        TemperedTrace_ELBO(kl_weight=bad)


def test_per_member_kl_weight_needs_an_ensemble_of_that_size():
    y = jnp.array([0.5, 1.0, 1.5])
    loss = TemperedTrace_ELBO(kl_weight=np.array([1.0, 0.5, 0.2, 0.1]))
    with pytest.raises(ValueError, match=r"kl_weight has 4 values, but ensemble_size=3"):
        EnsembleSVI(normal_model, AutoNormal(normal_model), optax.adam(0.01), loss, ensemble_size=3)
    # A plain SVI has no members to share the weights out: the (E,) array would broadcast
    # over the sites and sum E tempered ELBOs into one loss.
    svi = SVI(normal_model, AutoNormal(normal_model), optax.adam(0.01),
              TemperedTrace_ELBO(kl_weight=[1.0, 0.5]))
    with pytest.raises(ValueError, match=r"kl_weight has 2 values \(one per member\), but this "
                                         r"loss is evaluated on its own.*ensemble_size=2"):
        svi.run(random.key(0), 2, y, progress_bar=False)


# A fit in a process of its own: the numbers (and the traced programs, dumped by JAX)
# must not depend on Python's string hash seed, which orders NumPyro's sets of names.
SITE_NAMES = ("a", "b", "c", "z", "s", "y")
HASH_SEED_FIT = """
import hashlib, json
import jax, jax.numpy as jnp, numpy as np
from jax import random
import numpyro, numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
numpyro.enable_x64()
from numpyro_ensemble import EnsembleMAP, EnsembleSVI

def model(x, y):
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0))
    c = numpyro.sample("c", dist.Normal(0.0, 10.0))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    s = numpyro.sample("s", dist.HalfNormal(5.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x + c * x**2 + z.sum(), s), obs=y)

def digest(tree):
    return hashlib.sha256(b"".join(np.asarray(v).tobytes() for v in jax.tree.leaves(tree))).hexdigest()

x = jnp.linspace(-1.0, 1.0, 20)
y = 1.0 + 2.0 * x + 0.5 * x**2
svi = EnsembleSVI(model, AutoNormal(model), optax.adam(0.05), Trace_ELBO(), ensemble_size=2)
fit = svi.run(random.key(0), 20, x, y, progress_bar=False)
map_fit = EnsembleMAP(model, optax.adam(0.05), ensemble_size=2).run(random.key(1), 20, x, y,
                                                                     progress_bar=False)
print(json.dumps({"svi": digest((fit.params, fit.losses)),
                  "map": digest((map_fit.params, map_fit.losses))}))
"""


def _set_order(hash_seed):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    code = f"print(list(set({SITE_NAMES!r})))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout


def test_fit_is_the_same_whatever_the_hash_seed(tmp_path):
    # NumPyro's Trace_ELBO forms and adds its sites' terms in the order of a set of the
    # names; the package adds them by name, for Trace_ELBO members and TemperedTrace_ELBO
    # (EnsembleMAP). Two processes whose set orders differ: the same bits and programs.
    import hashlib
    import json
    import os
    import pathlib
    import re
    import subprocess
    import sys

    seeds = [0]
    seeds.append(next(s for s in range(1, 50) if _set_order(s) != _set_order(0)))
    found = []
    for seed_value in seeds:
        dump = tmp_path / f"ir{seed_value}"
        env = {**os.environ, "PYTHONHASHSEED": str(seed_value), "JAX_DUMP_IR_TO": str(dump)}
        out = subprocess.run([sys.executable, "-c", HASH_SEED_FIT], capture_output=True,
                             text=True, cwd=pathlib.Path(__file__).parents[2], env=env,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        # by name and content, not by the dump's counter: a first run compiles its init
        # and chunk programs side by side, in either order
        programs = sorted(
            (re.sub(r"^jax_ir\d+_", "", f.name), hashlib.sha256(f.read_bytes()).hexdigest())
            for f in dump.iterdir()
        )
        found.append((json.loads(out.stdout.splitlines()[-1]), programs))
    (first, first_programs), (second, second_programs) = found
    assert first["svi"] == second["svi"]  # Trace_ELBO, as the package's members run it
    assert first["map"] == second["map"]  # TemperedTrace_ELBO
    assert first_programs and any("chunk" in name for name, _ in first_programs)
    assert first_programs == second_programs
