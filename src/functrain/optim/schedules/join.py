"""Sequences of schedules: :func:`join_schedules` and the warmup and SGDR schedules built on it.

A warmup schedule is a linear ramp joined to a decay; SGDR joins several warmup-cosine cycles.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from functrain.optim.schedules._base import (
    Count,
    Schedule,
    Value,
    _check_count,
    _check_int,
    _finish,
    _wide,
)
from functrain.optim.schedules.decay import (
    cosine_decay_schedule,
    exponential_decay,
    linear_schedule,
)

__all__ = [
    "join_schedules",
    "sgdr_schedule",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
]


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Runs ``schedules[i]`` from ``boundaries[i-1]`` on, each counting from its own start.

    ``value(t) = schedules[k](t − boundaries[k−1])`` for the last ``k`` with
    ``boundaries[k−1] <= t`` (``schedules[0](t)`` before the first boundary).

    PyTorch: ``SequentialLR(optimizer, schedulers, milestones=boundaries)``.

    Args:
        schedules: the schedules, one more than there are boundaries.
        boundaries: non-decreasing integer steps at which to switch to the next schedule.

    Raises:
        ValueError: if the lengths do not fit or the boundaries are not sorted (optax silently
            ignores extra entries instead).

    Example:
        >>> import functrain as ft
        >>> sched = ft.join_schedules(
        ...     [ft.constant_schedule(1.0), ft.linear_schedule(1.0, 0.0, 2)], boundaries=[3])
        >>> [sched(i) for i in range(6)]
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    schedules = list(schedules)
    boundaries = list(boundaries)
    if not schedules:
        raise ValueError("join_schedules needs at least one schedule")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"join_schedules needs one boundary fewer than schedules, got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries"
        )
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] must be callable, got {s!r}")
    for b in boundaries:
        _check_int("join_schedules boundary", b)
    if any(a > b for a, b in itertools.pairwise(boundaries)):
        raise ValueError(f"join_schedules boundaries must be sorted, got {boundaries}")

    def schedule(count: Count) -> Value:
        if _check_count(count):
            count = _wide(count, *boundaries)
            out = schedules[0](count)
            for boundary, sched in zip(boundaries, schedules[1:]):
                out = torch.where(count < boundary, out, sched(count - boundary))
            return _finish(count, out)
        k = bisect.bisect_right(boundaries, count)
        if k == 0:
            return _finish(count, schedules[0](count))
        # A user's schedule may return an int: a Python count still gives a float.
        return _finish(count, schedules[k](count - boundaries[k - 1]))

    return schedule


def warmup_constant_schedule(
    init_value: float | torch.Tensor, peak_value: float | torch.Tensor, warmup_steps: int
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then constant.

    PyTorch: ``LinearLR(start_factor=init_value/peak_value, total_iters=warmup_steps)`` with
    ``lr=peak_value`` (PyTorch needs ``init_value > 0``).

    Args:
        init_value: value at step 0.
        peak_value: value from ``warmup_steps`` on.
        warmup_steps: length of the warmup.

    Example:
        >>> import functrain as ft
        >>> sched = ft.warmup_constant_schedule(0.0, 1.0, warmup_steps=4)
        >>> [sched(i) for i in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return linear_schedule(
        init_value=init_value, end_value=peak_value, transition_steps=warmup_steps
    )


def warmup_cosine_decay_schedule(
    init_value: float | torch.Tensor,
    peak_value: float | torch.Tensor,
    warmup_steps: int,
    decay_steps: int,
    end_value: float | torch.Tensor = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup to ``peak_value``, then cosine decay to ``end_value``.

    ``decay_steps`` is the total length *including* the warmup, so the cosine part lasts
    ``decay_steps − warmup_steps`` steps: it is :func:`join_schedules` of
    ``linear_schedule(init_value, peak_value, warmup_steps)`` and
    ``cosine_decay_schedule(peak_value, decay_steps − warmup_steps, end_value / peak_value,
    exponent)``.

    PyTorch: ``SequentialLR([LinearLR(start_factor=init/peak, total_iters=warmup),
    CosineAnnealingLR(T_max=decay_steps − warmup, eta_min=end_value)], milestones=[warmup])``
    with ``lr=peak_value``, up to ``decay_steps`` (PyTorch's cosine rises again after that).

    Args:
        init_value: value at step 0.
        peak_value: value at the end of the warmup.
        warmup_steps: length of the warmup.
        decay_steps: total length of warmup and decay (must exceed ``warmup_steps``).
        end_value: value from ``decay_steps`` on.
        exponent: power applied to the cosine factor.

    Example:
        >>> import functrain as ft
        >>> sched = ft.warmup_cosine_decay_schedule(0.0, 1.0, warmup_steps=2, decay_steps=6)
        >>> [round(sched(i), 4) for i in range(8)]
        [0.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    _check_int("warmup_steps", warmup_steps)
    _check_int("decay_steps", decay_steps)
    if decay_steps - warmup_steps <= 0:
        raise ValueError(
            "warmup_cosine_decay_schedule needs decay_steps > warmup_steps (decay_steps counts "
            f"the warmup too), got warmup_steps={warmup_steps}, decay_steps={decay_steps}"
        )
    if isinstance(peak_value, torch.Tensor):
        alpha = torch.where(peak_value == 0.0, 0.0, end_value / peak_value)
    else:
        alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, transition_steps=warmup_steps),
            cosine_decay_schedule(
                peak_value, decay_steps=decay_steps - warmup_steps, alpha=alpha, exponent=exponent
            ),
        ],
        [warmup_steps],
    )


def warmup_exponential_decay_schedule(
    init_value: float | torch.Tensor,
    peak_value: float | torch.Tensor,
    warmup_steps: int,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | torch.Tensor | None = None,
) -> Schedule:
    """Linear warmup to ``peak_value``, then :func:`exponential_decay` from ``peak_value``.

    The decay counts from the end of the warmup.

    PyTorch: ``SequentialLR([LinearLR(...), ExponentialLR(gamma)], milestones=[warmup_steps])``
    for ``transition_steps=1``.

    Args:
        init_value: value at step 0.
        peak_value: value at the end of the warmup.
        warmup_steps: length of the warmup.
        transition_steps: see :func:`exponential_decay`.
        decay_rate: see :func:`exponential_decay`.
        transition_begin: steps after the warmup during which ``peak_value`` is held.
        staircase: decay in discrete steps.
        end_value: optional bound on the decayed value.

    Example:
        >>> import functrain as ft
        >>> sched = ft.warmup_exponential_decay_schedule(0.0, 1.0, 2, 1, decay_rate=0.5)
        >>> [sched(i) for i in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.25, 0.125]
    """
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, transition_steps=warmup_steps),
            exponential_decay(
                peak_value,
                transition_steps=transition_steps,
                decay_rate=decay_rate,
                transition_begin=transition_begin,
                staircase=staircase,
                end_value=end_value,
            ),
        ],
        [warmup_steps],
    )


def sgdr_schedule(cosine_kwargs: Iterable[Mapping[str, Any]]) -> Schedule:
    """SGD with warm restarts (Loshchilov & Hutter, 2017): consecutive warmup-cosine cycles.

    Each element of ``cosine_kwargs`` holds the arguments of one
    :func:`warmup_cosine_decay_schedule`; its ``decay_steps`` is the cycle's length.

    PyTorch: ``CosineAnnealingWarmRestarts(T_0, T_mult=1, eta_min)`` when every cycle has
    ``warmup_steps=0``, ``decay_steps=T_0``, ``init_value = peak_value = lr`` and
    ``end_value=eta_min``.

    Args:
        cosine_kwargs: the keyword arguments of each cycle.

    Example:
        >>> import functrain as ft
        >>> cycle = dict(init_value=1.0, peak_value=1.0, warmup_steps=0, decay_steps=2)
        >>> sched = ft.sgdr_schedule([cycle, cycle])
        >>> [sched(i) for i in range(5)]
        [1.0, 0.5, 1.0, 0.5, 0.0]
    """
    boundaries: list[int] = []
    schedules: list[Schedule] = []
    step = 0
    for i, kwargs in enumerate(cosine_kwargs):
        if "decay_steps" not in kwargs:
            raise ValueError(f"sgdr_schedule: cosine_kwargs[{i}] has no 'decay_steps'")
        schedules.append(warmup_cosine_decay_schedule(**kwargs))
        step += kwargs["decay_steps"]
        boundaries.append(step)
    if not schedules:
        raise ValueError("sgdr_schedule needs at least one cycle")
    return join_schedules(schedules, boundaries[:-1])
