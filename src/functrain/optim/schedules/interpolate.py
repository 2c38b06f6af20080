"""Interpolation between knots: piecewise-interpolate and the one-cycle schedules built on it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch

from functrain.optim.schedules._base import (
    Count,
    Schedule,
    Value,
    _check_count,
    _check_int,
    _finish,
    _float_dtype,
    _sorted_boundaries,
    _wide,
)

__all__ = [
    "cosine_onecycle_schedule",
    "linear_onecycle_schedule",
    "piecewise_interpolate_schedule",
]


def _linear_interpolate(start: Any, end: Any, pct: Any, rest: Any) -> Any:
    del rest
    return (end - start) * pct + start


def _cosine_interpolate(start: Any, end: Any, pct: Any, rest: Any) -> Any:
    """optax's ``end + (start - end)/2 · (cos(π·pct) + 1)``, as ``(cos(πx) + 1)/2 = sin²(π(1-x)/2)``.

    ``rest = 1 - pct`` comes from an exact integer (the steps left in the interval), so the
    value near the interval's end keeps its precision where ``cos + 1`` would cancel.
    """
    del pct
    sin = torch.sin if isinstance(rest, torch.Tensor) else math.sin
    return end + (start - end) * sin(math.pi / 2 * rest) ** 2


def piecewise_interpolate_schedule(
    interpolate_type: str,
    init_value: float | torch.Tensor,
    boundaries_and_scales: Mapping[int, float] | None = None,
) -> Schedule:
    """Interpolates (linearly or by a half cosine) between accumulated values at boundaries.

    With sorted boundaries ``b_1 < … < b_n`` and scales ``s_i``, the values at the knots are
    ``v_0 = init_value`` (at step 0) and ``v_i = v_{i-1} · s_i`` (at ``b_i``). Between two knots
    the value moves from ``v_{i-1}`` to ``v_i`` (``linear``: ``v_{i-1} + (v_i − v_{i-1})·pct``;
    ``cosine``: ``v_i + (v_{i-1} − v_i)/2 · (cos(π·pct) + 1)``); after ``b_n`` it is ``v_n``.
    As in optax, a negative count gives ``0``.

    PyTorch: no single scheduler; ``OneCycleLR`` uses the same cosine interpolation.

    Args:
        interpolate_type: ``"linear"`` or ``"cosine"``.
        init_value: the value at step 0.
        boundaries_and_scales: ``{step: scale}`` with non-negative scales.

    Example:
        >>> import functrain as ft
        >>> sched = ft.piecewise_interpolate_schedule("linear", 1.0, {4: 0.1, 8: 0.01})
        >>> [round(sched(i), 6) for i in range(0, 11, 2)]
        [1.0, 0.55, 0.1, 0.0505, 0.001, 0.001]
    """
    if interpolate_type == "linear":
        interpolate = _linear_interpolate
    elif interpolate_type == "cosine":
        interpolate = _cosine_interpolate
    else:
        raise ValueError(
            f"`interpolate_type` must be either 'cosine' or 'linear', got {interpolate_type!r}"
        )
    boundaries, scales = _sorted_boundaries("piecewise_interpolate_schedule", boundaries_and_scales)
    bounds = (0, *boundaries)
    values = [init_value]
    for scale in scales:
        values.append(values[-1] * scale)
    sizes = [max(b - a, 1) for a, b in itertools.pairwise(bounds)]

    def schedule(count: Count) -> Value:
        if _check_count(count):
            count = _wide(count, *bounds)
            zero = torch.zeros(count.shape, dtype=_float_dtype(count), device=count.device)
            out = torch.where(count >= bounds[-1], values[-1], zero)
            for i, size in enumerate(sizes):
                inside = (count >= bounds[i]) & (count < bounds[i + 1])
                pct = (count - bounds[i]) / size
                rest = (bounds[i + 1] - count) / size
                out = torch.where(inside, interpolate(values[i], values[i + 1], pct, rest), out)
            return _finish(count, out)
        if count >= bounds[-1]:
            return _finish(count, values[-1])
        for i, size in enumerate(sizes):
            if bounds[i] <= count < bounds[i + 1]:
                pct = (count - bounds[i]) / size
                rest = (bounds[i + 1] - count) / size
                return _finish(count, interpolate(values[i], values[i + 1], pct, rest))
        return _finish(count, 0.0)

    return schedule


def _check_onecycle(name: str, transition_steps: int) -> None:
    _check_int("transition_steps", transition_steps)
    if transition_steps <= 0:
        raise ValueError(
            f"A {name} schedule was set with a non-positive `transition_steps` ({transition_steps})"
        )


def linear_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    pct_final: float = 0.85,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One-cycle with three linear phases (Smith & Topin, 2017).

    With ``T = transition_steps`` and ``init = peak_value / div_factor``: up from ``init`` to
    ``peak_value`` until ``int(pct_start·T)``, back down to ``init`` until ``int(pct_final·T)``,
    then down to ``init / final_div_factor`` at ``T``. It is
    :func:`piecewise_interpolate_schedule` with those knots.

    PyTorch: ``OneCycleLR(max_lr, total_steps, anneal_strategy="linear", three_phase=True)`` is
    close but not equal: its phases end one step earlier (at ``pct·T − 1``) and its second
    phase always has the length of the first.

    Args:
        transition_steps: total length of the cycle (must be positive).
        peak_value: the maximum value.
        pct_start: fraction of the steps spent increasing.
        pct_final: fraction of the steps at which the value is back to ``init``.
        div_factor: ``init = peak_value / div_factor``.
        final_div_factor: final value ``init / final_div_factor``.

    Example:
        >>> import functrain as ft
        >>> sched = ft.linear_onecycle_schedule(10, peak_value=1.0, div_factor=10.0)
        >>> [round(sched(i), 3) for i in (0, 3, 6, 8, 10)]
        [0.1, 1.0, 0.46, 0.1, 0.0]
    """
    _check_onecycle("linear onecycle", transition_steps)
    return piecewise_interpolate_schedule(
        "linear",
        peak_value / div_factor,
        {
            int(pct_start * transition_steps): div_factor,
            int(pct_final * transition_steps): 1.0 / div_factor,
            transition_steps: 1.0 / final_div_factor,
        },
    )


def cosine_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """One-cycle with cosine phases (Smith & Topin, 2017).

    With ``T = transition_steps`` and ``init = peak_value / div_factor``: a half cosine up from
    ``init`` to ``peak_value`` until ``int(pct_start·T)``, then a half cosine down to
    ``init / final_div_factor`` at ``T``; :func:`piecewise_interpolate_schedule` with those knots.

    PyTorch: ``OneCycleLR(max_lr=peak_value, total_steps=T, pct_start, div_factor,
    final_div_factor)`` (``anneal_strategy="cos"``) has the same shape and values at the knots,
    but reaches them one step earlier (its phases end at ``pct_start·T − 1`` and ``T − 1``).

    Args:
        transition_steps: total length of the cycle (must be positive).
        peak_value: the maximum value.
        pct_start: fraction of the steps spent increasing.
        div_factor: ``init = peak_value / div_factor``.
        final_div_factor: final value ``init / final_div_factor``.

    Example:
        >>> import functrain as ft
        >>> sched = ft.cosine_onecycle_schedule(10, peak_value=1.0, div_factor=10.0)
        >>> [round(sched(i), 3) for i in (0, 3, 10)]
        [0.1, 1.0, 0.0]
    """
    _check_onecycle("cosine onecycle", transition_steps)
    return piecewise_interpolate_schedule(
        "cosine",
        peak_value / div_factor,
        {
            int(pct_start * transition_steps): div_factor,
            int(transition_steps): 1.0 / (div_factor * final_div_factor),
        },
    )
