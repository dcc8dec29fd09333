"""NUTS warm-started from an ensemble: starts, inverse mass matrix, step size."""

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    EnsembleSVI,
    importance_weights,
    laplace_members,
    nuts_warm_start,
)
from numpyro_ensemble.use.mcmc import NEGLIGIBLE_WEIGHT, member_order

D = 4
MEAN = np.arange(D, dtype=np.float32)
COV = (0.9 ** np.abs(np.subtract.outer(np.arange(D), np.arange(D)))
       * np.outer(np.arange(1, D + 1), np.arange(1, D + 1)) * 0.5).astype(np.float32)


def gaussian():
    numpyro.sample("x", dist.MultivariateNormal(jnp.asarray(MEAN), covariance_matrix=jnp.asarray(COV)))


@pytest.fixture(scope="module")
def laplace():
    ens = EnsembleMAP(gaussian, ensemble_size=3)
    result = ens.run(random.key(0), 200, progress_bar=False)
    return ens, result, *laplace_members(ens, result.params)


def test_the_metric_is_the_posterior_covariance_and_warm_nuts_is_right(laplace):
    _, _, members, params = laplace
    weights = importance_weights(members, random.key(1), params, num_samples=200)
    warm = nuts_warm_start(members, random.key(2), params, num_chains=3, weights=weights)
    assert warm.sites == ("x",) and warm.num_chains == 3
    np.testing.assert_allclose(warm.covariance, COV, rtol=1e-3, atol=1e-4)  # Laplace: exact
    matrix = warm.nuts_kwargs["inverse_mass_matrix"][("x",)]
    np.testing.assert_allclose(matrix, COV, rtol=1e-3, atol=1e-4)
    assert warm.nuts_kwargs["dense_mass"] == [("x",)]
    assert not warm.nuts_kwargs["adapt_mass_matrix"] and warm.num_warmup == 150  # trusted
    starts = np.asarray(warm.init_params["x"])
    assert starts.shape == (3, D) and len({tuple(row) for row in starts.round(5)}) == 3
    # the spare starts: as many, distinct from the starts; the reference energy is
    # the 99th percentile of a 4-d Gaussian's potential energy, 0.5 chi2_4 + log
    # normalizer: 0.5 * 13.28 + 0.5 * log det(2 pi COV)
    assert np.asarray(warm.spare_params["x"]).shape == (3, D)
    assert not np.isin(np.asarray(warm.spare_params["x"]).round(5), starts.round(5)).all(1).any()
    expected = 0.5 * 13.277 + 0.5 * np.linalg.slogdet(2 * np.pi * COV)[1]
    assert abs(warm.reference_energy - expected) < 1.0
    assert warm.nuts_kwargs["kinetic_fn"].__name__ == "guarded_kinetic_energy"

    mcmc = MCMC(NUTS(gaussian, **warm.nuts_kwargs), num_warmup=warm.num_warmup,
                num_samples=500, num_chains=warm.num_chains, chain_method="vectorized",
                progress_bar=False)
    mcmc.run(random.key(4), init_params=warm.init_params)
    x = np.asarray(mcmc.get_samples()["x"])
    sd = np.sqrt(np.diag(COV))
    np.testing.assert_allclose(x.mean(0), MEAN, atol=0.15 * sd.max())
    np.testing.assert_allclose(x.std(0), sd, rtol=0.15)


def test_member_weighted_starts_never_use_a_negligible_member():
    """Members drawn in proportion to their weights without replacement, never one of
    weight < 1e-3; over many keys the first pick follows the weights."""
    w = np.array([0.5, 0.3, 0.1999, 0.0009, 0.0001999, 0.0, 1e-9, 0.0])
    w = w / w.sum()
    usable = np.ones(8, bool)
    usable[1] = False  # non-finite params: never, whatever its weight
    firsts = []
    for seed in range(400):
        order = member_order(random.key(seed), usable, w)
        assert sorted(order.tolist()) == [0, 2], order  # weight >= 1e-3 and usable
        firsts.append(order[0])
    share = np.mean(np.array(firsts) == 0)
    expected = w[0] / (w[0] + w[2])  # 0.714: proportional to the usable weights
    assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / 400)
    assert NEGLIGIBLE_WEIGHT == 1e-3
    # without weights: every usable member, in order
    assert member_order(random.key(0), usable, None).tolist() == [0, 2, 3, 4, 5, 6, 7]


def test_without_trusted_weights_the_metric_keeps_adapting(laplace):
    _, _, members, params = laplace
    # no weights: not trusted, so NUTS adapts a diagonal metric started at the ensemble's
    warm = nuts_warm_start(members, random.key(2), params, num_chains=2)
    assert warm.nuts_kwargs["adapt_mass_matrix"] and warm.num_warmup == 500
    np.testing.assert_allclose(warm.nuts_kwargs["inverse_mass_matrix"][("x",)], np.diag(COV),
                               rtol=1e-3)
    assert warm.nuts_kwargs["dense_mass"] == []
    # dense on request, still adapted
    dense = nuts_warm_start(members, random.key(2), params, num_chains=2, dense_mass=True)
    assert dense.nuts_kwargs["adapt_mass_matrix"] and dense.num_warmup == 500
    np.testing.assert_allclose(dense.nuts_kwargs["inverse_mass_matrix"][("x",)], COV,
                               rtol=1e-3, atol=1e-4)
    assert dense.nuts_kwargs["dense_mass"] == [("x",)]
    # trusted weights, diagonal on request: kept, not adapted
    weights = importance_weights(members, random.key(1), params, num_samples=200)
    diagonal = nuts_warm_start(members, random.key(2), params, weights=weights,
                               dense_mass=False)
    assert not diagonal.nuts_kwargs["adapt_mass_matrix"] and diagonal.num_warmup == 150
    assert diagonal.nuts_kwargs["dense_mass"] == []


def test_bad_input_is_a_clear_error(laplace):
    ens, result, members, params = laplace
    with pytest.raises(ValueError, match="the members are points .* laplace_members"):
        nuts_warm_start(ens, random.key(0), result.params)
    with pytest.raises(ValueError, match=r"weights must have shape \(ensemble_size,\) = \(3,\)"):
        nuts_warm_start(members, random.key(0), params, weights=jnp.ones(2))

    def other():
        numpyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))

    with pytest.raises(ValueError, match=r"model has the latent sites \['z'\], but the "
                                         r"ensemble's model has \['x'\]"):
        nuts_warm_start(members, random.key(0), params, model=other)
    fresh = EnsembleSVI(gaussian, AutoNormal(gaussian), optax.adam(0.01), Trace_ELBO(),
                        ensemble_size=2)
    with pytest.raises(RuntimeError, match="nuts_warm_start needs the param constraints"):
        nuts_warm_start(fresh, random.key(0), {"x_auto_loc": jnp.zeros((2, D))})
