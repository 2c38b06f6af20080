"""Accumulating transforms: momentum (``trace``) and exponential moving averages (``ema``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops, _utils, fused
from functrain.optim.base import GradientTransformation

__all__ = [
    "EmaState",
    "TraceState",
    "ema",
    "trace",
]


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffer ``trace``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.trace(0.9).init({"w": torch.ones(2)})
        TraceState(trace={'w': tensor([0., 0.])})
    """

    trace: Any


def trace(
    decay: float | torch.Tensor,
    nesterov: bool = False,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Momentum: keeps ``t ← decay · t + u`` and returns ``t`` (or ``u + decay · t``, Nesterov).

    Matches ``torch.optim.SGD(momentum=decay, dampening=0)``: its first buffer is the gradient
    itself, which is what a zero-initialised trace gives here.

    Differences from optax: the result keeps the updates' dtype and is computed in it. With an
    ``accumulator_dtype`` wider than the updates (a float64 trace of float32 gradients) optax
    computes in, and returns, the wider dtype; functrain rounds the stored trace to the updates'
    dtype first, so a wider accumulator only stores, it does not add precision.

    Args:
        decay: the momentum coefficient (a number or a 0-d tensor).
        nesterov: return ``u + decay · t`` instead of ``t``.
        accumulator_dtype: optional dtype in which the trace is stored.

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
        new_trace = _ops.add_scaled(g, decay, _ops.cast_like(other["state.trace"], g))
        out = _ops.add_scaled(g, decay, new_trace) if nesterov else new_trace
        new_trace = _ops.cast(new_trace, accumulator_dtype)
        return tree.unflatten(spec, out), TraceState(trace=tree.unflatten(spec, new_trace))

    fusion = fused.Trace(decay, nesterov, accumulator_dtype)
    return fused.register(GradientTransformation(init_fn, update_fn), fusion)


class EmaState(NamedTuple):
    """State of :func:`ema`: the int32 step ``count`` and the moving average ``ema``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.ema(0.9).init([torch.ones(1)])
        EmaState(count=tensor(0, dtype=torch.int32), ema=[tensor([0.])])
    """

    count: torch.Tensor
    ema: Any


def ema(
    decay: float | torch.Tensor,
    debias: bool = True,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Exponential moving average of the updates: ``e ← decay · e + (1 − decay) · u``.

    Returns ``e`` (or ``e / (1 − decayᵗ)`` with ``debias=True``, ``t`` the step count after
    increment). Compare :func:`trace`, which does not weight the new update by ``1 − decay``.

    Differences from optax: the result keeps the updates' dtype; with an ``accumulator_dtype``
    wider than the updates optax returns the wider dtype (see :func:`trace`).

    Args:
        decay: the averaging coefficient in ``[0, 1]``.
        debias: divide by ``1 − decayᵗ`` so early averages are not biased towards zero.
        accumulator_dtype: optional dtype in which the average is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.ema(0.5, debias=False)
        >>> state = tx.init([torch.zeros(1)])
        >>> _, state = tx.update([torch.ones(1)], state)
        >>> tx.update([torch.ones(1)], state)[0]
        [tensor([0.7500])]
    """
    _ops.check_decay("decay", decay, allow_one=True)

    def init_fn(params: Any) -> EmaState:
        return EmaState(
            count=_utils.zero_count(params), ema=tree.zeros_like(params, dtype=accumulator_dtype)
        )

    def update_fn(
        updates: Any, state: EmaState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmaState]:
        del params, extra
        g, spec, other = _utils.flat(updates, {"state.ema": state.ema})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, EmaState(count, state.ema)
        new_ema = _ops.moment(g, other["state.ema"], decay)
        out = new_ema
        if debias:
            bias = 1 - _utils.power(decay, count, _ops.scalar_dtype(g))
            out = _ops.div(new_ema, bias)
        new_ema = _ops.cast(new_ema, accumulator_dtype)
        return tree.unflatten(spec, out), EmaState(count, tree.unflatten(spec, new_ema))

    return GradientTransformation(init_fn, update_fn)
