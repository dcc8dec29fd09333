"""Per-member copies of a guide.

An AutoGuide builds its prototype (the model's sites, their shapes, supports and
init locations) the first time it is called, and keeps it. Member ``e`` of an
ensemble must start where ``SVI.init(keys[e])`` on a *new* guide starts, so each
member's prototype is built on a fresh copy, inside the traced init, with that
member's key; the user's guide is built once, concretely, and never sees a tracer.
"""

from __future__ import annotations

import copy
import weakref

import jax
from jax import random
import jax.numpy as jnp
from numpyro.handlers import seed
from numpyro.infer.autoguide import (
    AutoContinuous,
    AutoGuide,
    AutoGuideList,
    _ravel_dict_with_shape_dict,
)

__all__ = []


def fresh_guide(guide):
    """A copy of ``guide`` that has not built its AutoGuide prototype yet."""
    if not isinstance(guide, AutoGuide):
        return guide  # a plain callable guide keeps no init state
    # Under jit a copy of a concrete array (e.g. a key kept by an earlier
    # prototype) would be staged into a tracer; copy it eagerly instead.
    with jax.ensure_compile_time_eval():
        fresh = copy.deepcopy(guide)
    reset_prototype(fresh)
    return fresh


_templates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def guide_template(guide):
    """One fresh copy of ``guide`` per guide object, from which every member's guide is
    copied (ensembles sharing a guide share it, so they trace the same programs)."""
    if not isinstance(guide, AutoGuide):
        return guide
    template = _templates.get(guide)
    if template is None:
        template = _templates[guide] = fresh_guide(guide)
    return template


def reset_prototype(guide):
    if isinstance(guide, AutoGuide):
        guide.prototype_trace = None
        for part in getattr(guide, "_guides", ()):  # AutoGuideList
            reset_prototype(part)


def with_init_locs(guide, source):
    """A shallow copy of the user's AutoGuide that takes its init locations from
    ``source``, a fresh copy whose prototype was built with one member's key.

    Only the locations move, by site name: the layout of the params (e.g. the
    order of sites in an AutoContinuous latent vector, which differs when the
    prototype is built under ``vmap``) stays that of the user's guide.
    """
    member = copy.copy(guide)
    locs = getattr(source, "_init_locs", None)
    if locs is not None and getattr(guide, "_init_locs", None) is not None:
        member._init_locs = {name: locs[name] for name in guide._init_locs}
        if isinstance(guide, AutoContinuous):
            shapes = {name: jnp.shape(value) for name, value in guide._init_locs.items()}
            member._init_latent = _ravel_dict_with_shape_dict(member._init_locs, shapes)
    if isinstance(guide, AutoGuideList):
        member._guides = [with_init_locs(g, s) for g, s in zip(guide._guides, source._guides, strict=False)]
    return member


def member_guide(guide, template, key, args, kwargs, static_kwargs):
    """The guide member ``e`` uses from ``SVI.init(key)``: the user's guide with the init
    locations a new guide would draw with ``key`` (traced)."""
    if not isinstance(guide, AutoGuide):
        return guide
    _, _, guide_seed = random.split(key, 3)  # the key SVI.init seeds the guide with
    fresh = fresh_guide(template)
    seed(fresh, guide_seed)(*args, **kwargs, **static_kwargs)
    return with_init_locs(guide, fresh)
