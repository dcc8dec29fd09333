"""The deep-ensemble tutorial (examples/deep_ensemble.py) runs quickly and says what it shows."""

import math

from conftest import run_tutorial
import numpy as np
import pytest


@pytest.mark.slow
def test_deep_ensemble_tutorial_quick(tmp_path, capsys):
    out = run_tutorial("deep_ensemble", "--out-dir", str(tmp_path))
    printed = capsys.readouterr().out

    flax, eqx = out["scores"]["flax"], out["scores"]["equinox"]
    for fit in (flax["ensemble"], flax["member 0"], flax["average member"], eqx["ensemble"]):
        for region in ("in range", "gap", "outside"):
            assert all(math.isfinite(v) for v in fit[region].values()), (region, fit[region])
    assert np.isfinite(out["final_losses"]["flax"]).all()
    assert np.isfinite(out["final_losses"]["equinox"]).all()

    # Away from the data the mixture is far better than a single network on average. (It
    # cannot be worse, log being concave; these margins fail when the members are copies
    # of one fit.) In range it is close to the true mean and noise.
    oracle = out["scores"]["oracle"]
    for scores in (flax, eqx):
        assert scores["ensemble"]["gap"]["nll"] < scores["average member"]["gap"]["nll"] - 0.3
        assert scores["ensemble"]["outside"]["nll"] < scores["average member"]["outside"]["nll"] - 5
        assert scores["ensemble"]["in range"]["nll"] < oracle["in range"]["nll"] + 0.2
    # Fitted at all: in range, RMSE within 50% of the noise floor.
    assert flax["ensemble"]["in range"]["rmse"] < 1.5 * out["scores"]["oracle"]["in range"]["rmse"]

    # The members disagree away from the data much more than near it, for both routes (so
    # the equinox members really started from their own networks).
    for scores in (flax, eqx):
        member_sd = {r: scores["ensemble"][r]["member_sd"] for r in ("in range", "gap", "outside")}
        assert member_sd["in range"] > 1e-3, member_sd
        assert member_sd["gap"] > 3 * member_sd["in range"], member_sd
        assert member_sd["outside"] > 3 * member_sd["in range"], member_sd
        assert scores["ensemble"]["gap"]["sd"] > scores["ensemble"]["in range"]["sd"]

    # The eagerly built equinox network, without init_params, is caught.
    assert out["identical_start_warning"] is not None
    assert "net$params" in out["identical_start_warning"]

    for path in out["figures"].values():
        assert path.parent == tmp_path and path.stat().st_size > 10_000, path
    table = out["table"].read_text()
    assert table.startswith("| fit |") and table.count("\n") == 2 + 5
    assert "ensemble of 4 (flax)" in table and "ensemble of 4 (flax)" in printed
