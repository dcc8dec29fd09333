"""stacking_weights: a bad member is down-weighted, for SVI and MAP members."""

from jax import random
import jax.numpy as jnp
from members_at import POST_MEAN, POST_SD, Y, normal_mean, svi_at
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    importance_weights,
    stacking_weights,
)


def test_stacking_downweights_a_bad_member_svi_and_map():
    locs = [POST_MEAN - 0.1, POST_MEAN, POST_MEAN + 0.1, POST_MEAN + 3.0]
    svi, params = svi_at(normal_mean, locs, [POST_SD] * 4, Y)
    s = stacking_weights(svi, random.key(1), params, Y, num_samples=200)
    assert s.member_weights.shape == (4,) and s.pointwise.shape == (4, Y.shape[0])
    assert float(s.member_weights.sum()) == pytest.approx(1.0, abs=1e-6)
    assert s.member_weights[3] < 0.05
    assert s.elpd_loo > s.elpd_loo_equal
    iw = importance_weights(svi, random.key(1), params, Y, num_samples=200)
    assert iw.member_weights[3] < 1e-3

    ens = EnsembleMAP(normal_mean, optax.adam(0.01), ensemble_size=4)
    map_params = ens.get_params(ens.init(random.key(0), Y, init_params={"mu": jnp.asarray(locs)}))
    s = stacking_weights(ens, random.key(1), map_params, Y)
    assert s.member_weights[3] < 0.05 and s.elpd_loo > s.elpd_loo_equal
    with pytest.raises(ValueError, match="point mass.*stacking_weights"):
        importance_weights(ens, random.key(1), map_params, Y)
