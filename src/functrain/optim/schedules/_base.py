"""The ``Schedule`` protocol and the count, dtype and argument checks every schedule shares.

A Python count gives a Python ``float``; a tensor count gives a floating tensor on its device
(:func:`_finish`), so the schedule modules only write the formula once for both cases.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any, Protocol

import torch

__all__ = ["Schedule"]

# The public module's name, not this file's: users and tests filter on it, as before the split.
_log = logging.getLogger("functrain.optim.schedules")

Count = int | float | torch.Tensor
Value = float | torch.Tensor


class Schedule(Protocol):
    """A learning-rate (or any hyperparameter) schedule: ``schedule(count) -> value``.

    ``count`` is the number of updates done so far (``0`` at the first update), a Python number
    or a tensor; with a tensor count the value is a tensor on its device and computed without
    Python branches, so a compiled step does not recompile as the count advances. Any such
    callable works where functrain takes a schedule.

    An integer tensor count gives values in torch's default dtype: float32, as optax gives
    in JAX's default mode. For float64 training, ``torch.set_default_dtype(torch.float64)``
    (JAX's x64 mode) makes them float64; otherwise ``0.1`` scales float64 parameters as
    ``0.10000000149``, a relative ``1.5e-8`` from ``torch.optim``'s Python-float rate.

    Difference from optax: ``optax.Schedule`` is a ``Callable[[Numeric], Numeric]`` alias; this
    is a ``typing.Protocol`` with the same call, so annotations written with either read alike.

    Example:
        >>> import torch, functrain as ft
        >>> schedule: ft.Schedule = ft.linear_schedule(1.0, 0.0, transition_steps=4)
        >>> schedule(1), schedule(torch.tensor(2))
        (0.75, tensor(0.5000))
    """

    def __call__(self, count: Count) -> Value: ...


def _check_count(count: Any) -> bool:
    """Validates ``count``; returns whether it is a tensor."""
    if isinstance(count, torch.Tensor):
        if count.dtype == torch.bool or count.is_complex():
            raise TypeError(
                f"a schedule's count must be an integer or real tensor, got {count.dtype}"
            )
        return True
    if isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise TypeError(f"a schedule's count must be an int or a tensor, got {count!r}")
    return False


def _wide(count: torch.Tensor, *steps: float) -> torch.Tensor:
    """An integer count as int64, so steps and boundaries beyond its own dtype compare right.

    torch wraps a Python int that does not fit an integer tensor's dtype instead of raising:
    ``torch.tensor(5, dtype=torch.int32) < 2**31`` is ``False`` and a ``uint8`` count compares
    with a boundary of 300 as with 44 (and ``5 - 10`` is 251). An int32 count (the counters'
    dtype) is kept when every one of ``steps`` fits int32, which saves a cast per call.
    """
    if count.is_floating_point() or count.dtype == torch.int64:
        return count
    if count.dtype == torch.int32 and all(-(2**31) <= s < 2**31 for s in steps):
        return count
    return count.to(torch.int64)


def _float_dtype(count: torch.Tensor) -> torch.dtype:
    return count.dtype if count.is_floating_point() else torch.get_default_dtype()


def _finish(count: Count, out: Any) -> Value:
    """Returns a Python float for a Python count and a floating tensor for a tensor count."""
    if isinstance(count, torch.Tensor):
        if isinstance(out, torch.Tensor):
            return out if out.is_floating_point() else out.to(_float_dtype(count))
        return torch.full(count.shape, out, dtype=_float_dtype(count), device=count.device)
    if isinstance(out, numbers.Real) and not isinstance(out, torch.Tensor):
        return float(out)
    return out


def _check_int(name: str, value: Any) -> None:
    # Steps are ints in optax's signatures, but JAX code often writes them as 1e4: accept numbers.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not math.isfinite(value):
        # nan slipped past every ``<= 0`` check and made each value nan; inf gave nan too.
        raise ValueError(f"{name} must be a finite int, got {value!r}")


def _sorted_boundaries(
    name: str, boundaries_and_scales: Mapping[int, float] | None
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if not boundaries_and_scales:
        return (), ()
    for boundary, scale in boundaries_and_scales.items():
        _check_int(f"{name} boundary", boundary)
        if not isinstance(scale, torch.Tensor) and scale < 0.0:
            raise ValueError(
                f"`{name}` expects non-negative scale factors, got {scale!r} at boundary {boundary}"
            )
    boundaries, scales = zip(*sorted(boundaries_and_scales.items()))
    return boundaries, scales
