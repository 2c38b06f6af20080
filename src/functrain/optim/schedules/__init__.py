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

from functrain.optim.schedules._base import Schedule
from functrain.optim.schedules.decay import (
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
    linear_schedule,
    piecewise_constant_schedule,
    polynomial_schedule,
)
from functrain.optim.schedules.interpolate import (
    cosine_onecycle_schedule,
    linear_onecycle_schedule,
    piecewise_interpolate_schedule,
)
from functrain.optim.schedules.join import (
    join_schedules,
    sgdr_schedule,
    warmup_constant_schedule,
    warmup_cosine_decay_schedule,
    warmup_exponential_decay_schedule,
)

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
