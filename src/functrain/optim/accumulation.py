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

    The trace keeps the dtype it was initialised with (the params' or ``accumulator_dtype``):
    each leaf is computed in the wider of its update's and its trace's dtypes, so a float32
    trace of bfloat16 gradients (or a float64 ``accumulator_dtype`` of float32 ones) keeps its
    precision, and the result is rounded once to the updates' dtype.

    Differences from optax: the result keeps the updates' dtype; where the trace is wider than
    the updates (an ``accumulator_dtype`` of float64, bfloat16 gradients of float32 params)
    optax returns the wider dtype.

    Args:
        decay: the momentum coefficient (a number or a 0-d tensor).
        nesterov: return ``u + decay · t`` instead of ``t``.
        accumulator_dtype: optional floating dtype in which the trace is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.trace(decay=0.9)
        >>> state = tx.init([torch.zeros(1)])
        >>> _, state = tx.update([torch.ones(1)], state)
        >>> tx.update([torch.ones(1)], state)[0]
        [tensor([1.9000])]
    """
    _ops.refuse_schedule("decay", decay)
    _utils.check_finite_number("decay", decay, minimum=0.0)  # torch.optim.SGD refuses it too
    _ops.check_scalar_tensor("decay", decay)
    _ops.check_dtype("accumulator_dtype", accumulator_dtype)

    def init_fn(params: Any) -> TraceState:
        return TraceState(trace=tree.zeros_like(params, dtype=accumulator_dtype))

    def update_fn(
        updates: Any, state: TraceState, params: Any = None, **extra: Any
    ) -> tuple[Any, TraceState]:
        del params, extra
        g, spec, other = _utils.flat(updates, {"state.trace": state.trace})
        if not g:
            return updates, state
        out, new_trace = _trace_step(g, other["state.trace"], decay, nesterov)
        # Without Nesterov the update is the trace itself: return a copy (see _ops.unshared).
        out = _ops.unshared(out, new_trace)
        return tree.unflatten(spec, out), TraceState(trace=tree.unflatten(spec, new_trace))

    fusion = fused.Trace(decay, nesterov, accumulator_dtype)
    return fused.register(GradientTransformation(init_fn, update_fn), fusion)


def _operands(g: list[torch.Tensor], state: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each update leaf in the wider of its own and its state leaf's dtype (``g`` itself in
    the common case of one dtype), so that a wide state is not rounded to narrow updates."""
    if all(x.dtype == s.dtype for x, s in zip(g, state)):
        return g
    return [x.to(torch.promote_types(x.dtype, s.dtype)) for x, s in zip(g, state)]


def _trace_step(
    g: list[torch.Tensor], t: list[torch.Tensor], decay: Any, nesterov: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One :func:`trace` step on leaf lists: ``(updates, new trace)``.

    The updates come back in ``g``'s dtypes and the trace in ``t``'s (its init dtypes); the
    arithmetic is in the wider of the two per leaf. With one dtype throughout this is exactly
    ``g + decay·t`` in that dtype, the in-place engines' arithmetic.
    """
    wide = _operands(g, t)
    new_trace = _ops.add_scaled(wide, decay, _ops.cast_like(t, wide))
    out = _ops.add_scaled(wide, decay, new_trace) if nesterov else new_trace
    return _ops.cast_like(out, g), _ops.cast_like(new_trace, t)


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

    As :func:`trace`, the average keeps the dtype it was initialised with and is computed in
    the wider of that and the updates' dtype; the result has the updates' dtype.

    Differences from optax: the result keeps the updates' dtype; with an ``accumulator_dtype``
    wider than the updates optax returns the wider dtype (see :func:`trace`).

    Args:
        decay: the averaging coefficient in ``[0, 1]``.
        debias: divide by ``1 − decayᵗ`` so early averages are not biased towards zero.
        accumulator_dtype: optional floating dtype in which the average is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.ema(0.5, debias=False)
        >>> state = tx.init([torch.zeros(1)])
        >>> _, state = tx.update([torch.ones(1)], state)
        >>> tx.update([torch.ones(1)], state)[0]
        [tensor([0.7500])]
    """
    _ops.check_decay("decay", decay, allow_one=True)
    _ops.check_dtype("accumulator_dtype", accumulator_dtype)

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
        old = other["state.ema"]
        wide = _operands(g, old)
        new_ema = _ops.moment(wide, old, decay)
        out = new_ema
        if debias:
            bias = 1 - _utils.power(decay, count, _ops.scalar_dtype(g))
            out = _ops.div(new_ema, bias)
        # One rounding to the updates' dtype; the average keeps its init dtype.
        out, new_ema = _ops.cast_like(out, g), _ops.cast_like(new_ema, old)
        out = _ops.unshared(out, new_ema)  # debias=False: the update is the average itself
        return tree.unflatten(spec, out), EmaState(count, tree.unflatten(spec, new_ema))

    return GradientTransformation(init_fn, update_fn)
