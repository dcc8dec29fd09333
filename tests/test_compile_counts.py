"""What uses a fit compiles a few programs on its first call and nothing on a second
with equal settings (issue 23, item 3), counted as NumPyro's ``test_compile.py``
does, with a ``jax.monitoring`` listener on XLA backend compiles."""

from conftest import compiled_programs
from jax import random
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from numpyro_ensemble import (
    EnsembleMAP,
    ensemble_predictive,
    ensemble_summary,
    importance_weights,
    laplace_members,
    nuts_warm_start,
    sample_posterior,
    stacking_weights,
)


def counted_model(x, y=None):  # a model of this module's own: no program of it is cached
    a = numpyro.sample("a", dist.Normal(0.0, 10.0))
    b = numpyro.sample("b", dist.Normal(0.0, 10.0))
    s = numpyro.sample("s", dist.HalfNormal(5.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x, s), obs=y)


def test_each_step_after_the_fit_compiles_a_few_programs_once():
    x = jnp.linspace(-1.0, 1.0, 30)
    y = 1.0 + 2.0 * x + 0.3 * random.normal(random.key(1), (30,))
    ens = EnsembleMAP(counted_model, ensemble_size=3)
    result = ens.run(random.key(0), 100, x, y, progress_bar=False)
    laplace, lp = laplace_members(ens, result.params, x, y)
    iw = importance_weights(laplace, random.key(2), lp, x, y, num_samples=50)
    steps = {
        # the twin takes the fitted guide's prototype: only the Laplace program itself
        "laplace_members": lambda: laplace_members(ens, result.params, x, y, structure="diagonal"),
        "importance_weights": lambda: importance_weights(
            laplace, random.key(3), lp, x, y, num_samples=40
        ),
        "ensemble_summary": lambda: ensemble_summary(
            laplace, random.key(4), result._replace(params=lp), x, y, weights=iw
        ),
        "sample_posterior": lambda: sample_posterior(
            laplace, random.key(5), lp, x, y, num_samples=20, weights=iw
        ),
        "ensemble_predictive": lambda: ensemble_predictive(
            laplace, random.key(6), lp, x, num_samples=20
        ),
        "stacking_weights": lambda: stacking_weights(laplace, random.key(7), lp, x, y, num_samples=10),
        "nuts_warm_start": lambda: nuts_warm_start(laplace, random.key(8), lp, x, y, weights=iw),
    }
    for name, step in steps.items():
        first = compiled_programs(step)
        assert len(first) <= 5, (name, first)
        again = compiled_programs(step)  # equal settings, new keys
        assert again == [], (name, again)
