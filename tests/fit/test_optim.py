"""Linesearch optimizers (optax.lbfgs) per member, gradient-norm stopping, and
EnsembleMAP's default optimizer."""

import jax
from jax import lax, random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_density
import optax
import pytest

from numpyro_ensemble import EarlyStopping, EnsembleMAP, EnsembleSVI
from numpyro_ensemble.fit.optim import DEFAULT_MINI_BATCH, full_data_lbfgs

X = jnp.linspace(-1.0, 1.0, 20)
Y = 0.5 - 1.2 * X + 0.3 * jnp.sin(7 * X)


def line(x, y=None):
    a = numpyro.sample("a", dist.Normal(0.0, 3.0))
    b = numpyro.sample("b", dist.Normal(0.0, 3.0))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(a + b * x, 0.5), obs=y)


def analytic_mode(x, y, prior_sd=3.0, noise=0.5):
    design = jnp.stack([jnp.ones_like(x), x], axis=1)
    precision = design.T @ design / noise**2 + jnp.eye(2) / prior_sd**2
    return np.linalg.solve(precision, design.T @ y / noise**2)


def test_a_member_is_optax_lbfgs_run_by_hand_on_its_objective():
    steps = 6
    ens = EnsembleMAP(line, optax.lbfgs(), ensemble_size=3)
    starts = ens.get_params(ens.init(random.key(0), X, Y))
    result = ens.run(random.key(0), steps, X, Y, progress_bar=False, early_stopping=None)

    def objective(params):  # the MAP loss of member e: -log p(y, a, b)
        points = {"a": params["a_auto_loc"], "b": params["b_auto_loc"]}
        return -log_density(line, (X, Y), {}, points)[0]

    opt = optax.lbfgs()

    def step(carry, _):
        params, state = carry
        value, grad = jax.value_and_grad(objective)(params)
        updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                    value_fn=objective)
        return (optax.apply_updates(params, updates), state), value

    for e in range(3):
        start = {k: v[e] for k, v in starts.items()}
        (params, _), losses = lax.scan(step, (start, opt.init(start)), None, length=steps)
        np.testing.assert_allclose(result.losses[e], losses, rtol=1e-4)
        for name, value in params.items():
            np.testing.assert_allclose(result.params[name][e], value, rtol=1e-4, atol=1e-5)
    assert len(np.unique(np.asarray(starts["a_auto_loc"]))) == 3  # three distinct starts


def test_the_default_optimizer_is_lbfgs_on_full_data_and_stops_members():
    ens = EnsembleMAP(line, ensemble_size=3)  # the model is the only input
    result = ens.run(random.key(0), 500, X, Y, progress_bar=False)
    stopped_at = np.asarray(ens.get_extra_fields()["stopped_at"])
    assert (stopped_at < 60).all(), stopped_at  # converged in tens of iterations
    points = ens.get_points(result.params)
    mode = analytic_mode(X, Y)
    np.testing.assert_allclose(points["a"], mode[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(points["b"], mode[1], rtol=1e-4, atol=1e-4)
    assert ens._optim_arg is full_data_lbfgs(2)  # two values to fit


def _memory(transformation):
    state = transformation.init({"x": jnp.zeros(3)})
    return optax.tree_utils.tree_get(state, "diff_params_memory")["x"].shape[0]


def test_the_default_lbfgs_memory_shrinks_with_the_model_size():
    # 2 x memory x size values at most (LBFGS_MEMORY_VALUES), memory in [10, 50]
    assert [_memory(full_data_lbfgs(n)) for n in (1, 10_000, 20_000, 50_000, 10**7)] == [
        50, 50, 25, 10, 10]
    assert full_data_lbfgs(3) is full_data_lbfgs(8)  # one object: shared programs

    def wide(x, y=None):  # 30,001 values: memory 16
        w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([30_000]).to_event(1))
        numpyro.sample("y", dist.Normal(w[0] + x, 1.0), obs=y)

    ens = EnsembleMAP(wide, ensemble_size=2)
    ens.init(random.key(0), X, Y)
    assert _memory(ens._optim_arg) == 16


def test_a_member_stopped_by_grad_tol_equals_a_run_of_that_many_steps():
    ens = EnsembleMAP(line, optax.lbfgs(), ensemble_size=3)
    rule = EarlyStopping(grad_tol=1e-2)
    result = ens.run(random.key(0), 200, X, Y, progress_bar=False, early_stopping=rule)
    stopped_at = np.asarray(ens.get_extra_fields()["stopped_at"])
    assert (stopped_at < 200).all()
    e, s = 0, int(stopped_at[0])
    plain = ens.run(random.key(0), s, X, Y, progress_bar=False, early_stopping=None)
    np.testing.assert_allclose(result.params["a_auto_loc"][e], plain.params["a_auto_loc"][e],
                               rtol=1e-6)
    # the gradient at the stopped point is within the tolerance, and was not one step earlier
    grad = jax.grad(lambda a, b: -log_density(line, (X, Y), {}, {"a": a, "b": b})[0],
                    argnums=(0, 1))
    norm = lambda p, i: float(jnp.linalg.norm(jnp.stack(grad(p["a_auto_loc"][i],  # noqa: E731
                                                              p["b_auto_loc"][i]))))
    assert norm(result.params, e) <= 1e-2 * 1.01
    before = ens.run(random.key(0), s - 1, X, Y, progress_bar=False, early_stopping=None)
    assert norm(before.params, e) > 1e-2


def test_lbfgs_needs_a_deterministic_loss():
    svi = EnsembleSVI(line, AutoNormal(line), optax.lbfgs(), Trace_ELBO(), ensemble_size=2)
    with pytest.raises(ValueError, match=r"needs a deterministic loss, but the sites \['a', 'b'\] "
                                         r"are drawn at random"):
        svi.run(random.key(0), 5, X, Y, progress_bar=False)

    def batched(x, y=None):
        a = numpyro.sample("a", dist.Normal(0.0, 3.0))
        with numpyro.plate("n", x.shape[0], subsample_size=5) as i:
            numpyro.sample("y", dist.Normal(a + x[i], 0.5), obs=y[i])

    with pytest.raises(ValueError, match=r"subsamples the plates \['n'\]"):
        EnsembleMAP(batched, optax.lbfgs(), ensemble_size=2).run(random.key(0), 5, X, Y,
                                                                progress_bar=False)
    with pytest.raises(ValueError, match=r"grad_tol=\.\.\.\) needs an optimizer that keeps"):
        EnsembleMAP(line, optax.adam(0.1), ensemble_size=2).run(
            random.key(0), 5, X, Y, progress_bar=False, early_stopping=EarlyStopping(grad_tol=1e-3))
    with pytest.raises(ValueError, match="EarlyStopping needs patience"):
        EarlyStopping().check()

    # with mini-batches the default is Adam with a plateau schedule, and it fits
    ens = EnsembleMAP(batched, ensemble_size=2)
    result = ens.run(random.key(0), 1500, X, Y, progress_bar=False)
    assert ens._optim_arg is DEFAULT_MINI_BATCH
    expected = float(jnp.sum(Y - X) / (X.shape[0] + 0.25 / 9.0))  # the MAP of a
    np.testing.assert_allclose(ens.get_points(result.params)["a"], expected, atol=0.05)
