"""Stateful schedules, as ``optax.schedules``: ``inject_stateful_hyperparams`` and its types.

A :class:`StatefulSchedule` carries its own state (``init() -> state``), advances it with
whatever the update receives as extra keyword arguments (``update(state, **extra_args)``, e.g.
the loss) and gives the hyperparameter from it (``schedule(state, **extra_args)``).
:func:`inject_stateful_hyperparams` is :func:`~functrain.inject_hyperparams` with such
schedules: the states live in the optimizer state, as 0-d tensors, next to the injected values.
:class:`WrappedSchedule` makes a plain schedule of the step count a stateful one (its state is
the count), so both kinds mix.

Differences from optax: optax 0.2.8 deprecates ``inject_stateful_hyperparams`` (it warns and
calls its ``inject_hyperparams``, which returns this four-field state). functrain's
:func:`~functrain.inject_hyperparams` keeps the three-field ``InjectHyperparamsState`` and only
step-count schedules, so here this is the way to stateful schedules, and it does not warn. The
hyperparameters' dtypes follow :func:`~functrain.inject_hyperparams`'s rules (at least float32,
the params' widest floating dtype, or ``hyperparam_dtype``). The schedules' initial states are
moved to the params' device. There is no in-place fused path (``fused.update_in_place`` does
not recognise the transform, so a donating train step runs the pure update).

Example:
    A step size that is the running sum of a value passed with every update:

    >>> import torch, functrain as ft
    >>> from functrain.optim import stateful_hyperparams as sh
    >>> class Total(sh.StatefulSchedule):
    ...     def init(self):
    ...         return torch.zeros(())
    ...     def update(self, state, **extra_args):
    ...         return state + extra_args["addendum"]
    ...     def __call__(self, state, **extra_args):
    ...         return state
    >>> tx = sh.inject_stateful_hyperparams(ft.scale)(step_size=Total())
    >>> params = {"w": torch.ones(2)}
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...     u, state = tx.update({"w": torch.ones(2)}, state, params, addendum=torch.tensor(0.5))
    >>> u["w"], state.hyperparams["step_size"], state.hyperparams_states["step_size"]
    (tensor([1., 1.]), tensor(1.), tensor(1.5000))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import GradientTransformation
from functrain.optim.hyperparams import (
    _as_tensor,
    _check_hyperparam_keys,
    _check_wrapper_args,
    _dtype,
    _integer_params,
    _numeric_hparams,
    _recorded,
    _scheduled,
    _split_arguments,
    _takes_kwargs,
)
from functrain.optim.schedules._base import Schedule, Value

__all__ = [
    "InjectStatefulHyperparamsState",
    "StatefulSchedule",
    "WrappedSchedule",
    "inject_stateful_hyperparams",
]

_WHO = "inject_stateful_hyperparams"


@runtime_checkable
class StatefulSchedule(Protocol):
    """A schedule with its own state: ``init``, ``update`` and ``__call__``, as optax's.

    ``init()`` returns the initial state (a pytree of tensors); ``update(state, **extra_args)``
    returns the next one; ``schedule(state, **extra_args)`` returns the value for the current
    state. :func:`inject_stateful_hyperparams` calls ``schedule(state)`` at ``init`` (no extra
    arguments) and, at each update, ``schedule(state, **extra_args)`` for the value used by
    that update, then ``update(state, **extra_args)``, with the keyword arguments given to the
    transform's ``update``. Any object with these three methods is one (the protocol is
    runtime-checkable); subclassing is optional. Inside a compiled step the methods must be
    traceable: tensors in, tensors out, no host reads.

    Example:
        >>> import torch
        >>> from functrain.optim import stateful_hyperparams as sh
        >>> class Halving:
        ...     def init(self):
        ...         return torch.tensor(1.0)
        ...     def update(self, state, **extra_args):
        ...         return state / 2
        ...     def __call__(self, state, **extra_args):
        ...         return state
        >>> isinstance(Halving(), sh.StatefulSchedule), isinstance(abs, sh.StatefulSchedule)
        (True, False)
    """

    def init(self) -> Any:
        """The schedule's initial state."""

    def update(self, state: Any, **extra_args: Any) -> Any:
        """The state after one update, given the update's extra keyword arguments."""

    def __call__(self, state: Any, **extra_args: Any) -> Value:
        """The hyperparameter's value in ``state``."""


class WrappedScheduleState(NamedTuple):
    """State of a :class:`WrappedSchedule`: ``count``, an int32 0-d tensor of updates so far."""

    count: torch.Tensor


class WrappedSchedule:
    """A plain schedule of the step count as a :class:`StatefulSchedule` (state: the count).

    ``init()`` gives ``WrappedScheduleState(count=0)`` (int32), ``update`` increments the count
    (saturating at the int32 maximum, as optax's ``safe_increment``), and the value is
    ``schedule_fn(count)``; extra keyword arguments are ignored.

    Args:
        schedule_fn: a schedule (a callable of the step count), e.g.
            ``ft.linear_schedule(...)``.

    Raises:
        TypeError: ``schedule_fn`` is not callable.

    Example:
        >>> import functrain as ft
        >>> from functrain.optim import stateful_hyperparams as sh
        >>> schedule = sh.WrappedSchedule(ft.linear_schedule(1.0, 0.0, transition_steps=4))
        >>> state = schedule.update(schedule.update(schedule.init()))
        >>> state.count, schedule(state)
        (tensor(2, dtype=torch.int32), tensor(0.5000))
    """

    def __init__(self, schedule_fn: Schedule) -> None:
        if not callable(schedule_fn):
            raise TypeError(
                "WrappedSchedule: schedule_fn must be a schedule (a callable of the step "
                f"count), got {type(schedule_fn).__name__}"
            )
        self.schedule_fn = schedule_fn

    def init(self) -> WrappedScheduleState:
        """The count 0 (int32, on the CPU; the wrapper moves it to the params' device)."""
        return WrappedScheduleState(count=torch.zeros((), dtype=torch.int32))

    def update(self, state: WrappedScheduleState, **extra_args: Any) -> WrappedScheduleState:
        """The count plus one (saturating); ``extra_args`` are ignored."""
        del extra_args
        return WrappedScheduleState(count=_utils.safe_increment(state.count))

    def __call__(self, state: WrappedScheduleState, **extra_args: Any) -> Value:
        """``schedule_fn(state.count)``; ``extra_args`` are ignored."""
        del extra_args
        return self.schedule_fn(state.count)

    def __repr__(self) -> str:
        return f"WrappedSchedule({self.schedule_fn!r})"


class InjectStatefulHyperparamsState(NamedTuple):
    """State of an :func:`inject_stateful_hyperparams` transform (optax's fields and order).

    Attributes:
        count: int32 number of updates so far.
        hyperparams: ``{name: 0-d tensor}``: each numeric or scheduled hyperparameter's value
            used by the last update (the initial values after ``init``).
        hyperparams_states: ``{name: schedule state}`` for each scheduled hyperparameter
            (a :class:`WrappedScheduleState` for a plain schedule).
        inner_state: the inner transform's state.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.optim import stateful_hyperparams as sh
        >>> tx = sh.inject_stateful_hyperparams(ft.sgd)(learning_rate=ft.constant_schedule(0.1))
        >>> state = tx.init({"w": torch.ones(2)})
        >>> state.hyperparams_states["learning_rate"]
        WrappedScheduleState(count=tensor(0, dtype=torch.int32))
    """

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    hyperparams_states: dict[str, Any]
    inner_state: Any


def _on_device(schedule_state: Any, device: torch.device) -> Any:
    # A schedule's init() cannot know the params' device (optax's init takes no argument):
    # its CPU tensors would otherwise meet device tensors at every update. Python numbers
    # become 0-d tensors (as a jitted optax update makes them arrays): kept as numbers, the
    # state changed type after the first update, and a compiled step recompiled once.
    def leaf(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (bool, int, float)):
            return torch.as_tensor(x, device=device)
        return x

    return tree.map(leaf, schedule_state)


def _value(name: str, value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A schedule's value as a tensor of its own (never a tensor of the schedule's state).

    A schedule that returns a tensor of its state (``return state.lr``) would otherwise have
    ``hyperparams`` alias ``hyperparams_states``: writing one entry would change the other,
    and ``torch.compile`` guards on that aliasing, so the step recompiled once it ended.
    """
    out = _scheduled(name, value, dtype, device, who=_WHO, called="state")
    return out.clone() if out is value else out


def inject_stateful_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wraps an optimizer factory so that its hyperparameters, and their schedules' states, live
    in the state.

    As :func:`~functrain.inject_hyperparams` (which arguments are injected, static ones,
    changing a numeric hyperparameter by replacing its ``state.hyperparams`` entry, refusing
    unknown entries), but a hyperparameter may also be a :class:`StatefulSchedule`; every other
    callable is a schedule of the step count and is wrapped in a :class:`WrappedSchedule`. The
    state is an :class:`InjectStatefulHyperparamsState`. At ``init`` each schedule's value is
    ``schedule(schedule.init())``; an ``update(updates, state, params, **extra_args)`` uses
    ``schedule(s, **extra_args)`` of each schedule state ``s``, records it in ``hyperparams``,
    stores ``schedule.update(s, **extra_args)`` in ``hyperparams_states`` and passes
    ``extra_args`` on to the inner transform (when its ``update`` takes keyword arguments).

    Nothing is read back to the host: under ``torch.compile(fullgraph=True)`` the update
    compiles once and does not recompile as the counts, schedule states or extra arguments
    change value (keep their dtypes and shapes fixed).

    Differences from optax: no ``DeprecationWarning`` (see the module docstring); Python numbers
    and schedule values become tensors of the floating ``hyperparam_dtype`` (default: the
    widest floating dtype of the params, else of the updates, at least float32); each schedule
    value keeps the dtype it had at ``init``; schedule states are moved to the params' device.

    Args:
        inner_factory: a function returning a :class:`GradientTransformation`, e.g. ``ft.sgd``.
        static_args: names of callable arguments that are not schedules.
        hyperparam_dtype: floating dtype of the injected hyperparameters.

    Returns:
        A function with ``inner_factory``'s arguments that returns the wrapped transform.

    Raises:
        TypeError: ``inner_factory`` is not callable; ``hyperparam_dtype`` is not a
            ``torch.dtype``; (when called) arguments ``inner_factory`` does not take, or a
            schedule whose value is not a real number.
        ValueError: ``static_args`` names a parameter ``inner_factory`` lacks;
            ``hyperparam_dtype`` is not floating; a non-finite Python float hyperparameter.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.optim import stateful_hyperparams as sh
        >>> tx = sh.inject_stateful_hyperparams(ft.sgd)(
        ...     learning_rate=ft.linear_schedule(1.0, 0.0, transition_steps=4)
        ... )
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     u, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> u["w"], state.hyperparams["learning_rate"]
        (tensor([-0.7500, -0.7500]), tensor(0.7500))
        >>> state.hyperparams_states["learning_rate"].count
        tensor(2, dtype=torch.int32)
    """
    static, signature, factory_name = _check_wrapper_args(
        _WHO, inner_factory, static_args, hyperparam_dtype
    )
    integer_params = _integer_params(signature, inner_factory)

    @functools.wraps(inner_factory)
    def wrapped_transform(*args: Any, **kwargs: Any) -> GradientTransformation:
        callables, numeric, other = _split_arguments(
            _WHO, inner_factory, signature, static, integer_params, args, kwargs
        )
        schedules: dict[str, StatefulSchedule] = {
            k: f if isinstance(f, StatefulSchedule) else WrappedSchedule(f)
            for k, f in callables.items()
        }

        def build(hparams: dict[str, torch.Tensor]) -> GradientTransformation:
            return inner_factory(**other, **hparams)

        def init_fn(params: Any) -> InjectStatefulHyperparamsState:
            count = _utils.zero_count(params)
            dtype = _dtype(hyperparam_dtype, params)
            device = count.device
            hparams = _numeric_hparams(numeric, dtype, device)
            states = {k: _on_device(f.init(), device) for k, f in schedules.items()}
            hparams.update(
                {k: _value(k, f(states[k]), dtype, device) for k, f in schedules.items()}
            )
            return InjectStatefulHyperparamsState(
                count, hparams, states, build(hparams).init(params)
            )

        def check(state: Any) -> None:
            if not isinstance(state, InjectStatefulHyperparamsState):
                raise TypeError(
                    f"{_WHO} expects an InjectStatefulHyperparamsState, got {type(state).__name__}"
                )
            _check_hyperparam_keys(state.hyperparams, numeric, schedules, factory_name)
            if set(state.hyperparams_states) != set(schedules):
                raise KeyError(
                    f"state.hyperparams_states has entries {sorted(state.hyperparams_states)}, "
                    f"expected one per schedule: {sorted(schedules)}"
                )

        def update_fn(
            updates: Any,
            state: InjectStatefulHyperparamsState,
            params: Any = None,
            **extra_args: Any,
        ) -> tuple[Any, InjectStatefulHyperparamsState]:
            check(state)
            dtype = _dtype(hyperparam_dtype, params, updates)
            device = state.count.device
            hparams = {k: _as_tensor(state.hyperparams[k], dtype, device) for k in numeric}
            sched_states = state.hyperparams_states
            hparams.update(
                {
                    k: _value(
                        k, f(sched_states[k], **extra_args), _recorded(state, k, dtype), device
                    )
                    for k, f in schedules.items()
                }
            )
            new_states = {k: f.update(sched_states[k], **extra_args) for k, f in schedules.items()}
            inner = build(hparams)
            if _takes_kwargs(inner.update):
                updates, inner_state = inner.update(
                    updates, state.inner_state, params, **extra_args
                )
            else:
                updates, inner_state = inner.update(updates, state.inner_state, params)
            new_state = InjectStatefulHyperparamsState(
                _utils.safe_increment(state.count), hparams, new_states, inner_state
            )
            return updates, new_state

        return GradientTransformation(init_fn, update_fn)

    return wrapped_transform
