"""Ensembles placed at given points (no fitting), shared by the weighting tests."""

from jax import random
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax

from numpyro_ensemble import EnsembleSVI


def two_modes():
    mix = dist.MixtureSameFamily(
        dist.Categorical(jnp.array([0.3, 0.7])), dist.Normal(jnp.array([-3.0, 3.0]), 1.0)
    )
    numpyro.sample("x", mix)


def normal_mean(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


Y = random.normal(random.key(0), (40,)) + 1.0
# Posterior of mu: Normal(sum(y) / (n + 1/100), 1 / sqrt(n + 1/100)).
POST_PREC = Y.shape[0] + 1e-2
POST_MEAN, POST_SD = float(Y.sum() / POST_PREC), float(POST_PREC**-0.5)


def svi_at(model, locs, scales, *args):
    """An AutoNormal ensemble whose members sit at the given locs / scales (no fitting)."""
    name = "x" if model is two_modes else "mu"
    svi = EnsembleSVI(model, AutoNormal(model), optax.adam(0.01), Trace_ELBO(),
                      ensemble_size=len(locs))
    init = {f"{name}_auto_loc": jnp.asarray(locs), f"{name}_auto_scale": jnp.asarray(scales)}
    state = svi.init(random.key(0), *args, init_params=init)
    return svi, svi.get_params(state)
