"""Argument checks and masked reductions shared by the loss modules.

The reductions follow ``jax.numpy``'s: ``axis`` is an int, a tuple of ints or ``None`` (every
axis), an empty tuple reduces nothing, and ``where`` (a mask broadcastable to the reduced
tensor) leaves the masked elements out. They are written without host reads and so that
masked (or fully masked) positions get zero gradients, not NaN ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch

Axis = int | tuple[int, ...] | None
Scalar = float | torch.Tensor

_HALF = (torch.float16, torch.bfloat16)


def tensor(x: Any, name: str, fn: str) -> torch.Tensor:
    """``x`` as a tensor (as ``jnp.asarray`` would), or a ``TypeError`` naming it."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(x).__name__}") from err


def floating(x: Any, name: str, fn: str) -> torch.Tensor:
    """``x`` as a tensor, checked to be real floating-point (optax's ``check_subdtype``)."""
    x = tensor(x, name, fn)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {x.dtype}")
    return x


def integer(x: Any, name: str, fn: str) -> torch.Tensor:
    """``x`` as a tensor, checked to hold integers (not bool, not floating)."""
    x = tensor(x, name, fn)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} must be an integer tensor, got {x.dtype}")
    return x


def same_shape(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], fn: str) -> None:
    """optax's ``check_shapes_equal``, naming both arguments."""
    if a.shape != b.shape:
        raise ValueError(
            f"{fn}: {names[0]} shape {tuple(a.shape)} does not match "
            f"{names[1]} shape {tuple(b.shape)}"
        )


def broadcastable(
    x: torch.Tensor,
    shape: torch.Size,
    names: tuple[str, str],
    fn: str,
    given: torch.Size | None = None,
) -> None:
    """Checks that ``x`` broadcasts to ``shape`` (the shape of ``names[1]``) without growing it.

    ``given``: the shape the caller passed, when ``x`` is a reshaped version of it.
    """
    try:
        ok = torch.broadcast_shapes(x.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: {names[0]} shape {tuple(x.shape if given is None else given)} is not "
            f"broadcastable to {names[1]} shape {tuple(shape)}"
        )


def broadcast_together(
    a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], fn: str
) -> torch.Size:
    """The broadcast shape of ``a`` and ``b``, or a ``ValueError`` naming both."""
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: {names[0]} shape {tuple(a.shape)} does not broadcast with "
            f"{names[1]} shape {tuple(b.shape)}"
        ) from None


def rank(x: torch.Tensor, ndim: int, name: str, fn: str) -> None:
    """optax's ``check_rank``, naming the argument."""
    if x.ndim != ndim:
        raise ValueError(f"{fn}: {name} must have rank {ndim}, got shape {tuple(x.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses compute in: float16/bfloat16 are widened to float32 (then cast back)."""
    return torch.float32 if dtype in _HALF else dtype


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`compute_dtype` (a no-op for float32/float64)."""
    return x.to(compute_dtype(x.dtype)) if x.dtype in _HALF else x


def result_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The promoted dtype of the floating inputs (what optax's result has)."""
    floats = [x.dtype for x in xs if x.dtype.is_floating_point]
    out = floats[0]
    for d in floats[1:]:
        out = torch.promote_types(out, d)
    return out


def dims(axis: Any, ndim: int, fn: str, name: str = "axis") -> tuple[int, ...]:
    """``axis`` (int, tuple of ints or ``None``) as sorted non-negative dimensions."""
    if axis is None:
        return tuple(range(ndim))
    items = (axis,) if isinstance(axis, int) else axis
    if isinstance(axis, bool) or not isinstance(items, tuple | list):
        raise TypeError(f"{fn}: {name} must be an int, a tuple of ints or None, got {axis!r}")
    out = []
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(f"{fn}: {name} must be an int, a tuple of ints or None, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"{fn}: {name} {a} is out of bounds for a tensor of rank {ndim}")
        out.append(a % ndim if ndim else a)
    if len(set(out)) != len(out):
        raise ValueError(f"{fn}: {name} {axis!r} repeats a dimension")
    return tuple(sorted(out))


def mask(where: Any, fn: str) -> torch.Tensor | None:
    """``where`` as a bool tensor (non-zero is ``True``), or ``None``."""
    if where is None:
        return None
    where = tensor(where, "where", fn)
    return where if where.dtype == torch.bool else where != 0


def expand_where(where: torch.Tensor | None, axis: Axis, ndim: int) -> torch.Tensor | None:
    """optax's ``jnp.expand_dims(where, axis)`` when ``where`` has fewer dims than the logits."""
    if where is None or where.ndim == ndim or axis is None:
        return where
    # expand_dims inserts each axis of the *result*, in increasing order.
    out_ndim = where.ndim + (1 if isinstance(axis, int) else len(axis))
    for a in sorted(x % out_ndim for x in ((axis,) if isinstance(axis, int) else axis)):
        where = where.unsqueeze(a)
    return where


def masked_sum(
    x: torch.Tensor, d: tuple[int, ...], where: torch.Tensor | None, keepdim: bool = False
) -> torch.Tensor:
    """``jnp.sum(x, axis=d, where=where)``: masked elements count as 0; ``d=()`` keeps ``x``."""
    if where is not None:
        x = torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if not d:
        return x
    return x.sum(dim=d, keepdim=keepdim)


def _neg_inf(x: torch.Tensor) -> torch.Tensor:
    return torch.full((), -math.inf, dtype=x.dtype, device=x.device)


def log_softmax(x: torch.Tensor, d: tuple[int, ...], where: torch.Tensor | None) -> torch.Tensor:
    """``jax.nn.log_softmax(x, d, where)``: masked entries are ``-inf``, NaN-free gradients."""
    if not d:  # axis=(): each element is its own distribution (torch would reduce them all)
        out = x - x
        return out if where is None else torch.where(where, out, _neg_inf(x))
    if where is None:
        if len(d) == 1:
            return torch.log_softmax(x, d[0])
        return x - torch.logsumexp(x, d, keepdim=True)
    neg_inf = _neg_inf(x)
    xm = torch.where(where, x, neg_inf)
    peak = xm.detach().amax(dim=d, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = xm - peak
    total = masked_sum(torch.exp(shifted), d, where, keepdim=True)
    # A fully masked slice sums to 0: log(1) keeps its gradient finite; its entries are -inf.
    # (A slice whose kept logits are all -inf stays NaN, as jax's.)
    empty = ~torch.broadcast_to(where, xm.shape).any(d, keepdim=True)
    total = torch.where(empty, torch.ones_like(total), total)
    return torch.where(where, shifted - torch.log(total), neg_inf)


def logsumexp(
    x: torch.Tensor, d: tuple[int, ...], where: torch.Tensor | None, keepdim: bool = False
) -> torch.Tensor:
    """``jax.nn.logsumexp(x, d, where=where)``: ``-inf`` for a fully masked slice."""
    if not d:  # axis=(): nothing to reduce (torch.logsumexp would reduce every axis)
        return x if where is None else torch.where(where, x, _neg_inf(x))
    if where is None:
        return torch.logsumexp(x, d, keepdim=keepdim)
    neg_inf = _neg_inf(x)
    xm = torch.where(where, x, neg_inf)
    peak = xm.detach().amax(dim=d, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = masked_sum(torch.exp(xm - peak), d, where, keepdim=True)
    # A fully masked slice: log(1) keeps its gradient finite. (Kept logits all -inf give
    # log(0) = -inf, and the gradient jax's has.)
    empty = ~torch.broadcast_to(where, xm.shape).any(d, keepdim=True)
    safe = torch.where(empty, torch.ones_like(total), total)
    out = torch.where(empty, neg_inf, torch.log(safe) + peak)
    return out if keepdim else out.squeeze(d) if d else out


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the inputs' dtype, even under ``torch.autocast`` (which would round it to
    bfloat16/float16: losses compute in float32)."""
    device = a.device.type
    if not torch.amp.is_autocast_available(device):  # e.g. meta
        return a @ b
    with torch.autocast(device, enabled=False):
        return a @ b


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``jax.nn.one_hot``: a label outside ``[0, num_classes)`` gives a row of zeros.

    (``torch.nn.functional.one_hot`` raises on such labels, which needs a host read.)
    """
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.unsqueeze(-1) == classes).to(dtype)
