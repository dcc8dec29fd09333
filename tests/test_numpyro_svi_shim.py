"""NumPyro's own SVI tests, run with ``SVI`` replaced by a one-member ``EnsembleSVI``.

The drop-in promise, tested by NumPyro's test suite: ``OneMemberSVI`` is an
``EnsembleSVI`` with ``ensemble_size=1`` whose public methods take and return
member 0 without the member axis, so NumPyro's tests (tests/numpyro_upstream_svi.py,
copied verbatim) run unchanged against the ensemble's init / update / run.
"""

import importlib.util
import pathlib

import jax
from numpyro.infer.svi import SVIRunResult

from numpyro_ensemble import EnsembleSVI, take_member


def _one(tree):
    return jax.tree.map(lambda leaf: leaf[None], tree)


class OneMemberSVI(EnsembleSVI):
    def __init__(self, model, guide, optim, loss, **static_kwargs):
        super().__init__(model, guide, optim, loss, ensemble_size=1, **static_kwargs)

    def init(self, rng_key, *args, init_params=None, **kwargs):
        return take_member(super().init(rng_key, *args, init_params=init_params, **kwargs), 0)

    def get_params(self, svi_state):
        return take_member(super().get_params(_one(svi_state)), 0)

    def update(self, svi_state, *args, **kwargs):
        state, losses = super().update(_one(svi_state), *args, **kwargs)
        return take_member(state, 0), losses[0]

    def stable_update(self, svi_state, *args, **kwargs):
        state, losses = super().stable_update(_one(svi_state), *args, **kwargs)
        return take_member(state, 0), losses[0]

    def evaluate(self, svi_state, *args, **kwargs):
        return super().evaluate(_one(svi_state), *args, **kwargs)[0]

    def run(self, rng_key, num_steps, *args, init_state=None, init_params=None,
            progress_bar=True, stable_update=False, forward_mode_differentiation=False,
            **kwargs):
        if init_state is None:  # run() of the ensemble, whose init keeps the member axis
            init_state = EnsembleSVI.init(self, rng_key, *args, init_params=init_params, **kwargs)
        else:
            init_state = _one(init_state)
        result = super().run(
            rng_key, num_steps, *args, init_state=init_state, progress_bar=progress_bar,
            stable_update=stable_update,
            forward_mode_differentiation=forward_mode_differentiation, **kwargs,
        )
        return SVIRunResult(
            take_member(result.params, 0), take_member(result.state, 0), result.losses[0]
        )


_spec = importlib.util.spec_from_file_location(
    "numpyro_upstream_svi", pathlib.Path(__file__).with_name("numpyro_upstream_svi.py")
)
_upstream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_upstream)
_upstream.SVI = OneMemberSVI

globals().update({name: getattr(_upstream, name) for name in dir(_upstream) if name.startswith("test_")})
