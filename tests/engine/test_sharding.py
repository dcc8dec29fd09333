"""Members split over devices (4 CPU devices, forced, in a subprocess) and in
sequential chunks: the results equal the plain, all-at-once run."""

import os
import pathlib
import subprocess
import sys
import textwrap

from conftest import regression_model, subsample_model, tree_allclose
import jax
from jax import random
import numpy as np
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
import optax
import pytest

from numpyro_ensemble import EnsembleMAP, EnsembleSVI

TESTS = pathlib.Path(__file__).resolve().parents[1]

SHARDED = textwrap.dedent(
    """
    import jax, numpy as np, optax
    from jax import random
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from numpyro.infer import Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from conftest import regression_model, subsample_model, tree_allclose
    from numpyro_ensemble import EnsembleMAP, EnsembleSVI, per_member

    devices = jax.devices()
    assert len(devices) == 4, devices
    x = np.linspace(-1.0, 1.0, 12).astype(np.float32)
    y = (0.3 + 1.5 * x).astype(np.float32)
    key = random.key(0)

    guide = AutoNormal(regression_model)

    def svi(**kw):
        return EnsembleSVI(regression_model, guide, optax.adam(0.02), Trace_ELBO(), ensemble_size=8, **kw)

    base = svi()
    plain = base.run(key, 12, x, y, progress_bar=False)
    for kw in ({"devices": devices, "members_per_chunk": 1},
               {"devices": Mesh(np.array(devices).reshape(2, 2), ("a", "b"))}):
        ens = svi(**kw)
        sharded = ens.run(key, 12, x, y, progress_bar=False)
        tree_allclose(sharded.params, plain.params, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(sharded.losses, plain.losses, rtol=1e-6)
        leaf = sharded.params["w_auto_loc"]
        assert isinstance(leaf.sharding, NamedSharding) and len(leaf.sharding.device_set) == 4
        assert leaf.sharding.spec[0] is not None, leaf.sharding.spec  # split, not replicated
        assert leaf.addressable_shards[0].data.shape == (2, 2)
    np.testing.assert_allclose(ens.evaluate(sharded.state, x, y), base.evaluate(plain.state, x, y), rtol=1e-5)

    # mini-batches drawn by the ensemble, per-member data
    folds = np.stack([y + 0.1 * e for e in range(8)])
    def fit(**kw):
        ens = EnsembleMAP(subsample_model, optax.adam(0.05), ensemble_size=8, **kw)
        return ens.run(key, 12, x, per_member(folds), progress_bar=False)
    a, b = fit(), fit(devices=devices)
    tree_allclose(a.params, b.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)

    for bad, kw, exc in ((6, {"devices": devices}, ValueError), (8, {"devices": "cpu"}, TypeError),
                         (8, {"devices": [0, 1]}, TypeError), (8, {"devices": devices, "members_per_chunk": 3}, ValueError)):
        try:
            EnsembleMAP(subsample_model, optax.adam(0.05), ensemble_size=bad, **kw)
        except exc as err:
            print(type(err).__name__, err)
        else:
            raise AssertionError(f"no error for {kw}")
    print("SHARDED OK")
    """
)


@pytest.mark.slow
def test_sharded_over_four_devices_equals_unsharded(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    printed = out.stdout
    assert "SHARDED OK" in printed
    assert "ensemble_size=6 is not a multiple of the 4 devices" in printed
    assert "devices must be a sequence of jax devices (e.g. jax.devices()) or a jax.sharding.Mesh, got str" in printed
    assert "devices must be a non-empty sequence of jax devices" in printed
    assert "members_per_chunk=3 does not divide the 2 members that each of the 4 devices holds" in printed


def test_members_in_sequential_chunks_equal_all_at_once(regression_data):
    x, y = regression_data

    def run(**kw):
        ens = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO(),
                          ensemble_size=6, **kw)
        return ens.run(random.key(1), 20, x, y, progress_bar=False)

    whole, chunked = run(), run(members_per_chunk=2)
    tree_allclose(chunked.params, whole.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(chunked.losses, whole.losses, rtol=1e-6)
    x16 = np.linspace(-1, 1, 16).astype(np.float32)
    a = EnsembleMAP(subsample_model, optax.adam(0.05), ensemble_size=4, members_per_chunk=1)
    b = EnsembleMAP(subsample_model, optax.adam(0.05), ensemble_size=4)
    tree_allclose(a.run(random.key(0), 8, x16, 2 * x16, progress_bar=False).params,
                  b.run(random.key(0), 8, x16, 2 * x16, progress_bar=False).params, rtol=1e-6)


@pytest.mark.parametrize("bad, exc, match", [
    (0, ValueError, "members_per_chunk must be a positive int"),
    (4, ValueError, "members_per_chunk=4 does not divide ensemble_size=6"),
    (2.0, TypeError, "members_per_chunk must be a positive int"),
])
def test_members_per_chunk_is_checked(bad, exc, match):
    with pytest.raises(exc, match=match):
        EnsembleMAP(subsample_model, optax.adam(0.05), ensemble_size=6, members_per_chunk=bad)


def test_devices_are_checked():
    with pytest.raises(TypeError, match="devices must be a sequence of jax devices"):
        EnsembleMAP(subsample_model, optax.adam(0.05), ensemble_size=2, devices=jax.devices()[0])
    one = EnsembleMAP(subsample_model, optax.adam(0.05), ensemble_size=2, devices=jax.devices())
    assert one.mesh.devices.size == len(jax.devices())
