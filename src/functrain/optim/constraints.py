"""Constraints on parameters and gradients: ``keep_params_nonnegative``, ``centralize`` and ``apply_every`` (optax's names)."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import widen_all
from functrain.optim import _ops, _utils
from functrain.optim.base import EmptyState, GradientTransformation

__all__ = [
    "ApplyEvery",
    "NonNegativeParamsState",
    "apply_every",
    "centralize",
    "keep_params_nonnegative",
]

NonNegativeParamsState = EmptyState
"""State of :func:`keep_params_nonnegative` (optax's alias of ``EmptyState``)."""


def keep_params_nonnegative() -> GradientTransformation:
    """Changes the updates so that ``params + updates >= 0`` (put it last in a chain).

    Update rule: ``u ← −p where p + u < 0, else u``. A parameter that is already negative is
    moved to 0 as well. ``p + u`` is compared in the promoted dtype of the two.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.keep_params_nonnegative()
        >>> p = [torch.tensor([1.0, 1.0])]
        >>> tx.update([torch.tensor([-2.0, -0.5])], tx.init(p), p)[0]
        [tensor([-1.0000, -0.5000])]
    """

    def init_fn(params: Any) -> EmptyState:
        del params
        return NonNegativeParamsState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del extra
        if params is None:
            raise ValueError("keep_params_nonnegative needs params: call update(u, state, params)")
        u, spec, s = _utils.flat(updates, {"params": params})
        if not u:
            return updates, state
        p = s["params"]
        if any(x.is_complex() for x in (*p, *u)):
            # ``<`` has no meaning for complex numbers (torch's own error names no leaf).
            raise TypeError("keep_params_nonnegative does not support complex params or updates")
        below = [(t < 0) for t in _foreach.add(p, u)] if _same_dtypes(p, u) else None
        if below is None:  # mixed dtypes: foreach needs one dtype per pair
            below = [(a + b) < 0 for a, b in zip(p, u)]
        out = [torch.where(b, -a.to(x.dtype), x) for b, a, x in zip(below, p, u)]
        return tree.unflatten(spec, out), state

    return GradientTransformation(init_fn, update_fn)


def _same_dtypes(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return all(x.dtype == y.dtype for x, y in zip(xs, ys))


def centralize() -> GradientTransformation:
    """Gradient centralisation (Yong et al., 2020): subtracts each leaf's mean over all but its
    first dimension.

    Update rule for a leaf of 2 or more dimensions: ``u ← u − mean(u, dims 1..)``; vectors and
    scalars pass unchanged. float16/bfloat16 leaves are computed in float32 and rounded once.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.centralize()
        >>> g = [torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])]
        >>> tx.update(g, tx.init(g))[0]
        [tensor([[-1.,  0.,  1.],
                [-1.,  0.,  1.]])]
    """

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        u, spec, _ = _utils.flat(updates, {})
        if not any(x.dim() > 1 for x in u):
            return updates, state
        wide = widen_all(u)
        out = [
            (w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True)).to(x.dtype)
            if x.dim() > 1
            else x
            for x, w in zip(u, wide)
        ]
        return tree.unflatten(spec, out), state

    return GradientTransformation(init_fn, update_fn)


class ApplyEvery(NamedTuple):
    """State of :func:`apply_every`: the int32 ``count`` (modulo ``k``) and the gradient sum
    ``grad_acc`` of the current window.

    Example:
        >>> import torch, functrain as ft
        >>> ft.apply_every(2).init([torch.zeros(1)])
        ApplyEvery(count=tensor(0, dtype=torch.int32), grad_acc=[tensor([0.])])
    """

    count: torch.Tensor
    grad_acc: Any


def apply_every(k: int = 1) -> GradientTransformation:
    """Sums the updates over ``k`` steps and emits the sum every ``k``-th step (zeros between).

    Update rule, with ``c = count mod k``::

        acc ← g if c == 0 else acc + g
        u ← acc if c == k − 1 else 0

    As in optax the window is selected by multiplying with 0 or 1, so a NaN or an infinity in
    the sum stays in it (``0 · inf`` is NaN). Transforms earlier in a chain still update their
    state at every step, so this is not a larger batch; :class:`functrain.MultiSteps` (or
    ``make_train_step(micro_batches=k)``) is. ``torch.optim`` has no equivalent.

    Args:
        k: the window length, an ``int >= 1``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.apply_every(2)
        >>> state = tx.init([torch.zeros(1)])
        >>> u, state = tx.update([torch.ones(1)], state)
        >>> u, _ = tx.update([torch.ones(1)], state)
        >>> u
        [tensor([2.])]
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {k!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")

    def init_fn(params: Any) -> ApplyEvery:
        return ApplyEvery(count=_utils.zero_count(params), grad_acc=tree.zeros_like(params))

    def update_fn(
        updates: Any, state: ApplyEvery, params: Any = None, **extra: Any
    ) -> tuple[Any, ApplyEvery]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.grad_acc": state.grad_acc})
        c = torch.remainder(state.count, k)
        count = torch.remainder(_utils.safe_increment(state.count), k).to(state.count.dtype)
        if not g:
            return updates, ApplyEvery(count, state.grad_acc)
        acc = s["state.grad_acc"]
        dtype = _ops.scalar_dtype(g)
        keep = (c != 0).to(dtype)
        emit = (c == k - 1).to(dtype)
        # acc·keep + g, in each accumulator's dtype (the params'), as optax's keep·acc + g.
        summed = _ops.cast_like(
            _ops.add_scaled(_ops.mul(acc, keep), 1, _ops.cast_like(g, acc)), acc
        )
        out = _ops.cast_like(_ops.mul(summed, emit), g)
        return tree.unflatten(spec, out), ApplyEvery(count, tree.unflatten(spec, summed))

    return GradientTransformation(init_fn, update_fn)
