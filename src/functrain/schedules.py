"""``ft.schedules``: the names of ``optax.schedules`` (0.2.8), so that ported optax code that
writes ``optax.schedules.cosine_decay_schedule(...)`` only changes its import.

Every name here is the same object as the top-level ``functrain`` one
(``ft.schedules.cosine_decay_schedule is ft.cosine_decay_schedule``), documented on the
Optimizers page; nothing here is new.

Example:
    >>> import torch
    >>> import functrain.schedules
    >>> schedule = functrain.schedules.cosine_decay_schedule(1.0, decay_steps=4)
    >>> schedule(2), schedule(torch.tensor(4))
    (0.5, tensor(0.))
"""

from functrain.optim import (
    InjectHyperparamsState,
    InjectStatefulHyperparamsState,
    Schedule,
    StatefulSchedule,
    WrappedSchedule,
    constant_schedule,
    cosine_decay_schedule,
    cosine_onecycle_schedule,
    exponential_decay,
    inject_hyperparams,
    inject_stateful_hyperparams,
    join_schedules,
    linear_onecycle_schedule,
    linear_schedule,
    piecewise_constant_schedule,
    piecewise_interpolate_schedule,
    polynomial_schedule,
    sgdr_schedule,
    warmup_constant_schedule,
    warmup_cosine_decay_schedule,
    warmup_exponential_decay_schedule,
)

__all__ = [
    "InjectHyperparamsState",
    "InjectStatefulHyperparamsState",
    "Schedule",
    "StatefulSchedule",
    "WrappedSchedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "exponential_decay",
    "inject_hyperparams",
    "inject_stateful_hyperparams",
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
