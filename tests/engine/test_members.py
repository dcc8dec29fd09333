"""The ensemble axis: per-member data, pytree and per-member init_params, members that
start identical (network modules, init_to_value, keyless params)."""

import warnings

from conftest import member, regression_model, tree_allclose
import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta, AutoMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_value
import optax
import pytest

from numpyro_ensemble import EnsembleMAP, EnsembleSVI, IdenticalMembersWarning, per_member

E = 3


def folds(n=10):
    """E regression data sets of one size, slopes 1, 2, 3: per-member (E, n) arrays."""
    xs = jnp.linspace(-1.0, 1.0, n) + 0.1 * jnp.arange(E)[:, None]
    ys = 0.5 + (1.0 + jnp.arange(E)[:, None]) * xs
    return xs, ys + 0.1 * random.normal(random.key(3), ys.shape)


def identical_warnings(record):
    return [w for w in record if issubclass(w.category, IdenticalMembersWarning)]


def test_per_member_data_member_is_plain_svi_on_its_fold():
    """Member e fitted on per_member data takes plain SVI's steps on fold e."""
    xs, ys = folds()
    guide = AutoNormal(regression_model)
    esvi = EnsembleSVI(regression_model, guide, optax.adam(0.05), Trace_ELBO(), ensemble_size=E)
    start = esvi.init(random.key(0), per_member(xs), per_member(ys))
    result = esvi.run(random.key(0), 30, per_member(xs), per_member(ys), progress_bar=False,
                      init_state=start)
    plain = SVI(regression_model, guide, optax.adam(0.05), Trace_ELBO())
    plain.constrain_fn = esvi.constrain_fn
    update = jax.jit(plain.update)
    evaluated = jax.jit(esvi.evaluate)(result.state, per_member(xs), y=per_member(ys))
    for e in range(E):
        state = member(start, e)
        for t in range(30):
            state, loss = update(state, xs[e], ys[e])
            np.testing.assert_allclose(result.losses[e, t], loss, rtol=1e-5)
        tree_allclose(member(result.state, e), state, rtol=1e-5, atol=1e-6)
        # evaluate takes per-member data too, also as keyword arguments
        np.testing.assert_allclose(evaluated[e], jax.jit(plain.evaluate)(state, xs[e], ys[e]), rtol=1e-5)
    _, losses = jax.jit(esvi.update)(result.state, per_member(xs), per_member(ys))
    assert losses.shape == (E,)


def test_per_member_and_shared_data_mix():
    """Per-member targets with shared inputs: each member recovers its own slope (MLE)."""
    xs, ys = folds()
    ens = EnsembleMAP(regression_model, optax.adam(0.05), ensemble_size=E, prior_weight=0.0)
    result = ens.run(random.key(1), 1500, xs[0], per_member(ys), progress_bar=False)
    points = ens.get_points(result.params)
    X = jnp.stack([jnp.ones_like(xs[0]), xs[0]], axis=1)
    for e in range(E):
        expected = jnp.linalg.lstsq(X, ys[e])[0]
        np.testing.assert_allclose(points["w"][e], expected, atol=2e-3)


def test_per_member_data_of_wrong_leading_size_is_a_clear_error():
    xs, ys = folds()
    esvi = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.05),
                       Trace_ELBO(), ensemble_size=E + 1)
    with pytest.raises(ValueError, match=r"per_member data must have a leading axis of size ensemble_size=4.*\(3, 10\)"):
        esvi.run(random.key(0), 5, per_member(xs), per_member(ys))
    with pytest.raises(ValueError, match="per_member data"):
        esvi.init(random.key(0), xs[0], per_member(jnp.float32(1.0)))


def module_model(kind):
    """A tiny network through numpyro.contrib.module, of the given library."""
    from numpyro.contrib import module

    if kind == "flax_module":
        from flax import linen

        class Net(linen.Module):
            @linen.compact
            def __call__(self, x):
                return linen.Dense(1)(jnp.tanh(linen.Dense(4)(x)))[:, 0]

        make = lambda: module.flax_module("net", Net(), input_shape=(1, 1))  # noqa: E731
    elif kind == "nnx_module":
        from flax import nnx

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.hidden = nnx.Linear(1, 4, rngs=rngs)
                self.out = nnx.Linear(4, 1, rngs=rngs)

            def __call__(self, x):
                return self.out(jnp.tanh(self.hidden(x)))[:, 0]

        eager = Net(nnx.Rngs(0))  # numpyro's pattern: the network is built eagerly, once
        make = lambda: module.nnx_module("net", eager)  # noqa: E731
        make.build = lambda key: nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(key)), nnx.Param))
    else:
        import equinox as eqx

        eager = eqx.nn.MLP(1, 1, 4, 1, key=random.key(0))
        net = lambda: module.eqx_module("net", eager)  # noqa: E731
        make = lambda: lambda x: jax.vmap(net())(x)[:, 0]  # noqa: E731
        make.build = lambda key: eqx.partition(eqx.nn.MLP(1, 1, 4, 1, key=key), eqx.is_inexact_array)[0]

    def model(x, y=None):
        f = make()
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", dist.Normal(f(x), 0.1), obs=y)

    return model, getattr(make, "build", None)


def empty_guide(x, y=None):
    pass


NET_X = jnp.linspace(-1.0, 1.0, 8)[:, None]
NET_Y = jnp.sin(2.0 * NET_X[:, 0])


def first_kernel(params):
    """A weight matrix of the network, (E, in, out) (biases start at zero)."""
    return next(leaf for leaf in jax.tree.leaves(params["net$params"]) if leaf.ndim == 3)


def test_networks_initialised_from_numpyros_key_give_distinct_members():
    model, _ = module_model("flax_module")
    esvi = EnsembleSVI(model, empty_guide, optax.adam(0.01), Trace_ELBO(), ensemble_size=E)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        params = esvi.get_params(esvi.init(random.key(0), NET_X, NET_Y))
    assert not identical_warnings(record)
    kernels = [leaf for leaf in jax.tree.leaves(params) if leaf.ndim == 3]
    assert kernels and all(float(jnp.abs(k[0] - k[1]).max()) > 1e-3 for k in kernels)


def test_a_scale_matrix_started_at_the_identity_is_not_an_identical_start(regression_data):
    # AutoMultivariateNormal: scale_tril = init_scale * I in every member, locs apart.
    x, y = regression_data
    svi = EnsembleSVI(regression_model, AutoMultivariateNormal(regression_model),
                      optax.adam(0.01), Trace_ELBO(), ensemble_size=E)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        params = svi.get_params(svi.init(random.key(0), x, y))
    assert not identical_warnings(record)
    assert float(jnp.abs(params["auto_loc"][0] - params["auto_loc"][1]).max()) > 1e-3


def test_pytree_init_params_shared_and_per_member():
    model, _ = module_model("flax_module")
    esvi = EnsembleSVI(model, empty_guide, optax.adam(0.01), Trace_ELBO(), ensemble_size=E)
    params = esvi.get_params(esvi.init(random.key(0), NET_X, NET_Y))["net$params"]
    # A pytree init value, shared by every member...
    shared = member(params, 2)
    with pytest.warns(IdenticalMembersWarning):  # every member starts at the same point
        got = esvi.get_params(esvi.init(random.key(5), NET_X, NET_Y, init_params={"net$params": shared}))
    tree_allclose(got["net$params"], jax.tree.map(lambda v: jnp.broadcast_to(v, (E, *v.shape)), shared))
    # ... or one per member (a leading (E,) axis on every leaf).
    flipped = jax.tree.map(lambda v: v[::-1], params)
    got = esvi.get_params(esvi.init(random.key(5), NET_X, NET_Y, init_params={"net$params": flipped}))
    tree_allclose(got["net$params"], flipped)
    with pytest.raises(ValueError, match=r"init_params\['net\$params'\] has the structure"):
        esvi.init(random.key(0), NET_X, NET_Y, init_params={"net$params": {"params": {}}})
    bad = jax.tree.map(lambda v: jnp.zeros((E + 1, *v.shape[1:])), params)
    with pytest.raises(ValueError, match=r"init_params\['net\$params'\] has shapes"):
        esvi.init(random.key(0), NET_X, NET_Y, init_params={"net$params": bad})


@pytest.mark.parametrize("kind", ["nnx_module", "eqx_module"])
def test_eagerly_built_networks_warn_and_an_init_function_fixes_it(kind):
    model, build = module_model(kind)
    esvi = EnsembleSVI(model, empty_guide, optax.adam(0.01), Trace_ELBO(), ensemble_size=E)
    with pytest.warns(IdenticalMembersWarning, match=r"\['net\$params'\] start identical in all 3 members") as record:
        result = esvi.run(random.key(0), 3, NET_X, NET_Y, progress_bar=False)
    assert record[0].filename == __file__  # points at the user's line
    kernel = first_kernel(result.params)
    np.testing.assert_array_equal(kernel[0], kernel[1])  # a deterministic loss: copies stay copies

    def init_net(rng_key):  # one network per member, built from the member's key
        return {"net$params": build(rng_key)}

    fresh = EnsembleSVI(model, empty_guide, optax.adam(0.01), Trace_ELBO(), ensemble_size=E)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        state = fresh.init(random.key(0), NET_X, NET_Y, init_params=init_net)
    assert not identical_warnings(record)
    kernel = first_kernel(fresh.get_params(state))
    assert float(jnp.abs(kernel[0] - kernel[1]).max()) > 1e-3
    # the function is evaluated with a key of each member's own, reproducibly
    again = fresh.init(random.key(0), NET_X, NET_Y, init_params=init_net)
    tree_allclose(fresh.get_params(again), fresh.get_params(state))


@pytest.mark.parametrize("case", ["init_to_value", "keyless_param"])
def test_identical_starts_warn_once(case, regression_data):
    x, y = regression_data
    if case == "init_to_value":
        ens = EnsembleMAP(regression_model, optax.adam(0.01), ensemble_size=E,
                          init_loc_fn=init_to_value(values={"w": jnp.array([0.3, -0.2]), "sigma": 1.0}))
        names = r"\['sigma_auto_loc', 'w_auto_loc'\]"
    else:
        def guide(x, y=None):
            loc = numpyro.param("w_loc", jnp.array([0.1, 0.2]))
            numpyro.sample("w", dist.Normal(loc, 0.1).to_event(1))
            s = numpyro.param("s", 1.0, constraint=constraints.positive)
            numpyro.sample("sigma", dist.Delta(s))

        ens = EnsembleSVI(regression_model, guide, optax.adam(0.01), Trace_ELBO(), ensemble_size=E)
        names = r"\['s', 'w_loc'\]"
    with pytest.warns(IdenticalMembersWarning, match=names):
        ens.init(random.key(0), x, y)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ens.init(random.key(1), x, y)
    assert not identical_warnings(record)  # once per object


def test_default_inits_do_not_warn(regression_data):
    """AutoNormal's scales start equal in all members (a constant): not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", IdenticalMembersWarning)
        EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.01), Trace_ELBO(),
                    ensemble_size=E).init(random.key(0), *regression_data)
        EnsembleSVI(regression_model, AutoDelta(regression_model), optax.adam(0.01), Trace_ELBO(),
                    ensemble_size=E).init(random.key(0), *regression_data)
        # shared init_params for one site, the others random: as asked, no warning
        EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.01), Trace_ELBO(),
                    ensemble_size=E).init(random.key(0), *regression_data,
                                          init_params={"w_auto_loc": jnp.array([1.0, 2.0])})


def test_init_params_function_must_return_a_dict(regression_data):
    esvi = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.01), Trace_ELBO(),
                       ensemble_size=E)
    with pytest.raises(TypeError, match="must return a dict"):
        esvi.init(random.key(0), *regression_data, init_params=lambda key: random.normal(key))
