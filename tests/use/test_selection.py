"""One member with NumPyro's own tools; subsets and unions of ensembles."""

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import EnsembleSVI, concat_members, select_members, take_member


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("n", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu, sigma), obs=y)


Y = jnp.array([0.5, 1.0, 1.5, 2.5])


@pytest.fixture(scope="module")
def fitted():
    guide = AutoNormal(model)
    svi = EnsembleSVI(model, guide, optax.adam(0.05), Trace_ELBO(), ensemble_size=3)
    return svi, svi.run(random.key(0), 100, Y, progress_bar=False)


def test_one_member_works_with_numpyros_guide_predictive_and_svi(fitted):
    svi, result = fitted
    params = take_member(result.params, 1)
    assert params["mu_auto_loc"].shape == ()
    draws = svi.guide.sample_posterior(random.key(1), params, sample_shape=(50,))
    assert draws["mu"].shape == (50,) and draws["sigma"].shape == (50,)
    predicted = Predictive(model, guide=svi.guide, params=params, num_samples=20)(random.key(2), Y)
    assert predicted["y"].shape == (20, 4)
    np.testing.assert_allclose(svi.guide.median(params)["mu"], result.params["mu_auto_loc"][1])
    # A plain SVI continues member 2 exactly as the ensemble continues it.
    keys = svi.member_keys(random.key(0))
    plain = SVI(model, AutoNormal(model), optax.adam(0.05), Trace_ELBO())
    plain.init(keys[2], Y)
    alone = plain.run(keys[2], 20, Y, progress_bar=False, init_state=take_member(result.state, 2))
    more = svi.run(random.key(0), 20, Y, progress_bar=False, init_state=result.state)
    np.testing.assert_allclose(alone.losses, more.losses[2], rtol=1e-5)
    np.testing.assert_allclose(alone.params["mu_auto_loc"], more.params["mu_auto_loc"][2], rtol=1e-5)


def test_select_and_concat_members(fitted):
    svi, result = fitted
    two = select_members(result, [2, 0])
    assert two.losses.shape == (2, 100)
    np.testing.assert_array_equal(two.params["mu_auto_loc"], result.params["mu_auto_loc"][jnp.array([2, 0])])
    masked = select_members(result.params, np.array([True, False, True]))
    assert masked["mu_auto_loc"].shape == (2,)
    five = concat_members(result.state, two.state)
    bigger = EnsembleSVI(model, svi.guide, optax.adam(0.05), Trace_ELBO(), ensemble_size=5)
    grown = bigger.run(random.key(3), 10, Y, progress_bar=False, init_state=five)
    assert grown.losses.shape == (5, 10)
    with pytest.raises(IndexError, match=r"member index e must be an int in \[-3, 3\)"):
        take_member(result.params, 3)
    with pytest.raises(IndexError, match="member indices must be in"):
        select_members(result.params, [0, 7])
    with pytest.raises(ValueError, match="non-empty sequence"):
        select_members(result.params, [])
    with pytest.raises(ValueError, match="structure of trees\\[0\\]"):
        concat_members(result.params, result.state)
    with pytest.raises(ValueError, match="at least two"):
        concat_members(result.params)
