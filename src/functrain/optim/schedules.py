"""Schedules: functions of the step count that give a hyperparameter's value (optax's set).

A schedule maps a step ``count`` to a value. Called with a Python ``int`` it returns a Python
``float`` (computed in double precision); called with a tensor of counts it returns a floating
tensor on the count's device, computed element-wise with tensor operations only (no host sync,
no Python branch on tensor values), so it can be evaluated inside ``torch.compile(fullgraph=True)``
and changing the count never recompiles. An integer count gives the default floating dtype
(``torch.get_default_dtype()``, float32 unless changed); a floating count keeps its dtype.

Formulas, argument names, defaults and edge cases follow optax. As in optax, a few degenerate
arguments (``transition_steps <= 0`` in :func:`polynomial_schedule`, :func:`linear_schedule` and
:func:`exponential_decay`, ``decay_rate == 0``, a negative ``transition_begin``) are not errors:
optax logs a message with ``logging.info`` and falls back to a constant or to ``0``; functrain
does the same through the ``functrain.optim.schedules`` logger (a log record, not a Python
warning).

Example:
    >>> import torch, functrain as ft
    >>> sched = ft.linear_schedule(init_value=1.0, end_value=0.0, transition_steps=4)
    >>> [sched(i) for i in range(6)]
    [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    >>> sched(torch.tensor(2, dtype=torch.int32))
    tensor(0.5000)
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

__all__ = [
    "Schedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "exponential_decay",
    "join_schedules",
    "linear_onecycle_schedule",
    "linear_schedule",
    "piecewise_constant_schedule",
    "piecewise_interpolate_schedule",
    "polynomial_schedule",
    "sgdr_schedule",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
]

_log = logging.getLogger(__name__)

Count = int | float | torch.Tensor
Value = float | torch.Tensor


class Schedule(Protocol):
    """A learning-rate (or any hyperparameter) schedule: ``schedule(count) -> value``.

    ``count`` is the number of updates done so far (``0`` at the first update), a Python number
    or a tensor; with a tensor count the value is a tensor on its device and computed without
    Python branches, so a compiled step does not recompile as the count advances. Any such
    callable works where functrain takes a schedule.

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


def constant_schedule(value: float | torch.Tensor) -> Schedule:
    """A schedule that always returns ``value``.

    Equivalent to not using a ``torch.optim.lr_scheduler`` at all.

    Args:
        value: the constant (a number or a 0-d tensor).

    Example:
        >>> import torch, functrain as ft
        >>> sched = ft.constant_schedule(5.0)
        >>> sched(0), sched(100)
        (5.0, 5.0)
        >>> sched(torch.tensor(7))
        tensor(5.)
    """

    def schedule(count: Count) -> Value:
        if _check_count(count) and isinstance(value, torch.Tensor):
            return value.to(count.device)
        return _finish(count, value)

    return schedule


def polynomial_schedule(
    init_value: float | torch.Tensor,
    end_value: float | torch.Tensor,
    power: float | torch.Tensor,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Polynomial transition from ``init_value`` to ``end_value``.

    With ``I = init_value``, ``E = end_value``, ``B = transition_begin``, ``T = transition_steps``
    and ``P = power``::

        value(t) = (I - E) · (1 - clip(t - B, 0, T) / T)^P + E

    so it holds ``I`` until ``B`` and ``E`` from ``B + T`` on. ``transition_steps <= 0`` gives a
    constant ``init_value`` and a negative ``transition_begin`` is taken as ``0`` (both logged, as
    in optax).

    PyTorch: ``torch.optim.lr_scheduler.PolynomialLR(total_iters=T, power=P)`` is the case
    ``E = 0``, ``B = 0`` with ``lr = I``.

    Args:
        init_value: value before and at the start of the transition.
        end_value: value at and after the end of the transition.
        power: exponent of the polynomial.
        transition_steps: number of steps of the transition.
        transition_begin: number of steps during which ``init_value`` is held first.

    Example:
        >>> import functrain as ft
        >>> sched = ft.polynomial_schedule(1.0, 0.0, power=2, transition_steps=4)
        >>> [sched(i) for i in range(5)]
        [1.0, 0.5625, 0.25, 0.0625, 0.0]
    """
    _check_int("transition_steps", transition_steps)
    _check_int("transition_begin", transition_begin)
    if transition_steps <= 0:
        _log.info(
            "A polynomial schedule was set with a non-positive `transition_steps` value; this "
            "results in a constant schedule with value `init_value`."
        )
        return constant_schedule(init_value)
    if transition_begin < 0:
        _log.info(
            "A polynomial schedule was set with a negative `transition_begin` value; this will "
            "result in `transition_begin` falling back to `0`."
        )
        transition_begin = 0

    def schedule(count: Count) -> Value:
        if _check_count(count):
            steps = torch.clamp(count - transition_begin, 0, transition_steps)
        else:
            steps = min(max(count - transition_begin, 0), transition_steps)
        frac = 1 - steps / transition_steps
        return _finish(count, (init_value - end_value) * (frac**power) + end_value)

    return schedule


def linear_schedule(
    init_value: float | torch.Tensor,
    end_value: float | torch.Tensor,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Linear transition from ``init_value`` to ``end_value``: :func:`polynomial_schedule` with
    ``power=1``.

    ``value(t) = I + clip(t - B, 0, T) / T · (E - I)`` (computed as ``(I - E)(1 - s/T) + E``,
    as optax does).

    PyTorch: ``LinearLR(start_factor=I/lr, end_factor=E/lr, total_iters=T)`` gives the same
    sequence when ``transition_begin == 0`` (PyTorch updates it recursively, so it drifts by a
    few ulps).

    Args:
        init_value: value before and at the start of the transition.
        end_value: value at and after the end of the transition.
        transition_steps: number of steps of the transition (``<= 0``: constant ``init_value``).
        transition_begin: number of steps during which ``init_value`` is held first.

    Example:
        >>> import functrain as ft
        >>> sched = ft.linear_schedule(init_value=0.1, end_value=0.5, transition_steps=4)
        >>> [round(sched(i), 6) for i in range(6)]
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.5]
    """
    return polynomial_schedule(
        init_value=init_value,
        end_value=end_value,
        power=1,
        transition_steps=transition_steps,
        transition_begin=transition_begin,
    )


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


def piecewise_constant_schedule(
    init_value: float | torch.Tensor,
    boundaries_and_scales: Mapping[int, float] | None = None,
) -> Schedule:
    """Piecewise constant: ``init_value`` times the product of the scales of boundaries ``<= t``.

    ``value(t) = init_value · Π_{b ≤ t} scale_b`` for ``{b: scale_b}`` in
    ``boundaries_and_scales``.

    PyTorch: ``MultiStepLR(milestones, gamma)`` when every scale equals ``gamma``; other scale
    lists need a ``LambdaLR``.

    Args:
        init_value: the value before the first boundary.
        boundaries_and_scales: ``{step: scale}``; each non-negative scale multiplies the value
            from ``step`` on.

    Example:
        >>> import functrain as ft
        >>> sched = ft.piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
        >>> [round(sched(i), 6) for i in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    boundaries, scales = _sorted_boundaries("piecewise_constant_schedule", boundaries_and_scales)

    def schedule(count: Count) -> Value:
        is_tensor = _check_count(count)
        value = init_value
        if is_tensor and not isinstance(value, torch.Tensor):
            value = torch.full(count.shape, value, dtype=_float_dtype(count), device=count.device)
        for boundary, scale in zip(boundaries, scales):
            if is_tensor:
                value = torch.where(count < boundary, value, scale * value)
            elif count >= boundary:
                value = scale * value
        return _finish(count, value)

    return schedule


def exponential_decay(
    init_value: float | torch.Tensor,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | torch.Tensor | None = None,
) -> Schedule:
    """Exponential decay: ``init_value · decay_rate ** ((t - B) / transition_steps)`` after ``B``.

    With ``B = transition_begin``, the value is ``init_value`` while ``t <= B``; with
    ``staircase=True`` the exponent is floored (discrete drops every ``transition_steps``).
    ``end_value`` bounds the value (a lower bound when ``decay_rate < 1``, an upper bound
    otherwise). ``transition_steps <= 0`` or ``decay_rate == 0`` give a constant ``init_value``
    and a negative ``transition_begin`` is taken as ``0`` (logged, as in optax).

    PyTorch: ``ExponentialLR(gamma)`` is ``transition_steps=1``; ``StepLR(step_size, gamma)`` is
    ``staircase=True, transition_steps=step_size``.

    Args:
        init_value: the initial value.
        transition_steps: steps over which the value is multiplied by ``decay_rate`` once.
        decay_rate: the decay rate (must not be negative).
        transition_begin: number of steps during which ``init_value`` is held first.
        staircase: decay in discrete steps.
        end_value: optional bound on the decayed value.

    Example:
        >>> import functrain as ft
        >>> sched = ft.exponential_decay(1.0, transition_steps=2, decay_rate=0.5)
        >>> [round(sched(i), 4) for i in range(5)]
        [1.0, 0.7071, 0.5, 0.3536, 0.25]
    """
    _check_int("transition_steps", transition_steps)
    _check_int("transition_begin", transition_begin)
    if not isinstance(decay_rate, torch.Tensor) and decay_rate < 0:
        # optax would return NaN for fractional exponents; a negative rate is always a bug.
        raise ValueError(f"decay_rate must be non-negative, got {decay_rate!r}")
    if transition_steps <= 0:
        _log.info(
            "An exponential schedule was set with a non-positive `transition_steps` value; this "
            "will result in a constant schedule with value `init_value`."
        )
        return constant_schedule(init_value)
    if not isinstance(decay_rate, torch.Tensor) and decay_rate == 0:
        _log.info(
            "An exponential schedule was set with a zero `decay_rate` value; this will result "
            "in a constant schedule with value `init_value`."
        )
        return constant_schedule(init_value)
    if transition_begin < 0:
        _log.info(
            "An exponential schedule was set with a negative `transition_begin` value; this "
            "will result in `transition_begin` falling back to `0`."
        )
        transition_begin = 0
    decreasing = bool(decay_rate < 1.0)

    def schedule(count: Count) -> Value:
        is_tensor = _check_count(count)
        decreased_count = count - transition_begin
        p = decreased_count / transition_steps
        if is_tensor:
            if staircase:
                p = torch.floor(p)
            value = torch.where(
                decreased_count <= 0, init_value, init_value * torch.pow(decay_rate, p)
            )
            if end_value is not None:
                bound = {"min" if decreasing else "max": end_value}
                value = torch.clamp(value, **bound)
        else:
            if staircase:
                p = math.floor(p)
            value = init_value if decreased_count <= 0 else init_value * decay_rate**p
            if end_value is not None:
                value = max(value, end_value) if decreasing else min(value, end_value)
        return _finish(count, value)

    return schedule


def cosine_decay_schedule(
    init_value: float | torch.Tensor,
    decay_steps: int,
    alpha: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Cosine decay from ``init_value`` to ``alpha · init_value`` over ``decay_steps``.

    With ``T = decay_steps`` and ``p = exponent``::

        value(t) = init_value · ((1 - alpha) · (½ (1 + cos(π · min(t, T) / T)))^p + alpha)

    PyTorch: ``CosineAnnealingLR(T_max=T, eta_min=alpha · init_value)`` matches for ``t <= T``
    (with ``exponent=1``); after ``T`` PyTorch's value rises again while this one stays at
    ``alpha · init_value``.

    Args:
        init_value: the initial value.
        decay_steps: length of the decay (must be positive).
        alpha: the final value as a fraction of ``init_value``.
        exponent: power applied to the cosine factor.

    Raises:
        ValueError: if ``decay_steps <= 0`` (as optax).

    Example:
        >>> import functrain as ft
        >>> sched = ft.cosine_decay_schedule(1.0, decay_steps=4)
        >>> [round(sched(i), 4) for i in range(6)]
        [1.0, 0.8536, 0.5, 0.1464, 0.0, 0.0]
    """
    _check_int("decay_steps", decay_steps)
    if not decay_steps > 0:
        raise ValueError(
            f"The cosine_decay_schedule requires positive decay_steps, got decay_steps={decay_steps}."
        )

    def schedule(count: Count) -> Value:
        if _check_count(count):
            steps = torch.clamp(count, max=decay_steps)
            cosine = 0.5 * (1 + torch.cos(math.pi * steps / decay_steps))
        else:
            steps = min(float(count), float(decay_steps))
            cosine = 0.5 * (1 + math.cos(math.pi * steps / decay_steps))
        decayed = (1 - alpha) * cosine**exponent + alpha
        return _finish(count, init_value * decayed)

    return schedule


def _linear_interpolate(start: Any, end: Any, pct: Any) -> Any:
    return (end - start) * pct + start


def _cosine_interpolate(start: Any, end: Any, pct: Any) -> Any:
    cos = torch.cos if isinstance(pct, torch.Tensor) else math.cos
    return end + (start - end) / 2.0 * (cos(math.pi * pct) + 1)


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
            zero = torch.zeros(count.shape, dtype=_float_dtype(count), device=count.device)
            out = torch.where(count >= bounds[-1], values[-1], zero)
            for i, size in enumerate(sizes):
                inside = (count >= bounds[i]) & (count < bounds[i + 1])
                pct = (count - bounds[i]) / size
                out = torch.where(inside, interpolate(values[i], values[i + 1], pct), out)
            return _finish(count, out)
        if count >= bounds[-1]:
            return _finish(count, values[-1])
        for i, size in enumerate(sizes):
            if bounds[i] <= count < bounds[i + 1]:
                pct = (count - bounds[i]) / size
                return _finish(count, interpolate(values[i], values[i + 1], pct))
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
            out = schedules[0](count)
            for boundary, sched in zip(boundaries, schedules[1:]):
                out = torch.where(count < boundary, out, sched(count - boundary))
            return _finish(count, out)
        k = bisect.bisect_right(boundaries, count)
        if k == 0:
            return schedules[0](count)
        return schedules[k](count - boundaries[k - 1])

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
