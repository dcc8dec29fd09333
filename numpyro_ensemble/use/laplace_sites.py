"""A Laplace approximation over some latent sites (``laplace_members(..., sites=[...])``,
e.g. a network's last layer): the other latent sites are held at each member's point.

The members' model is the ensemble's with every other latent site observed at a
value its param ``{site}_held`` gives (one per member, the member's point), so the
Laplace twin's guide covers only the chosen sites, and everything that runs the
model after the fit (draws, predictive, the linearized predictive, weights) takes
the held values from the members' params like any other param of the model. Held
sites are auxiliary (not resampled as data) and flagged :data:`~numpyro_ensemble.use.curvature.HELD`
(their densities count in the prior, not in the likelihood the GGN takes).
"""

from __future__ import annotations

import numpyro
from numpyro.primitives import Messenger

from numpyro_ensemble.use.curvature import HELD

__all__: list[str] = []

# The param holding a site at a member's point is named ``{site}{HELD_SUFFIX}``.
HELD_SUFFIX = "_held"


def check_sites(sites, latent) -> tuple[str, ...]:
    """``sites`` as a tuple of latent site names (``latent``, the model's in trace
    order), or ``()`` for all of them."""
    if sites is None:
        return ()
    if isinstance(sites, str) or not all(isinstance(name, str) for name in sites):
        raise TypeError(
            f"laplace_members: sites must be a list of latent site names, got {sites!r}."
        )
    sites = tuple(sites)
    unknown = [name for name in sites if name not in latent]
    if unknown or not sites:
        raise ValueError(
            f"laplace_members: sites must name latent sites of the model, got "
            f"{list(sites)}; its latent sites are {list(latent)}."
        )
    return () if set(sites) == set(latent) else tuple(name for name in latent if name in sites)


class _held(Messenger):
    """Observe the sites ``values`` names at those values, flagged as held."""

    def __init__(self, fn, values):
        self.values = values
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["is_observed"] = True
            msg["infer"] = {**msg.get("infer", {}), "is_auxiliary": True, HELD: True}


def held_model(model, held: tuple[str, ...], init: dict):
    """``model`` with the latent sites ``held`` observed at the params
    ``{site}_held`` (``init``: a valid value of each, for NumPyro's set-up)."""

    def model_with_held_sites(*args, **kwargs):
        values = {name: numpyro.param(name + HELD_SUFFIX, init[name]) for name in held}
        with _held(None, values):
            return model(*args, **kwargs)

    return model_with_held_sites
