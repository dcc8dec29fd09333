r"""Early stopping of members inside the scanned ``run``.

The rule, per member, at every step :math:`t` with loss :math:`\ell_t` (the loss at
the params before the step's update, as ``SVI.update`` reports it):

.. math::

    m_t = \alpha\, m_{t-1} + (1 - \alpha)\, \ell_t \quad (m_0 = \ell_0), \qquad
    \text{improved if } m_t < m^{\text{best}} - \delta,

with :math:`\alpha` = ``smoothing`` (an exponential moving average: an ELBO
estimated from few particles is noisy, and a raw loss would stop a member at its
first unlucky draw) and :math:`\delta` = ``min_delta``. After ``patience`` steps in
a row without improvement the member stops: it keeps the state it has after that
step, so a member that stopped at step :math:`s` (``stopped_at[e] = s`` updates
applied) has exactly the state of a plain run of :math:`s` steps, and its losses
from step :math:`s` on repeat its last loss. The other members go on; ``run``
returns early, between scanned chunks, once every member has stopped. A
non-finite loss never counts as an improvement.

With ``grad_tol`` (for optimizers that keep the gradient, such as ``optax.lbfgs()``,
whose linesearch stores the gradient at the params it moved to), a member also
stops after a step that leaves the norm of its gradient (over all unconstrained
params) at most ``grad_tol``: it has converged to a stationary point.
"""

from __future__ import annotations

from functools import partial
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from numpyro_ensemble.engine.hyper import find_nodes

__all__ = ["EarlyStopping"]


class EarlyStopping(NamedTuple):
    """Stop a member once its smoothed loss has not improved by ``min_delta`` for
    ``patience`` steps, or (with ``grad_tol``) once its gradient norm is at most
    ``grad_tol`` (see :mod:`numpyro_ensemble.engine.stopping`). Pass it as
    ``run(..., early_stopping=EarlyStopping(patience=200))``."""

    patience: int | None = None
    """Steps without improvement before a member stops (>= 1); None: no loss rule."""
    min_delta: float = 0.0
    """The smallest decrease of the smoothed loss that counts as an improvement (>= 0)."""
    smoothing: float = 0.9
    """Weight :math:`\\alpha` of the past in the moving average of the loss, in [0, 1)."""
    grad_tol: float | None = None
    """Stop a member whose gradient norm is at most this (> 0), for optimizers that keep
    the gradient in their state (a linesearch: ``optax.lbfgs()``); None: no gradient rule."""

    def check(self) -> EarlyStopping:
        patience, grad_tol = self.patience, self.grad_tol
        if patience is None and grad_tol is None:
            raise ValueError("EarlyStopping needs patience=... (a loss rule), grad_tol=... or both.")
        if patience is not None and (
            isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 1
        ):
            raise ValueError(f"EarlyStopping.patience must be an int >= 1, got {patience!r}.")
        if not isinstance(self.min_delta, numbers.Real) or not 0 <= self.min_delta < float("inf"):
            raise ValueError(f"EarlyStopping.min_delta must be a finite number >= 0, got {self.min_delta!r}.")
        if not isinstance(self.smoothing, numbers.Real) or not 0 <= self.smoothing < 1:
            raise ValueError(f"EarlyStopping.smoothing must be in [0, 1), got {self.smoothing!r}.")
        if grad_tol is not None and (
            not isinstance(grad_tol, numbers.Real) or not 0 < grad_tol < float("inf")
        ):
            raise ValueError(f"EarlyStopping.grad_tol must be a finite number > 0, got {grad_tol!r}.")
        return EarlyStopping(
            None if patience is None else int(patience), float(self.min_delta),
            float(self.smoothing), None if grad_tol is None else float(grad_tol),
        )


def check_rule(rule, keeps_gradient: bool = False) -> EarlyStopping | None:
    """``run``'s ``early_stopping``: None or a checked :class:`EarlyStopping`
    (``grad_tol`` only where the optimizer ``keeps_gradient``)."""
    if rule is None:
        return None
    if not isinstance(rule, EarlyStopping):
        raise TypeError(
            f"early_stopping must be an EarlyStopping(patience=...), got {type(rule).__name__}."
        )
    rule = rule.check()
    if rule.grad_tol is not None and not keeps_gradient:
        raise ValueError(
            "EarlyStopping(grad_tol=...) needs an optimizer that keeps each member's gradient "
            "in its state: an optax linesearch such as optax.lbfgs()."
        )
    return rule


class StopState(NamedTuple):
    """Per-member arrays, each ``(E,)``, carried through the scan."""

    taken: jax.Array  # updates applied
    stopped: jax.Array
    smoothed: jax.Array
    best: jax.Array
    wait: jax.Array
    last_loss: jax.Array


def init(num_members: int, steps_taken=0) -> StopState:
    # The default float type: float64 under ``numpyro.enable_x64()``. ``apply`` casts
    # the losses to it, so the scan's carry keeps one type whatever the loss's dtype.
    real = jnp.result_type(float)
    return StopState(
        taken=jnp.full((num_members,), steps_taken, jnp.int32),
        stopped=jnp.zeros((num_members,), bool),
        smoothed=jnp.full((num_members,), jnp.nan, real),
        best=jnp.full((num_members,), jnp.inf, real),
        wait=jnp.zeros((num_members,), jnp.int32),
        last_loss=jnp.full((num_members,), jnp.nan, real),
    )


def _keep(stopped, old, new):
    """Per leaf with a leading member axis: ``old`` where the member has stopped."""
    def one(o, n):
        mask = jnp.reshape(stopped, stopped.shape + (1,) * (jnp.ndim(n) - 1))
        return jnp.where(mask, o, n)

    return jax.tree.map(one, old, new)


def apply(rule: EarlyStopping | None, stop: StopState, old_state, new_state, losses,
          grad_norms=None):
    """One step of the rule: stopped members keep ``old_state`` and report their last
    loss; the others take ``new_state``, and may stop after it (``grad_norms``: the
    members' gradient norms at ``new_state``, for ``grad_tol``)."""
    losses = losses.astype(stop.last_loss.dtype)
    if rule is None:
        return new_state, losses, stop._replace(taken=stop.taken + 1, last_loss=losses)
    state = _keep(stop.stopped, old_state, new_state)
    losses = jnp.where(stop.stopped, stop.last_loss, losses)
    running = ~stop.stopped
    first = jnp.isnan(stop.smoothed)
    smoothed = jnp.where(first, losses, rule.smoothing * stop.smoothed + (1 - rule.smoothing) * losses)
    improved = jnp.isfinite(smoothed) & (smoothed < stop.best - rule.min_delta)
    best = jnp.where(improved, smoothed, stop.best)
    wait = jnp.where(improved, 0, stop.wait + 1)
    stopped = stop.stopped
    if rule.patience is not None:
        stopped = stopped | (wait >= rule.patience)
    if rule.grad_tol is not None:
        stopped = stopped | (grad_norms <= rule.grad_tol)
    new = StopState(
        taken=stop.taken + running.astype(jnp.int32),
        stopped=stopped,
        smoothed=jnp.where(running, smoothed, stop.smoothed),
        best=jnp.where(running, best, stop.best),
        wait=jnp.where(running, wait, stop.wait),
        last_loss=losses,
    )
    return state, losses, new


def extra_fields(losses, stop: StopState, num_steps: int) -> dict:
    """``stopped_at``, ``diverged`` and ``final_loss`` per member after a run. On the
    host (NumPy) where the arrays are, so nothing is compiled per ``num_steps``; on
    several hosts, device arrays sharded like the members (nothing is fetched)."""
    arrays = (losses, stop.stopped, stop.taken)
    if not all(getattr(a, "is_fully_addressable", True) for a in arrays):
        return _extra_fields(losses, stop, num_steps)
    losses, stopped, taken = (np.asarray(a) for a in arrays)
    return {
        "stopped_at": jax.device_put(np.where(stopped, taken, num_steps)),
        "diverged": jax.device_put(~np.isfinite(losses).all(axis=1)),
        "final_loss": jax.device_put(losses[:, -1]),
    }


@partial(jax.jit, static_argnames="num_steps")
def _extra_fields(losses, stop: StopState, num_steps: int) -> dict:
    return {
        "stopped_at": jnp.where(stop.stopped, stop.taken, num_steps),
        "diverged": jnp.any(~jnp.isfinite(losses), axis=1),
        "final_loss": losses[:, -1],
    }


def format_fields(fields: dict) -> str:
    """The per-member table of :meth:`EnsembleSVI.print_summary`."""
    lines = [f"{'member':>8} {'final loss':>12} {'stopped at':>11} {'diverged':>9}"]
    for e in range(fields["final_loss"].shape[0]):
        lines.append(
            f"{e:>8} {float(fields['final_loss'][e]):>12.5g} {int(fields['stopped_at'][e]):>11} "
            f"{'yes' if fields['diverged'][e] else 'no':>9}"
        )
    return "\n".join(lines)


# The optax states that keep the value and gradient of a linesearch's last round.
LINESEARCH_STATES = (optax.ScaleByZoomLinesearchState, optax.ScaleByBacktrackingLinesearchState)


def linesearch_states(tree) -> list:
    """The linesearch states (:data:`LINESEARCH_STATES`) in an optimizer's state."""
    return find_nodes(tree, LINESEARCH_STATES)


def grad_norms(optim_state):
    """Per member, the norm of the gradient at the current params that the
    linesearch stored in its state (the value and gradient at the end of its last
    round); None when the optimizer keeps no gradient."""
    states = linesearch_states(optim_state)
    grads = [s.grad for s in states if s.grad is not None]
    if not grads:
        return None
    leaves = jax.tree.leaves(grads[-1])
    squares = [jnp.sum(jnp.reshape(g, (g.shape[0], -1)) ** 2, axis=1) for g in leaves]
    return jnp.sqrt(sum(squares))
