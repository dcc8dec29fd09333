"""The weight containers' PSIS: log weights beyond float32's range, too few draws."""

import numpy as np


def test_log_weights_beyond_float32s_range_get_weight_zero_not_nan():
    # float64 log densities can pass float32's largest value (3.4e38), e.g. -1e71 at the
    # draws of an explosive ARMA member: the float32 dither had an infinite spacing there
    # (np.spacing(float32 max) = inf) and turned every weight into NaN.
    from numpyro_ensemble.use.weights import psis

    good = np.random.default_rng(0).normal(size=90)
    huge = [-1e39] * 8 + [-float(np.finfo(np.float32).max), -1e71]
    smoothed, k = psis(np.concatenate([good, huge]))
    assert np.isfinite(smoothed).all() and np.isfinite(k)
    assert np.exp(smoothed[90:]).sum() == 0
    np.testing.assert_allclose(np.exp(smoothed).sum(), 1.0, rtol=1e-12)


def test_too_few_draws_for_a_pareto_fit_give_raw_weights_and_infinite_k():
    # 8 draws leave a tail of 1-2 (ArviZ 1.x raises, 0.x returns k = inf): the weights come
    # back normalised and unsmoothed, k = inf, and the verdict machinery sees "unreliable".
    from numpyro_ensemble.use.weights import psis

    log_weights = np.random.default_rng(1).normal(size=(2, 8)) * 3
    smoothed, k = psis(log_weights)
    assert np.all(k == np.inf)
    np.testing.assert_allclose(np.exp(smoothed).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.diff(smoothed, axis=-1), np.diff(log_weights, axis=-1), atol=1e-5)
    # 100 draws are enough for a tail fit in both ArviZ versions: k is finite.
    assert np.isfinite(psis(np.random.default_rng(2).normal(size=100))[1])
