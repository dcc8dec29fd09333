"""Argument checks shared by the public classes.

Every check raises before anything is traced or compiled, and its message names
the argument and what was expected.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings

import jax
import numpy as np

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def check_positive_int(value, name: str) -> int:
    """``ensemble_size``, ``num_steps``, ``num_samples``, ``num_chains``: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a positive int, got {value!r} of type {type(value).__name__}."
        )
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}.")
    return int(value)


def check_weight(value, name: str):
    """A tempering weight: a finite number >= 0 (a traced value is passed through)."""
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (str, bytes)) or (
        not isinstance(value, numbers.Real) and np.ndim(value) != 0
    ):
        raise TypeError(
            f"{name} must be a finite number >= 0, got {value!r} of type "
            f"{type(value).__name__}."
        )
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a finite number >= 0, got {value!r} of type "
            f"{type(value).__name__}."
        ) from None
    if not math.isfinite(as_float) or as_float < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {as_float}.")
    return as_float


def leading_sizes(tree) -> set:
    """The set of leading-axis sizes over the array leaves of ``tree`` (None for scalars)."""
    return {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside this package."""
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
