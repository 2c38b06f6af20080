"""Scaling transforms: fixed scales, learning rates, schedules, momentum and weight decay."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import EmptyState, GradientTransformation

__all__ = [
    "ScaleByScheduleState",
    "TraceState",
    "add_decayed_weights",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "trace",
]


def _scale_leaves(leaves: list[Any], factor: Any) -> list[Any]:
    present = [i for i, x in enumerate(leaves) if x is not None]
    out = list(leaves)
    if not present:
        return out
    scaled = torch._foreach_mul([leaves[i] for i in present], factor)
    for i, s in zip(present, scaled):
        out[i] = s
    return out


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiplies updates by a fixed ``step_size``.

    Update rule: ``u ← step_size · u``.

    Args:
        step_size: a number or a 0-d tensor (a tensor may be changed in place between steps).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale(-0.1)
        >>> tx.update({"w": torch.ones(2)}, tx.init(None))[0]
        {'w': tensor([-0.1000, -0.1000])}
    """
    _utils.check_finite_number("step_size", step_size)

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        leaves, spec = tree.flatten(updates)
        return tree.unflatten(spec, _scale_leaves(leaves, step_size)), state

    return GradientTransformation(init_fn, update_fn)


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the int32 step ``count``."""

    count: torch.Tensor


def scale_by_schedule(step_size_fn: Any) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``, then increments ``count``.

    The schedule is evaluated at the count *before* the increment, so the first update uses
    ``step_size_fn(0)``, as in optax.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_schedule(lambda n: 1.0 / (n + 1))
        >>> state = tx.init(None)
        >>> u, state = tx.update([torch.ones(1)], state)
        >>> u, state = tx.update([torch.ones(1)], state)
        >>> u
        [tensor([0.5000])]
    """
    if not callable(step_size_fn):
        raise TypeError(f"step_size_fn must be callable, got {step_size_fn!r}")

    def init_fn(params: Any) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=_utils.zero_count(params))

    def update_fn(
        updates: Any, state: ScaleByScheduleState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByScheduleState]:
        del params, extra
        factor = step_size_fn(state.count)
        leaves, spec = tree.flatten(updates)
        new = tree.unflatten(spec, _scale_leaves(leaves, factor))
        return new, ScaleByScheduleState(count=_utils.safe_increment(state.count))

    return GradientTransformation(init_fn, update_fn)


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule, *, flip_sign: bool = True
) -> GradientTransformation:
    """Scales updates by ``-learning_rate`` (descent), a number, tensor or schedule.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_learning_rate(0.5)
        >>> tx.update([torch.ones(1)], tx.init(None))[0]
        [tensor([-0.5000])]
    """
    _utils.check_finite_number("learning_rate", learning_rate)
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    if isinstance(learning_rate, torch.Tensor):
        # Negate at update time so that a learning-rate tensor changed in place takes effect.
        return _scale_by_thunk(lambda: sign * learning_rate)
    return scale(sign * learning_rate)


def _scale_by_thunk(factor_fn: Any) -> GradientTransformation:
    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        leaves, spec = tree.flatten(updates)
        return tree.unflatten(spec, _scale_leaves(leaves, factor_fn())), state

    return GradientTransformation(init_fn, update_fn)


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer ``trace``."""

    trace: Any


def trace(
    decay: float | torch.Tensor,
    nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Momentum: keeps ``t ← decay · t + u`` and returns ``t`` (or ``u + decay · t``, Nesterov).

    Matches ``torch.optim.SGD(momentum=decay, dampening=0)``: its first buffer is the gradient
    itself, which is what a zero-initialised trace gives here.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.trace(decay=0.9)
        >>> state = tx.init([torch.zeros(1)])
        >>> _, state = tx.update([torch.ones(1)], state)
        >>> tx.update([torch.ones(1)], state)[0]
        [tensor([1.9000])]
    """
    _utils.check_finite_number("decay", decay)

    def init_fn(params: Any) -> TraceState:
        return TraceState(trace=tree.zeros_like(params, dtype=accumulator_dtype))

    def update_fn(
        updates: Any, state: TraceState, params: Any = None, **extra: Any
    ) -> tuple[Any, TraceState]:
        del params, extra
        g, spec, other = _utils.flat(updates, {"state.trace": state.trace})
        if not g:
            return updates, state
        new_trace = torch._foreach_add(g, torch._foreach_mul(other["state.trace"], decay))
        out = torch._foreach_add(g, new_trace, alpha=decay) if nesterov else new_trace
        if accumulator_dtype is not None:
            new_trace = [t.to(accumulator_dtype) for t in new_trace]
        out = [o.to(u.dtype) for o, u in zip(out, g)]
        return tree.unflatten(spec, out), TraceState(trace=tree.unflatten(spec, new_trace))

    return GradientTransformation(init_fn, update_fn)


def add_decayed_weights(
    weight_decay: float | torch.Tensor = 0.0, mask: Any = None
) -> GradientTransformation:
    """Adds ``weight_decay · params`` to the updates (decoupled weight decay, as in AdamW).

    Args:
        weight_decay: the coefficient (number or 0-d tensor).
        mask: optional pytree of booleans like ``params`` (or a callable ``params -> mask``);
            decay applies where it is ``True``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.add_decayed_weights(0.1)
        >>> params = [torch.tensor([2.0])]
        >>> tx.update([torch.zeros(1)], tx.init(params), params)[0]
        [tensor([0.2000])]
    """
    _utils.check_finite_number("weight_decay", weight_decay)

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del extra
        if params is None:
            raise ValueError(
                "add_decayed_weights needs params: call update(updates, state, params)"
            )
        g, spec, other = _utils.flat(updates, {"params": params})
        p = other["params"]
        idx = [i for i, (u, w) in enumerate(zip(g, p)) if u is not None and w is not None]
        out = list(g)
        if idx:
            summed = torch._foreach_add(
                [g[i] for i in idx], [p[i].to(g[i].dtype) for i in idx], alpha=weight_decay
            )
            for i, s in zip(idx, summed):
                out[i] = s
        return tree.unflatten(spec, out), state

    tx = GradientTransformation(init_fn, update_fn)
    if mask is not None:
        from functrain.optim.wrappers import masked

        return masked(tx, mask)
    return tx
