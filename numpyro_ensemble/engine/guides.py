"""Per-member copies of a guide.

An AutoGuide builds its prototype (the model's sites, their shapes, supports and
init locations) the first time it is called, and keeps it. Member ``e`` of an
ensemble must start where ``SVI.init(keys[e])`` on a *new* guide starts, so each
member's prototype is built on a fresh copy, inside the traced init, with that
member's key; the user's guide is built once, concretely, and never sees a tracer.
"""

from __future__ import annotations

import copy
import functools
import weakref

import jax
from jax import random
import jax.numpy as jnp
import numpy as np
from numpyro.handlers import seed
from numpyro.infer.autoguide import (
    AutoContinuous,
    AutoGuide,
    AutoGuideList,
    UnpackTransform,
    _ravel_dict_with_shape_dict,
    _unravel_dict,
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


# What NumPyro's AutoGuide._setup_prototype sets, from the model alone ...
_PROTOTYPE = (
    "prototype_trace",
    "_potential_fn_gen",
    "_potential_fn",
    "_postprocess_fn",
    "_init_locs",
    "_prototype_frames",
    "_prototype_plate_sizes",
    "_prototype_frame_full_sizes",
)
# ... and what AutoContinuous._setup_prototype adds: the latent vector's layout.
_LATENT_LAYOUT = ("_init_latent", "_unpack_latent", "latent_dim")


def share_prototype(continuous, guide) -> bool:
    """Give ``continuous`` (an AutoContinuous guide of the same model, not set up) the
    prototype ``guide`` (an AutoGuide) built, instead of building its own op by op;
    the latent vector's layout is ``guide``'s where it has one, else its sites in
    prototype order. Returns whether it could: not when ``guide`` has no prototype or
    is an AutoGuideList, nor where the model has local latent sites (AutoContinuous
    refuses those; building its own prototype then says so)."""
    if isinstance(guide, AutoGuideList) or getattr(guide, "prototype_trace", None) is None:
        return False
    if any(getattr(guide, name, None) is None for name in _PROTOTYPE):
        return False
    for site in guide.prototype_trace.values():
        if site["type"] == "sample" and not site["is_observed"]:
            for frame in site["cond_indep_stack"]:
                if frame.size != guide._prototype_frame_full_sizes.get(frame.name, frame.size):
                    return False
    for name in _PROTOTYPE:
        setattr(continuous, name, getattr(guide, name))
    if all(getattr(guide, name, None) is not None for name in _LATENT_LAYOUT):
        for name in _LATENT_LAYOUT:
            setattr(continuous, name, getattr(guide, name))
        return True
    # AutoContinuous's own layout, on the host (NumPy: nothing to compile)
    locs = {name: np.asarray(value) for name, value in guide._init_locs.items()}
    shapes = {name: value.shape for name, value in locs.items()}
    continuous._init_latent = np.concatenate([value.ravel() for value in locs.values()])
    continuous._unpack_latent = UnpackTransform(
        functools.partial(_unravel_dict, shape_dict=shapes), _ravel_dict_with_shape_dict
    )
    continuous.latent_dim = continuous._init_latent.size
    return True
