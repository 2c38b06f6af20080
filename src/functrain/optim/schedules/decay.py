"""Decays: constant, polynomial, linear, piecewise-constant, exponential and cosine schedules.

Each maps a step count to a value that moves from ``init_value`` towards an end value and stays
there (or, for :func:`constant_schedule`, never moves).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from functrain.optim.schedules._base import (
    Count,
    Schedule,
    Value,
    _check_count,
    _check_int,
    _finish,
    _float_dtype,
    _log,
    _sorted_boundaries,
    _wide,
)

__all__ = [
    "constant_schedule",
    "cosine_decay_schedule",
    "exponential_decay",
    "linear_schedule",
    "piecewise_constant_schedule",
    "polynomial_schedule",
]


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
            # An integer tensor value gives a floating one, as every other schedule does.
            return _finish(count, value.to(count.device))
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
            steps = torch.clamp(
                _wide(count, transition_begin, transition_steps) - transition_begin,
                0,
                transition_steps,
            )
        else:
            steps = min(max(count - transition_begin, 0), transition_steps)
        # (T - s) / T, not optax's 1 - s / T: T - s is an exact integer, so the last steps of a
        # long decay to 0 keep their value (1 - s / T cancels to 0 in float32 once T > 2**24).
        frac = (transition_steps - steps) / transition_steps
        return _finish(count, (init_value - end_value) * _power(frac, power) + end_value)

    return schedule


def linear_schedule(
    init_value: float | torch.Tensor,
    end_value: float | torch.Tensor,
    transition_steps: int,
    transition_begin: int = 0,
) -> Schedule:
    """Linear transition from ``init_value`` to ``end_value``: :func:`polynomial_schedule` with
    ``power=1``.

    ``value(t) = I + clip(t - B, 0, T) / T · (E - I)`` (computed as ``(I - E)(T - s)/T + E``,
    optax's ``(I - E)(1 - s/T) + E`` without its cancellation near the end).

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
        if is_tensor:
            count = _wide(count, *boundaries)
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
    # The staircase exponent floor((t - B) / T) in integers: in float32, (3T - 1) / T rounds up
    # to 3.0 once the count passes 2**24 and the drop came one step early.
    int_steps = int(transition_steps) if float(transition_steps).is_integer() else None

    def schedule(count: Count) -> Value:
        is_tensor = _check_count(count)
        decreased_count = (
            _wide(count, transition_begin) if is_tensor else count
        ) - transition_begin
        p = decreased_count / transition_steps
        if is_tensor:
            if staircase and int_steps is not None and not decreased_count.is_floating_point():
                p = torch.div(decreased_count, int_steps, rounding_mode="floor")
                p = p.to(_float_dtype(count))
            elif staircase:
                p = torch.floor(p)
            value = torch.where(
                decreased_count <= 0, init_value, init_value * torch.pow(decay_rate, p)
            )
            if end_value is not None:
                bound = {"min" if decreasing else "max": end_value}
                value = torch.clamp(value, **bound)
        else:
            if staircase and int_steps is not None and isinstance(decreased_count, int):
                p = decreased_count // int_steps  # exact for counts beyond 2**53 too
            elif staircase:
                p = math.floor(p)
            value = init_value if decreased_count <= 0 else init_value * _power(decay_rate, p)
            if end_value is not None:
                value = max(value, end_value) if decreasing else min(value, end_value)
        return _finish(count, value)

    return schedule


def _power(base: float | torch.Tensor, exponent: float | torch.Tensor) -> float | torch.Tensor:
    """``base ** exponent``, ``inf`` where Python floats overflow or ``0.0`` meets a negative
    exponent (optax's float arithmetic, and what the tensor path gives)."""
    try:
        return base**exponent
    except (OverflowError, ZeroDivisionError):
        return math.inf


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
        # optax's ½(1 + cos(π s / T)), written as sin²(π (T - s) / 2T): the same number, but
        # 1 + cos cancels near s = T (its relative error grows as T², 0.25% in float32 one step
        # before the end of T = 1000), while T - s is an exact integer.
        if _check_count(count):
            steps = torch.clamp(_wide(count, decay_steps), max=decay_steps)
            cosine = torch.sin(math.pi * (decay_steps - steps) / (2 * decay_steps)) ** 2
        else:
            steps = min(count, decay_steps)
            cosine = math.sin(math.pi * (decay_steps - steps) / (2 * decay_steps)) ** 2
        decayed = (1 - alpha) * _power(cosine, exponent) + alpha
        return _finish(count, init_value * decayed)

    return schedule
