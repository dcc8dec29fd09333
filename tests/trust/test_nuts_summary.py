"""nuts_summary: per-chain divergences and step sizes, R-hat and ESS (NumPyro's own),
and a verdict in ensemble_summary's words."""

from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS
import pytest

from numpyro_ensemble import NUTSSummary, nuts_summary
from numpyro_ensemble.trust.nuts_summary import _verdict


def gaussian():
    numpyro.sample("x", dist.Normal(jnp.array([0.0, 10.0]), jnp.array([1.0, 0.1])).to_event(1))


@pytest.fixture(scope="module")
def mcmc():
    mcmc = MCMC(NUTS(gaussian), num_warmup=200, num_samples=300, num_chains=2,
                chain_method="vectorized", progress_bar=False)
    mcmc.run(random.key(0), extra_fields=("diverging",))
    return mcmc


def test_a_plain_numpyro_run_is_summarized_with_numpyros_diagnostics(mcmc, capsys):
    summary = nuts_summary(mcmc)
    assert isinstance(summary, NUTSSummary)
    x = np.asarray(mcmc.get_samples(group_by_chain=True)["x"])  # (2, 300, 2)
    assert summary.r_hat == pytest.approx(float(np.max(split_gelman_rubin(x))), rel=1e-4)
    assert summary.ess == pytest.approx(float(np.min(effective_sample_size(x))), rel=1e-3)
    assert summary.num_samples == 300 and summary.divergences.tolist() == [0.0, 0.0]
    np.testing.assert_allclose(summary.step_size,
                               np.asarray(mcmc.last_state.adapt_state.step_size))
    assert summary.restarted == {} and summary.stranded == {}
    assert summary.verdict.startswith("the chains agree (r_hat")
    print(summary)
    out = capsys.readouterr().out
    assert "divergent" in out and "verdict: the chains agree" in out


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="nuts_summary: run must be the result of "
                                        "NUTSWarmStart.run or a NumPyro MCMC"):
        nuts_summary({"x": np.zeros(3)})
    fresh = MCMC(NUTS(gaussian), num_warmup=10, num_samples=10, progress_bar=False)
    with pytest.raises(ValueError, match="the MCMC has not run yet"):
        nuts_summary(fresh)


def test_the_verdict_names_stranded_and_restarted_chains_divergences_and_disagreement():
    verdict = _verdict(np.array([0.0, 3.0, 0.0]), 500, 1.05, 800.0,
                       {0: "a", 2: "b"}, {2: "step size 1e-90"})
    assert verdict.startswith("chains [2] are stranded (2: step size 1e-90): do not use")
    assert "chains [0] were stranded after warm-up and restarted" in verdict
    assert "r_hat 1.050 > 1.01: the chains disagree" in verdict
    assert "3 divergent transitions (chain 1: 3 of 500)" in verdict
    low = _verdict(np.array([np.nan, np.nan]), 50, 1.0, 60.0, {}, {})
    assert "divergences not collected" in low and "ess 60 < 100 per chain" in low
