"""``inject_hyperparams``: keep an optimizer's hyperparameters as tensors in its state.

The wrapped factory is called again at every update with the current hyperparameter tensors, as
optax does; building a transform is cheap Python and, under ``torch.compile``, is traced away.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import numbers
import re
import typing
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops, _utils, fused
from functrain.optim.base import GradientTransformation

__all__ = [
    "InjectHyperparamsState",
    "inject_hyperparams",
]


class InjectHyperparamsState(NamedTuple):
    """State of an :func:`inject_hyperparams` transform.

    Attributes:
        count: int32 number of updates so far (schedules are evaluated at it).
        hyperparams: ``{name: 0-d tensor}``: the value of each numeric or scheduled
            hyperparameter used by the last update (the initial values after ``init``).
        inner_state: the inner transform's state.
    """

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


def _declares_int(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return bool({"int", "bool"} & set(re.split(r"[^\w.]+", annotation)))
    if annotation in (int, bool):
        return True
    # A union with int but no float or tensor (an axis, a count): ``float | int | Tensor``
    # (a learning rate's Scalar) is a number to inject.
    members = typing.get_args(annotation)
    return any(a in (int, bool) for a in members) and not any(
        a in (float, complex) or a is torch.Tensor or _declares_callable(a) for a in members
    )


def _declares_callable(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Callable, collections.abc.Callable)


def _integer_params(signature: inspect.Signature, fn: Any = None) -> set[str]:
    """Parameters declared ``int`` or ``bool`` (by annotation or an int default), as optax.

    String annotations are also resolved in ``fn``'s module where they can be, so that an
    alias (``per_elt_axis: MaybeAxis``, ``MaybeAxis = int | Sequence[int] | None``) counts too;
    a union that also admits floats or tensors (a learning rate's ``Scalar``) does not.
    """
    try:
        hints = typing.get_type_hints(fn) if fn is not None else {}
    except Exception:  # unresolvable names: fall back to the annotations' text
        hints = {}
    names = set()
    for name, param in signature.parameters.items():
        declared = _declares_int(param.annotation) or (name in hints and _declares_int(hints[name]))
        if declared or (param.default is not param.empty and isinstance(param.default, int)):
            names.add(name)
    return names


def _is_static_int(value: Any) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return not (value.is_floating_point() or value.is_complex())
    return False


def _takes_kwargs(fn: Any) -> bool:
    # Reads the code flags rather than calling inspect.signature, which torch.compile cannot trace.
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return True if code is None else bool(code.co_flags & inspect.CO_VARKEYWORDS)


def _dtype(hyperparam_dtype: torch.dtype | None, *trees: Any) -> torch.dtype:
    if hyperparam_dtype is not None:
        return hyperparam_dtype
    for t in trees:
        leaves = [x for x in tree.leaves(t) if isinstance(x, torch.Tensor)]
        if leaves:
            # At least float32, as optax keeps Python floats: in bfloat16, b2 = 0.999 is 1.0 and
            # Adam's first step divides by zero. Complex leaves count by their real dtype, so
            # complex128 params get float64 hyperparameters as float64 params do.
            dtype = torch.float32
            for x in leaves:
                if x.is_complex():
                    dtype = torch.promote_types(dtype, _ops.real_dtype(x.dtype))
                elif x.is_floating_point():
                    dtype = torch.promote_types(dtype, x.dtype)
            return dtype
    return torch.get_default_dtype()


def _as_tensor(value: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=dtype, device=device)


def _recorded(state: InjectHyperparamsState, name: str, default: torch.dtype) -> torch.dtype:
    """The floating dtype ``init`` recorded for a schedule's values (``default`` without one).

    Keeps the state's dtypes fixed: an update without ``params`` would otherwise take the
    updates' dtype (float32 schedule values of float64 params after one bfloat16 step).
    """
    value = state.hyperparams.get(name)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.dtype
    return default


def _scheduled(
    name: str,
    value: Any,
    dtype: torch.dtype,
    device: torch.device,
    *,
    who: str = "inject_hyperparams",
    called: str = "count",
) -> torch.Tensor:
    """A schedule's value as a tensor; a non-number means ``name`` was not a schedule.

    ``who`` (the wrapper) and ``called`` (what the schedule was called with) word the error.
    """
    numeric = (
        value.dtype != torch.bool and not value.is_complex()
        if isinstance(value, torch.Tensor)
        else isinstance(value, numbers.Real) and not isinstance(value, bool)
    )
    if not numeric:
        # Every callable argument is taken as a schedule (as optax does): a mask function or
        # a transform would otherwise fail later with an unrelated message.
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(
            f"{who}: `{name}` is callable, so it is taken as a schedule of the step "
            f"count, but {name}({called}) gave {got}, not a number; pass "
            f"static_args=({name!r},) if it is not a schedule"
        )
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    return torch.tensor(value, dtype=dtype, device=device)


def _check_wrapper_args(
    who: str,
    inner_factory: Any,
    static_args: str | Iterable[str],
    hyperparam_dtype: torch.dtype | None,
) -> tuple[set[str], inspect.Signature, str]:
    """Checks the arguments of the wrapper ``who`` (``inject_hyperparams`` or a sibling).

    Returns:
        The names in ``static_args``, ``inner_factory``'s signature and its name.
    """
    if not callable(inner_factory):
        raise TypeError(
            f"{who} expects a transform factory such as ft.adam, got {type(inner_factory).__name__}"
        )
    if hyperparam_dtype is not None:
        if not isinstance(hyperparam_dtype, torch.dtype):
            raise TypeError(
                f"hyperparam_dtype must be a torch.dtype or None, got {hyperparam_dtype!r}"
            )
        if not hyperparam_dtype.is_floating_point:
            # An integer dtype would silently truncate the hyperparameters (0.1 becomes 0).
            raise ValueError(
                f"hyperparam_dtype must be a floating-point dtype, got {hyperparam_dtype}"
            )
    static = {static_args} if isinstance(static_args, str) else set(static_args)
    signature = inspect.signature(inner_factory)
    factory_name = getattr(inner_factory, "__name__", type(inner_factory).__name__)
    if not static.issubset(signature.parameters):
        raise ValueError(
            "`static_args` must specify a subset of `inner_factory`'s parameters. Given "
            f"`static_args`: {sorted(static)}. `inner_factory` parameters: "
            f"{sorted(signature.parameters)}"
        )
    return static, signature, factory_name


def _is_stateful_schedule(value: Any) -> bool:
    """An object of :class:`~functrain.optim.stateful_hyperparams.StatefulSchedule`'s shape
    (``init``, ``update`` and a call of its state), which a step-count schedule is not."""
    return callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))


def _numeric_hparams(
    numeric: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """The injected numbers' initial state: tensors copied (never aliased, but not detached: a
    hypergradient w.r.t. a tensor learning rate goes through the copy), numbers cast."""
    return {
        k: v.clone() if isinstance(v, torch.Tensor) else _as_tensor(v, dtype, device)
        for k, v in numeric.items()
    }


def _check_hyperparam_keys(
    hyperparams: dict[str, Any],
    numeric: dict[str, Any],
    schedules: dict[str, Any],
    factory_name: str,
) -> None:
    """A state's ``hyperparams`` hold exactly the injected names."""
    missing = [k for k in numeric if k not in hyperparams]
    if missing:
        raise KeyError(f"state.hyperparams has no entry for {missing}")
    unknown = [k for k in hyperparams if k not in numeric and k not in schedules]
    if unknown:
        # A misspelt entry (``"lr"`` for ``"learning_rate"``) would otherwise be dropped
        # silently and the step run with the old value; optax fails here too.
        raise KeyError(
            f"state.hyperparams has entries {unknown} that {factory_name} does not "
            f"inject; the injected ones are {sorted([*numeric, *schedules])}"
        )


def _split_arguments(
    who: str,
    inner_factory: Callable[..., GradientTransformation],
    signature: inspect.Signature,
    static: set[str],
    integer_params: set[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Binds a call of the wrapped factory and sorts its arguments as optax does.

    Returns:
        ``(schedules, numeric, other)``: the callables that are not static, the numbers and
        tensors to inject, and the arguments passed as given.
    """
    factory_name = getattr(inner_factory, "__name__", type(inner_factory).__name__)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:  # name the factory and what it takes, not just "got ... 'x'"
        raise TypeError(
            f"{who}({factory_name}): {err}; {factory_name} takes {list(signature.parameters)}"
        ) from None
    bound.apply_defaults()
    arguments: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{who} cannot inject *args; pass keywords")
        else:
            arguments[name] = value
    schedules: dict[str, Callable[[Any], Any]] = {}
    numeric: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for name, value in arguments.items():
        if name in static or isinstance(value, bool):
            other[name] = value
        elif name in integer_params and _is_static_int(value):
            other[name] = int(value)
        elif callable(value):
            if who == "inject_hyperparams" and _is_stateful_schedule(value):
                raise TypeError(
                    f"{who}({factory_name}): {name} is a stateful schedule "
                    f"({type(value).__name__}, with init/update/__call__(state)); "
                    "inject_hyperparams takes schedules of the step count: use "
                    "ft.inject_stateful_hyperparams for stateful ones"
                )
            schedules[name] = value
        elif isinstance(value, (int, float, torch.Tensor)):
            numeric[name] = value
        else:
            other[name] = value

    # From init on the factory only sees tensors, which its checks do not inspect (that
    # would read device memory), so bad Python numbers are refused here, naming the
    # argument, as the plain factory would refuse them.
    for name, value in numeric.items():
        if isinstance(value, float) and not math.isfinite(value):  # ints are finite
            raise ValueError(f"{who}({factory_name}): {name} must be finite, got {value!r}")
    if not schedules:
        # The factory's own range checks (eta >= 0, 0 <= b1 < 1, ...). Skipped with
        # schedules: the factory need not accept a callable, or a stand-in value, there.
        inner_factory(**other, **numeric)
    return schedules, numeric, other


def inject_hyperparams(
    inner_factory: Callable[..., GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wraps an optimizer factory so that its numeric hyperparameters live in the state.

    ``inject_hyperparams(ft.adamw)(learning_rate=..., weight_decay=...)`` behaves like
    ``ft.adamw(...)`` (same numbers), but its state is an :class:`InjectHyperparamsState` whose
    ``hyperparams`` dict holds every numeric hyperparameter as a 0-d tensor:

    * read it for logging: ``state.hyperparams["learning_rate"]``;
    * change it between steps without rebuilding anything, by replacing the entry with a tensor
      of the same dtype and device; under ``torch.compile`` the new value is a new input, not a
      new constant, so nothing recompiles. ``fill_``-ing the entry works too, but ``update``
      passes an injected tensor on unchanged, so every earlier state holding it (a state kept
      for a rollback) changes with it;
    * a hyperparameter given as a schedule (a callable of the step count) is evaluated at
      ``count`` before every update and recorded in ``hyperparams``; overriding it there has no
      effect. An entry with any other name is refused (a misspelt name would do nothing).

    Which arguments are injected (as optax): booleans and the names in ``static_args`` are
    passed as given; integers for parameters declared ``int`` or ``bool`` (by annotation or an
    ``int`` default) stay Python ints; callables are schedules; other numbers and tensors are
    injected; anything else (``None``, dtypes, masks) is passed as given.

    Differences from optax: Python numbers become tensors of the floating ``hyperparam_dtype``
    (default: the widest floating dtype of the params, else of the updates, and at least
    float32), including an integer such as ``learning_rate=1``, so that a later fractional
    value fits. Tensors given by the caller are copied at ``init`` and keep their dtype. The
    state is an :class:`InjectHyperparamsState` ``(count, hyperparams, inner_state)``, the
    fields of optax's class of that name; optax >= 0.1.9 returns an
    ``InjectStatefulHyperparamsState`` whose fourth field, ``hyperparams_states``, holds the
    count again for every schedule (and the state of stateful schedules, which functrain does
    not have): schedules here are functions of ``count``, and three fields keep saved states
    loadable. PyTorch's closest equivalent is editing ``optimizer.param_groups[i]["lr"]``,
    which a compiled step treats as a constant.

    Args:
        inner_factory: a function returning a :class:`GradientTransformation`, such as
            ``ft.adamw``.
        static_args: names of callable arguments that are not schedules.
        hyperparam_dtype: floating dtype of the injected hyperparameters.

    Returns:
        A function with ``inner_factory``'s arguments that returns the wrapped transform.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.1)
        >>> params = {"w": torch.ones(2)}
        >>> state = tx.init(params)
        >>> state.hyperparams["learning_rate"]
        tensor(0.1000)
        >>> state.hyperparams["learning_rate"] = torch.tensor(0.5)
        >>> u, state = tx.update({"w": torch.ones(2)}, state, params)
        >>> u["w"]
        tensor([-0.5000, -0.5000])
    """
    static, signature, factory_name = _check_wrapper_args(
        "inject_hyperparams", inner_factory, static_args, hyperparam_dtype
    )
    integer_params = _integer_params(signature, inner_factory)

    @functools.wraps(inner_factory)
    def wrapped_transform(*args: Any, **kwargs: Any) -> GradientTransformation:
        schedules, numeric, other = _split_arguments(
            "inject_hyperparams", inner_factory, signature, static, integer_params, args, kwargs
        )

        def build(hparams: dict[str, torch.Tensor]) -> GradientTransformation:
            return inner_factory(**other, **hparams)

        def init_fn(params: Any) -> InjectHyperparamsState:
            count = _utils.zero_count(params)
            dtype = _dtype(hyperparam_dtype, params)
            device = count.device
            hparams = _numeric_hparams(numeric, dtype, device)
            hparams.update(
                {k: _scheduled(k, f(count), dtype, device) for k, f in schedules.items()}
            )
            return InjectHyperparamsState(count, hparams, build(hparams).init(params))

        def prepare(
            updates: Any, state: InjectHyperparamsState, params: Any
        ) -> tuple[dict[str, torch.Tensor], GradientTransformation]:
            """The current hyperparameters and the inner transform built with them."""
            if not isinstance(state, InjectHyperparamsState):
                raise TypeError(
                    f"inject_hyperparams expects an InjectHyperparamsState, got "
                    f"{type(state).__name__}"
                )
            _check_hyperparam_keys(state.hyperparams, numeric, schedules, factory_name)
            dtype = _dtype(hyperparam_dtype, params, updates)
            device = state.count.device
            hparams = {k: _as_tensor(state.hyperparams[k], dtype, device) for k in numeric}
            hparams.update(
                {
                    k: _scheduled(k, f(state.count), _recorded(state, k, dtype), device)
                    for k, f in schedules.items()
                }
            )
            return hparams, build(hparams)

        def update_fn(
            updates: Any, state: InjectHyperparamsState, params: Any = None, **extra: Any
        ) -> tuple[Any, InjectHyperparamsState]:
            hparams, inner = prepare(updates, state, params)
            if _takes_kwargs(inner.update):
                updates, inner_state = inner.update(updates, state.inner_state, params, **extra)
            else:
                updates, inner_state = inner.update(updates, state.inner_state, params)
            new_state = InjectHyperparamsState(
                _utils.safe_increment(state.count), hparams, inner_state
            )
            return updates, new_state

        spec = fused.Injected(prepare, inner_factory, other, numeric, schedules)
        return fused.register(GradientTransformation(init_fn, update_fn), spec)

    return wrapped_transform
