"""ensemble_summary: modes, divergences, weights and the verdict."""

from jax import random
import jax.numpy as jnp
from members_at import Y, normal_mean, svi_at, two_modes
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest

from numpyro_ensemble import (
    EnsembleMAP,
    ensemble_summary,
    importance_weights,
    laplace_members,
)


@pytest.fixture(scope="module")
def modes():
    # 4 members on the 0.3 mode, 3 on the 0.7 mode, one far from both.
    return svi_at(two_modes, [-3.0] * 4 + [3.0] * 3 + [30.0], [1.0] * 8)


def test_ensemble_summary_flags_modes_divergence_and_weights(modes, capsys):
    svi, params = modes
    params = dict(params)
    params["x_auto_scale"] = params["x_auto_scale"].at[0].set(jnp.nan)
    with pytest.warns(RuntimeWarning):
        summary = ensemble_summary(svi, random.key(1), params, num_samples=200)
    assert summary.diverged.tolist() == [True] + [False] * 7
    assert summary.weight[0] == 0 and summary.weight_kind == "importance"
    assert summary.mode[0] == -1
    assert len(set(summary.mode[1:4])) == 1 and len(set(summary.mode[4:7])) == 1
    assert summary.num_modes == 3  # -3, +3, and the far member
    assert summary.nearest[7] > 5
    assert summary.pareto_k < 0.7
    print(summary)
    out = capsys.readouterr().out
    assert "verdict:" in out and "3 distinct modes" in out and "members [0] diverged" in out


def test_ensemble_summary_of_a_map_run_uses_stacking():
    ens = EnsembleMAP(normal_mean, optax.adam(0.1), ensemble_size=3)
    result = ens.run(random.key(0), 300, Y, progress_bar=False)
    summary = ensemble_summary(ens, random.key(1), result, Y)
    assert summary.weight_kind == "stacking" and summary.num_modes == 1
    np.testing.assert_allclose(summary.final_loss, np.asarray(result.losses[:, -1]))
    assert np.isnan(summary.r_hat) and "agree" in summary.verdict


def test_ensemble_summary_gives_a_verdict_when_no_draw_can_be_weighted():
    # Both members sit where the model's log density is -inf (|mu| > 3) at every draw:
    # importance_weights raises, and ensemble_summary says so in its verdict instead.
    def bounded():
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.factor("bound", jnp.where(jnp.abs(mu) < 3, 0.0, -jnp.inf))

    svi, params = svi_at(bounded, [10.0, 12.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="no draw has a finite log density"):
        importance_weights(svi, random.key(1), params, num_samples=50)
    summary = ensemble_summary(svi, random.key(1), params, num_samples=50)
    assert summary.weight_kind == "importance" and np.isnan(summary.weight).all()
    assert "no importance weights (no draw has a finite log density" in summary.verdict


def wide_linear(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Normal(x @ w, 0.1).to_event(1), obs=y)


def test_importance_weights_in_high_dimension_are_called_not_meaningful():
    x = random.normal(random.key(0), (5, 1500))
    y = random.normal(random.key(1), (5,))
    ens = EnsembleMAP(wide_linear, optax.adam(0.05), ensemble_size=2)
    result = ens.run(random.key(2), 200, x, y, progress_bar=False)
    # a diagonal Gaussian of a posterior correlated along five directions
    laplace, lp = laplace_members(ens, result.params, x, y, structure="diagonal")
    iw = importance_weights(laplace, random.key(3), lp, x, y, num_samples=20)
    assert iw.pareto_k >= 0.7
    summary = ensemble_summary(laplace, random.key(4), lp, x, y, weights=iw)
    assert "not meaningful at this dimension (1500 latent values" in summary.verdict
