"""Transforms applied on a condition of the step count (optax's ``conditionally_mask``, ``conditionally_transform``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import (
    GradientTransformation,
    _accepts_extra,
    _call_update,
    _check_transform,
)

__all__ = [
    "ConditionallyMaskState",
    "ConditionallyTransformState",
    "conditionally_mask",
    "conditionally_transform",
]

ConditionFn = Callable[..., Any]


class ConditionallyTransformState(NamedTuple):
    """State of :func:`conditionally_transform`: the inner state and the int32 ``step`` count.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.conditionally_transform(ft.scale(2.0), lambda step: step > 0)
        >>> tx.init([torch.zeros(1)]).step
        tensor(0, dtype=torch.int32)
    """

    inner_state: Any
    step: torch.Tensor


class ConditionallyMaskState(NamedTuple):
    """State of :func:`conditionally_mask`: the int32 ``step`` count and the inner state.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.conditionally_mask(ft.scale(2.0), lambda step: step > 0)
        >>> tx.init([torch.zeros(1)]).step
        tensor(0, dtype=torch.int32)
    """

    step: torch.Tensor
    inner_state: Any


def _select(cond: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``cond`` else ``old``, leaf by leaf, in ``old``'s dtypes (tensors only:
    any other leaf is static and kept from ``old``)."""

    def pick(o: Any, n: Any) -> Any:
        if not isinstance(o, torch.Tensor):
            return o
        return torch.where(cond, n, o).to(o.dtype)

    return tree.map(pick, old, new)


def _device_condition(cond: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor condition as a 0-d boolean on ``device`` (a number is true where nonzero).

    A shaped condition is refused: ``torch.where`` would broadcast it and apply the inner
    transform to some elements and not others (optax's ``lax.cond`` refuses it too).
    """
    if cond.dim() != 0:
        raise ValueError(
            "should_transform_fn must return a bool or a 0-d tensor, got a tensor of shape "
            f"{tuple(cond.shape)}"
        )
    cond = cond.to(device)
    return cond if cond.dtype == torch.bool else cond != 0


def _conditional(
    inner: GradientTransformation,
    should_transform_fn: ConditionFn,
    forward_extra_args: bool,
    mask: bool,
) -> tuple[Callable[[Any], Any], Callable[..., tuple[Any, Any, torch.Tensor]]]:
    """The shared init and update of both wrappers; the update returns the new updates, the
    new inner state and the incremented step."""
    _check_transform(inner, "inner")
    if not callable(should_transform_fn):
        raise TypeError(f"should_transform_fn must be callable, got {should_transform_fn!r}")
    passes_extra = _accepts_extra(inner.update)

    def update(
        updates: Any, inner_state: Any, step: torch.Tensor, params: Any, extra: dict
    ) -> tuple[Any, Any, torch.Tensor]:
        cond = should_transform_fn(step, **(extra if forward_extra_args else {}))
        new_u, new_state = _call_update(inner, passes_extra, updates, inner_state, params, extra)
        rejected = tree.zeros_like(updates) if mask else updates
        if not isinstance(cond, torch.Tensor):  # a host condition: nothing to select on device
            # bool(), as optax's ``lax.cond`` takes any number (an int, a NumPy bool) as pred.
            chosen = (new_u, new_state) if bool(cond) else (rejected, inner_state)
            return (*chosen, _utils.safe_increment(step))
        cond = _device_condition(cond, step.device)
        # Both branches are computed and one is selected on the device: a Python ``if`` on the
        # condition would read it on the host (and break a compiled graph).
        out = tree.map(
            lambda r, n: torch.where(cond, n, r).to(n.dtype) if n is not None else None,
            rejected,
            new_u,
        )
        return out, _select(cond, new_state, inner_state), _utils.safe_increment(step)

    return inner.init, update


def conditionally_transform(
    inner: GradientTransformation,
    should_transform_fn: ConditionFn,
    forward_extra_args: bool = False,
) -> GradientTransformation:
    """Runs ``inner`` only on the steps where ``should_transform_fn(step)`` is true; on the
    others the updates and the inner state pass through unchanged.

    ``step`` is the number of earlier calls to ``update`` (an int32 0-d tensor, from 0). The
    condition may return a Python bool or number, or a 0-d tensor (true where nonzero). A
    tensor condition is applied on the device: the inner update runs at every step and
    ``torch.where`` keeps either its results or the unchanged updates and state, leaf by leaf,
    so there is no host read and a compiled step has one graph. The cost is the inner
    update's at every step; a non-finite value computed on a rejected step is discarded, not
    propagated. The inner state must keep
    its structure and dtypes from step to step (as every transform's does).

    Args:
        inner: the transform to run conditionally.
        should_transform_fn: ``step -> bool`` (with ``**extra`` if ``forward_extra_args``).
        forward_extra_args: pass ``update``'s keyword arguments to ``should_transform_fn``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.conditionally_transform(ft.scale(2.0), lambda step: step % 2 == 1)
        >>> state = tx.init([torch.zeros(1)])
        >>> u, state = tx.update([torch.ones(1)], state)
        >>> v, state = tx.update([torch.ones(1)], state)
        >>> u, v
        ([tensor([1.])], [tensor([2.])])
    """
    init_inner, update = _conditional(inner, should_transform_fn, forward_extra_args, False)

    def init_fn(params: Any) -> ConditionallyTransformState:
        return ConditionallyTransformState(init_inner(params), _utils.zero_count(params))

    def update_fn(
        updates: Any, state: ConditionallyTransformState, params: Any = None, **extra: Any
    ) -> tuple[Any, ConditionallyTransformState]:
        out, inner_state, step = update(updates, state.inner_state, state.step, params, extra)
        return out, ConditionallyTransformState(inner_state, step)

    return GradientTransformation(init_fn, update_fn)


def conditionally_mask(
    inner: GradientTransformation,
    should_transform_fn: ConditionFn,
    forward_extra_args: bool = False,
) -> GradientTransformation:
    """Runs ``inner`` only on the steps where ``should_transform_fn(step)`` is true; on the
    others the updates are zeros and the inner state passes through unchanged.

    The condition is handled as in :func:`conditionally_transform` (evaluated and selected on
    the device for a tensor condition, so the inner update runs at every step).

    Args:
        inner: the transform to run conditionally.
        should_transform_fn: ``step -> bool`` (with ``**extra`` if ``forward_extra_args``).
        forward_extra_args: pass ``update``'s keyword arguments to ``should_transform_fn``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.conditionally_mask(ft.scale(2.0), lambda step: step >= 1)
        >>> state = tx.init([torch.zeros(1)])
        >>> u, state = tx.update([torch.ones(1)], state)
        >>> v, state = tx.update([torch.ones(1)], state)
        >>> u, v
        ([tensor([0.])], [tensor([2.])])
    """
    init_inner, update = _conditional(inner, should_transform_fn, forward_extra_args, True)

    def init_fn(params: Any) -> ConditionallyMaskState:
        return ConditionallyMaskState(_utils.zero_count(params), init_inner(params))

    def update_fn(
        updates: Any, state: ConditionallyMaskState, params: Any = None, **extra: Any
    ) -> tuple[Any, ConditionallyMaskState]:
        out, inner_state, step = update(updates, state.inner_state, state.step, params, extra)
        return out, ConditionallyMaskState(step, inner_state)

    return GradientTransformation(init_fn, update_fn)
