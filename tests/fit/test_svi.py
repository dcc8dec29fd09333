"""EnsembleSVI: the drop-in contract, equivalence with plain SVI per member, errors."""


from conftest import member, regression_model, subsample_model, tree_allclose
import jax
from jax import random
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)
from numpyro.infer.svi import SVIRunResult
from numpyro.primitives import mutable
import optax
import pytest

from numpyro_ensemble import EnsembleSVI

E = 4


def custom_guide(x, y=None):
    loc = numpyro.param("w_loc", lambda key: random.normal(key, (2,)))
    scale = numpyro.param("w_scale", 0.1 * jnp.ones(2), constraint=constraints.positive)
    numpyro.sample("w", dist.Normal(loc, scale).to_event(1))
    s_loc = numpyro.param("s_loc", lambda key: random.normal(key) - 1.0)
    numpyro.sample("sigma", dist.LogNormal(s_loc, 0.1))


def autoguide_list(model):
    from numpyro.handlers import block

    guide = AutoGuideList(model)
    guide.append(AutoNormal(block(model, expose=["w"])))
    guide.append(AutoDelta(block(model, expose=["sigma"])))
    return guide


GUIDES = {
    "AutoNormal": lambda: AutoNormal(regression_model),
    "AutoDelta": lambda: AutoDelta(regression_model),
    "AutoDiagonalNormal": lambda: AutoDiagonalNormal(regression_model),
    "AutoLowRank": lambda: AutoLowRankMultivariateNormal(regression_model, rank=1),
    "AutoGuideList": lambda: autoguide_list(regression_model),
    "custom": lambda: custom_guide,
}

OPTIMS = {
    "numpyro-adam": lambda: numpyro.optim.Adam(0.05),
    "optax-schedule": lambda: optax.chain(
        optax.clip_by_global_norm(10.0),
        optax.adam(optax.exponential_decay(0.05, 10, 0.9)),
    ),
}


@pytest.mark.parametrize("guide_name", sorted(GUIDES))
def test_members_start_distinct_and_equal_plain_svi_init(guide_name, regression_data):
    """Member e of init(key) is SVI(model, new guide).init(keys[e]): distinct members."""
    x, y = regression_data
    esvi = EnsembleSVI(
        regression_model, GUIDES[guide_name](), numpyro.optim.Adam(0.05), Trace_ELBO(),
        ensemble_size=E,
    )
    state = esvi.init(random.key(0), x, y)
    params = esvi.get_params(state)
    for leaf in jax.tree.leaves(state):
        assert jnp.shape(leaf)[0] == E
    keys = esvi.member_keys(random.key(0))
    varied = False
    for _name, value in params.items():
        assert value.shape[0] == E
        varied |= bool(jnp.any(jnp.abs(value[1:] - value[0]) > 1e-6))
    assert varied, "all members start from the same point"
    for e in range(E):
        plain = SVI(regression_model, GUIDES[guide_name](), numpyro.optim.Adam(0.05), Trace_ELBO())
        plain_state = plain.init(keys[e], x, y)
        tree_allclose(plain.get_params(plain_state), member(params, e), rtol=1e-6, atol=1e-6)
        tree_allclose(plain_state, member(state, e), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("optim_name", sorted(OPTIMS))
@pytest.mark.parametrize("guide_name", ["AutoNormal", "AutoDiagonalNormal", "custom"])
def test_update_is_plain_svi_update_per_member(guide_name, optim_name, regression_data):
    x, y = regression_data
    guide = GUIDES[guide_name]()
    esvi = EnsembleSVI(regression_model, guide, OPTIMS[optim_name](), Trace_ELBO(), ensemble_size=E)
    plain = SVI(regression_model, guide, OPTIMS[optim_name](), Trace_ELBO())
    state = esvi.init(random.key(3), x, y)
    plain.init(random.key(3), x, y)  # sets plain.constrain_fn
    members = [member(state, e) for e in range(E)]
    update = jax.jit(esvi.update)
    plain_update = jax.jit(plain.update)
    for _ in range(5):
        state, losses = update(state, x, y)
        assert losses.shape == (E,)
        for e in range(E):
            members[e], loss = plain_update(members[e], x, y)
            np.testing.assert_allclose(losses[e], loss, rtol=1e-5)
    for e in range(E):
        tree_allclose(member(state, e), members[e], rtol=1e-5, atol=1e-6)
        tree_allclose(member(esvi.get_params(state), e), plain.get_params(members[e]), rtol=1e-5, atol=1e-6)
    evaluated = esvi.evaluate(state, x, y)
    assert evaluated.shape == (E,)
    for e in range(E):
        np.testing.assert_allclose(evaluated[e], plain.evaluate(members[e], x, y), rtol=1e-5)


@pytest.mark.parametrize("progress_bar", [False, True])
def test_run_member_is_plain_svi_run(progress_bar, regression_data):
    """Member e of run(key) is exactly SVI.run(keys[e]) on a new guide."""
    x, y = regression_data
    num_steps = 60
    esvi = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    result = esvi.run(random.key(7), num_steps, x, y, progress_bar=progress_bar)
    assert isinstance(result, SVIRunResult)
    assert result.losses.shape == (E, num_steps)
    for e, key in enumerate(esvi.member_keys(random.key(7))):
        plain = SVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO())
        ref = plain.run(key, num_steps, x, y, progress_bar=False)
        np.testing.assert_allclose(result.losses[e], ref.losses, rtol=1e-5, atol=1e-5)
        tree_allclose(member(result.params, e), ref.params, rtol=1e-5, atol=1e-6)


def test_progress_bar_does_not_change_results(regression_data):
    x, y = regression_data
    esvi = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    for num_steps in (7, 97):  # shorter than, divisible by and prime to the chunking
        on = esvi.run(random.key(1), num_steps, x, y, progress_bar=True)
        off = esvi.run(random.key(1), num_steps, x, y, progress_bar=False)
        assert on.losses.shape == (E, num_steps)
        tree_allclose(on, off, rtol=1e-6, atol=1e-6)


def test_init_state_resumes_exactly(regression_data):
    x, y = regression_data
    esvi = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    whole = esvi.run(random.key(2), 50, x, y, progress_bar=False)
    first = esvi.run(random.key(2), 20, x, y, progress_bar=False)
    second = esvi.run(random.key(99), 30, x, y, progress_bar=False, init_state=first.state)
    np.testing.assert_allclose(jnp.concatenate([first.losses, second.losses], axis=1), whole.losses, rtol=1e-6)
    tree_allclose(second.params, whole.params, rtol=1e-6, atol=1e-7)
    # A new object (e.g. in a new process) resumes the saved state too.
    other = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    again = other.run(random.key(5), 30, x, y, progress_bar=False, init_state=first.state)
    tree_allclose(again.params, whole.params, rtol=1e-6, atol=1e-7)


def test_second_run_does_not_retrace(regression_data):
    x, y = regression_data
    traces = []

    def model(x, y=None):
        traces.append(1)
        regression_model(x, y)

    esvi = EnsembleSVI(model, AutoNormal(model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    result = esvi.run(random.key(0), 40, x, y, progress_bar=True)
    before = len(traces)
    esvi.run(random.key(0), 40, x, y + 1.0, progress_bar=True, init_state=result.state)
    assert len(traces) == before, "the second run traced the model again"


def test_guide_stays_usable(regression_data):
    """init/run twice, two ensembles on one guide, then plain SVI on it: no tracer leaks."""
    x, y = regression_data
    guide = AutoNormal(regression_model)
    a = EnsembleSVI(regression_model, guide, optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    b = EnsembleSVI(regression_model, guide, optax.adam(0.02), Trace_ELBO(), ensemble_size=2 * E)
    for _ in range(2):
        a.init(random.key(0), x, y)
        a.run(random.key(0), 5, x, y, progress_bar=False)
        b.run(random.key(1), 5, x, y, progress_bar=True)
    plain = SVI(regression_model, guide, optax.adam(0.02), Trace_ELBO())
    plain.run(random.key(0), 5, x, y, progress_bar=False)
    jax.jit(a.update)(a.init(random.key(3), x, y), x, y)
    # A new ensemble on the guide that is already set up still gets distinct members.
    c = EnsembleSVI(regression_model, guide, optax.adam(0.02), Trace_ELBO(), ensemble_size=3)
    locs = c.run(random.key(4), 5, x, y, progress_bar=False).params["w_auto_loc"]
    assert len(np.unique(np.asarray(locs[:, 0]))) == 3


def test_init_params_shared_and_stacked(regression_data):
    x, y = regression_data
    esvi = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    shared = esvi.get_params(esvi.init(random.key(0), x, y, init_params={"w_auto_loc": jnp.array([1.0, -1.0])}))
    np.testing.assert_allclose(shared["w_auto_loc"], jnp.tile(jnp.array([1.0, -1.0]), (E, 1)), rtol=1e-6)
    assert jnp.any(shared["sigma_auto_loc"][1:] != shared["sigma_auto_loc"][0])  # others still differ
    per_member = jnp.arange(2 * E, dtype=jnp.float32).reshape(E, 2)
    stacked = esvi.get_params(esvi.init(random.key(0), x, y, init_params={"w_auto_loc": per_member}))
    np.testing.assert_allclose(stacked["w_auto_loc"], per_member)
    result = esvi.run(random.key(0), 3, x, y, progress_bar=False, init_params={"w_auto_scale": jnp.full((2,), 0.5)})
    assert result.params["w_auto_scale"].shape == (E, 2)


def test_stable_update_isolates_a_diverging_member():
    """Member 0 walks into a region where the log density is NaN; the others carry on."""

    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        # Pushes members away from 0, towards +-2; past x = 1 the density is NaN.
        numpyro.factor("wall", jnp.where(x > 1.0, jnp.nan, 2.0 * jnp.abs(x)))

    guide = AutoDelta(model)
    init = {"x_auto_loc": jnp.array([0.95, -2.5, -1.0, -0.5])}
    esvi = EnsembleSVI(model, guide, optax.sgd(0.05), Trace_ELBO(), ensemble_size=4)
    with pytest.warns(RuntimeWarning, match=r"members \[0\]"):
        result = esvi.run(random.key(0), 200, progress_bar=False, stable_update=True, init_params=init)
    losses = np.asarray(result.losses)
    assert np.isnan(losses[0]).any() and np.isfinite(losses[1:]).all()
    x = result.params["x_auto_loc"]
    # Its last state whose step was finite: just past the wall, not NaN.
    assert np.isfinite(x[0]) and 0.95 < float(x[0]) < 1.05
    # The three healthy members are bit-for-bit what they are without member 0.
    healthy = EnsembleSVI(model, guide, optax.sgd(0.05), Trace_ELBO(), ensemble_size=3)
    alone = healthy.run(random.key(0), 200, progress_bar=False, stable_update=True,
                        init_params={"x_auto_loc": init["x_auto_loc"][1:]})
    np.testing.assert_allclose(x[1:], alone.params["x_auto_loc"], rtol=1e-6)
    np.testing.assert_allclose(losses[1:], alone.losses, rtol=1e-6)
    assert set(result._fields) == {"params", "state", "losses"}


def test_minibatches_differ_per_member():
    """Each member draws its own subsample; each is the batch a plain SVI draws with its key."""
    x = jnp.arange(16.0)
    y = 2.0 * x
    guide = AutoDelta(subsample_model)
    esvi = EnsembleSVI(subsample_model, guide, optax.adam(0.01), Trace_ELBO(), ensemble_size=8)
    state = esvi.init(random.key(0), x, y, init_params={"w_auto_loc": jnp.array(1.0)})
    losses = esvi.evaluate(state, x, y)
    # Same params for all members, so different losses mean different batches.
    assert len(np.unique(np.asarray(losses))) > 4
    plain = SVI(subsample_model, guide, optax.adam(0.01), Trace_ELBO())
    plain.init(random.key(0), x, y)
    for e in range(8):
        np.testing.assert_allclose(plain.evaluate(member(state, e), x, y), losses[e], rtol=1e-6)


def test_mutable_state_num_particles_and_forward_mode(regression_data):
    x, y = regression_data

    def model(x, y=None):
        counter = mutable("counter", {"n": jnp.array(0.0)})
        counter["n"] = counter["n"] + 1.0
        regression_model(x, y)

    esvi = EnsembleSVI(model, AutoNormal(model), optax.adam(0.02), Trace_ELBO(), ensemble_size=E)
    result = esvi.run(random.key(0), 6, x, y, progress_bar=False)
    assert result.state.mutable_state["counter"]["n"].shape == (E,)
    np.testing.assert_allclose(result.state.mutable_state["counter"]["n"], 7.0)  # init + 6 steps
    fwd = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.02), Trace_ELBO(num_particles=3), ensemble_size=E)
    a = fwd.run(random.key(0), 6, x, y, progress_bar=False, forward_mode_differentiation=True)
    b = fwd.run(random.key(0), 6, x, y, progress_bar=False)
    tree_allclose(a.params, b.params, rtol=1e-4, atol=1e-5)


def test_custom_loop_with_jit_update_and_early_stopping(regression_data):
    """The lower layer: jit(update) in a Python loop, changing batches, optax schedule, early stop."""
    x, y = regression_data
    schedule = optax.warmup_cosine_decay_schedule(1e-3, 5e-2, 10, 400, 1e-3)
    esvi = EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(schedule), Trace_ELBO(), ensemble_size=E)
    state = esvi.init(random.key(0), x, y)
    update = jax.jit(esvi.update)
    best, patience, history = np.inf, 0, []
    for step in range(400):
        batch = slice(0, 8) if step % 2 else slice(4, 12)  # a different batch each step
        state, losses = update(state, x[batch], y[batch])
        history.append(losses)
        mean = float(jnp.mean(losses))
        best, patience = (mean, 0) if mean < best - 0.5 else (best, patience + 1)
        if patience >= 30:
            break
    assert 30 <= len(history) < 400
    assert jnp.stack(history).shape == (len(history), E)
    assert np.all(np.asarray(state.optim_state[0]) == len(history))


class TestErrors:
    def make(self, **kw):
        return EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.01), Trace_ELBO(), **kw)

    @pytest.mark.parametrize("bad", [0, -3])
    def test_ensemble_size_value(self, bad):
        with pytest.raises(ValueError, match="ensemble_size must be a positive int"):
            self.make(ensemble_size=bad)

    @pytest.mark.parametrize("bad", [2.0, "4", True, None])
    def test_ensemble_size_type(self, bad):
        with pytest.raises(TypeError, match="ensemble_size"):
            self.make(ensemble_size=bad)

    def test_ensemble_size_required(self):
        with pytest.raises(TypeError, match="ensemble_size"):
            EnsembleSVI(regression_model, AutoNormal(regression_model), optax.adam(0.01), Trace_ELBO())

    def test_optim_type(self):
        with pytest.raises(TypeError, match="optim must be a numpyro.optim optimizer"):
            EnsembleSVI(regression_model, AutoNormal(regression_model), "adam", Trace_ELBO(), ensemble_size=2)

    @pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (2.5, TypeError)])
    def test_num_steps(self, bad, exc, regression_data):
        with pytest.raises(exc, match="num_steps must be a positive int"):
            self.make(ensemble_size=2).run(random.key(0), bad, *regression_data)

    def test_init_params_unknown_name(self, regression_data):
        with pytest.raises(ValueError, match=r"unknown names \['w_loc'\].*w_auto_loc"):
            self.make(ensemble_size=2).init(random.key(0), *regression_data, init_params={"w_loc": jnp.zeros(2)})

    def test_init_params_wrong_leading_size(self, regression_data):
        with pytest.raises(ValueError, match=r"init_params\['w_auto_loc'\] has shape \(3, 2\).*\(2,\).*\(4, 2\)"):
            self.make(ensemble_size=4).init(random.key(0), *regression_data, init_params={"w_auto_loc": jnp.zeros((3, 2))})

    def test_init_state_from_other_ensemble_size(self, regression_data):
        state = self.make(ensemble_size=3).init(random.key(0), *regression_data)
        with pytest.raises(ValueError, match=r"init_state has leading axis sizes \[3\].*ensemble_size=5"):
            self.make(ensemble_size=5).run(random.key(0), 10, *regression_data, init_state=state)
        with pytest.raises(ValueError, match="svi_state.*ensemble_size=5"):
            self.make(ensemble_size=5).update(state, *regression_data)

    def test_update_before_init(self, regression_data):
        ens = self.make(ensemble_size=3)
        state = self.make(ensemble_size=3).init(random.key(0), *regression_data)
        with pytest.raises(RuntimeError, match="call init"):
            ens.update(state, *regression_data)
