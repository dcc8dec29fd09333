"""to_arviz: groups, dims and ArviZ's own functions, on the ArviZ installed (0.x or 1.x)."""

import math

import arviz as az
from jax import random
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import EnsembleMAP, EnsembleSVI, TemperedTrace_ELBO, to_arviz

matplotlib.use("Agg")
AZ_MAJOR = int(az.__version__.split(".")[0])
E, S = 4, 60


def model(x, y=None):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("obs", x.shape[0]):
        f = numpyro.deterministic("f", w[0] + w[1] * x)
        numpyro.sample("y", dist.Normal(f, sigma), obs=y)


@pytest.fixture(scope="module")
def data():
    x = jnp.linspace(-1.0, 1.0, 15)
    y = 0.5 + 2.0 * x + 0.3 * random.normal(random.key(0), (15,))
    return x, y


@pytest.fixture(scope="module")
def svi_export(data):
    x, y = data
    svi = EnsembleSVI(model, AutoNormal(model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    result = svi.run(random.key(1), 1500, x, y, progress_bar=False)
    exported = to_arviz(
        svi, random.key(2), result, x, y, num_samples=S,
        constant_data={"x": x}, coords={"coef": ["intercept", "slope"]}, dims={"w": ["coef"], "x": ["obs"]},
    )
    return svi, result, exported


def group(exported, name):
    return exported[name] if AZ_MAJOR >= 1 else getattr(exported, name)


def test_groups_shapes_and_dims(svi_export, data):
    x, y = data
    _, result, exported = svi_export
    names = ["posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats", "constant_data"]
    for name in names:
        assert name in (exported.children if AZ_MAJOR >= 1 else exported.groups())
    post = group(exported, "posterior")
    assert dict(post["w"].sizes) == {"chain": E, "draw": S, "coef": 2}
    assert list(post["w"].coords["coef"].values) == ["intercept", "slope"]
    assert post["f"].dims == ("chain", "draw", "obs")  # the plate's name
    assert group(exported, "posterior_predictive")["y"].dims == ("chain", "draw", "obs")
    assert group(exported, "log_likelihood")["y"].dims == ("chain", "draw", "obs")
    np.testing.assert_allclose(group(exported, "observed_data")["y"].values, y)
    np.testing.assert_allclose(group(exported, "constant_data")["x"].values, x)
    for g in names:
        for var in group(exported, g).data_vars.values():
            assert not any("_dim_" in d for d in var.dims), var.dims
    stats = group(exported, "sample_stats")
    np.testing.assert_array_equal(stats["member"].values[:, 0], np.arange(E))
    np.testing.assert_allclose(stats["loss"].values[:, -1], np.asarray(result.losses[:, -1]), rtol=1e-6)


def test_chains_are_members(svi_export):
    svi, result, exported = svi_export
    w = group(exported, "posterior")["w"].values
    for e in range(E):
        loc, scale = result.params["w_auto_loc"][e], result.params["w_auto_scale"][e]
        assert np.all(np.abs(w[e].mean(0) - loc) < 5 * scale / math.sqrt(S))


def test_log_likelihood_is_pointwise_normal(svi_export, data):
    x, y = data
    _, _, exported = svi_export
    post = group(exported, "posterior")
    expected = dist.Normal(post["f"].values, post["sigma"].values[..., None]).log_prob(y)
    np.testing.assert_allclose(group(exported, "log_likelihood")["y"].values, expected, rtol=1e-5, atol=1e-5)


def elpd(loo):
    return float(loo.elpd if AZ_MAJOR >= 1 else loo.elpd_loo)


def test_arviz_functions_work(svi_export, data, tmp_path):
    x, y = data
    _, _, exported = svi_export
    summary = az.summary(exported, var_names=["w", "sigma"])
    assert len(summary) == 3 and np.isfinite(summary["mean"]).all()
    assert math.isfinite(elpd(az.loo(exported)))
    cold = EnsembleSVI(model, AutoNormal(model), optax.adam(0.02), TemperedTrace_ELBO(kl_weight=0.5), ensemble_size=E)
    cold_export = to_arviz(cold, random.key(3), cold.run(random.key(4), 1500, x, y, progress_bar=False), x, y, num_samples=S)
    compared = az.compare({"svi": exported, "cold": cold_export})
    assert set(compared.index) == {"svi", "cold"}
    if AZ_MAJOR >= 1:
        az.plot_forest(exported, var_names=["w"], combined=True, backend="matplotlib").savefig(tmp_path / "forest.png")
        az.plot_trace(exported, var_names=["sigma"], backend="matplotlib").savefig(tmp_path / "trace.png")
    else:
        axes = az.plot_forest(exported, var_names=["w"], combined=True, show=False)
        np.ravel(axes)[0].figure.savefig(tmp_path / "forest.png")
        axes = az.plot_trace(exported, var_names=["sigma"], show=False)
        np.ravel(axes)[0].figure.savefig(tmp_path / "trace.png")
    assert (tmp_path / "forest.png").stat().st_size > 1000
    assert (tmp_path / "trace.png").stat().st_size > 1000


def test_map_export_repeats_points(data):
    x, y = data
    ens = EnsembleMAP(model, optax.adam(0.02), ensemble_size=2)
    result = ens.run(random.key(0), 200, x, y, progress_bar=False)
    exported = to_arviz(ens, random.key(1), result.params, x, y, num_samples=3)
    w = group(exported, "posterior")["w"].values
    np.testing.assert_allclose(w, np.repeat(np.asarray(ens.get_points(result.params)["w"])[:, None], 3, axis=1))
    assert "loss" not in group(exported, "sample_stats")  # params only: no losses to report


def test_bad_input(svi_export, data):
    x, y = data
    svi, result, _ = svi_export
    with pytest.raises(ValueError, match=r"dims names unknown sites \['theta'\]"):
        to_arviz(svi, random.key(0), result, x, y, num_samples=2, dims={"theta": ["school"]})
    with pytest.raises(ValueError, match=r"coords names dims \['school'\] that no site uses"):
        to_arviz(svi, random.key(0), result, x, y, num_samples=2, coords={"school": [1, 2]})
    with pytest.raises(ValueError, match="num_samples"):
        to_arviz(svi, random.key(0), result, x, y, num_samples=0)
    with pytest.raises(ValueError, match=r"coords\['coef'\] has 3 values, but dim 'coef' has length \[2\]"):
        to_arviz(svi, random.key(0), result, x, y, num_samples=2, dims={"w": ["coef"]},
                 coords={"coef": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"dims\['w'\] names 2 dims \['coef', 'extra'\], but the site has shape \(2,\)"):
        to_arviz(svi, random.key(0), result, x, y, num_samples=2, dims={"w": ["coef", "extra"]})
    with pytest.raises(TypeError, match=r"dims\['w'\] must be a list of dim names"):
        to_arviz(svi, random.key(0), result, x, y, num_samples=2, dims={"w": "coef"})
    with pytest.raises(ValueError, match=r"coords\['obs'\] has 3 values"):
        to_arviz(svi, random.key(0), result, x, y, num_samples=2, coords={"obs": [0, 1, 2]})
