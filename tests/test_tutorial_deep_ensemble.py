"""The deep-ensemble tutorial (examples/deep_ensemble.py) runs quickly and says what it shows."""

import math
import pathlib
import runpy

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "deep_ensemble.py"


@pytest.mark.slow
def test_deep_ensemble_tutorial_quick(tmp_path, capsys):
    namespace = runpy.run_path(str(SCRIPT), run_name="not_main")
    out = namespace["main"](["--quick", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out

    flax, eqx = out["scores"]["flax"], out["scores"]["equinox"]
    for fit in (flax["ensemble"], flax["member 0"], flax["average member"], eqx["ensemble"]):
        for region in ("in range", "gap", "outside"):
            assert all(math.isfinite(v) for v in fit[region].values()), (region, fit[region])
    assert np.isfinite(out["final_losses"]["flax"]).all()
    assert np.isfinite(out["final_losses"]["equinox"]).all()

    # The mixture's NLL is at most the members' average NLL (log is concave), and in range
    # the ensemble does not lose to one network.
    for scores in (flax, eqx):
        for region in ("in range", "gap", "outside"):
            assert scores["ensemble"][region]["nll"] <= scores["average member"][region]["nll"] + 1e-4
    assert flax["ensemble"]["in range"]["nll"] <= flax["member 0"]["in range"]["nll"] + 0.1
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
