"""Private helpers shared by transforms: counters, hyperparameters, leaf lists."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

from functrain import _foreach, tree

Scalar = float | int | torch.Tensor
ScalarOrSchedule = Scalar | Callable[[Any], Scalar]

INT32_MAX = 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def default_device(params: Any) -> torch.device:
    """The device of the first tensor leaf of ``params``; CPU when there is none."""
    for leaf in tree.leaves(params):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def zero_count(params: Any) -> torch.Tensor:
    """An int32 step counter on the params' device, as optax's ``jnp.zeros([], jnp.int32)``."""
    return torch.zeros((), dtype=torch.int32, device=default_device(params))


def safe_increment(count: torch.Tensor) -> torch.Tensor:
    """``count + 1`` that saturates at the int32 maximum instead of wrapping around.

    optax's ``safe_int32_increment``; a narrower integer count (int16, uint8, …) saturates at
    its own maximum, where ``count + 1`` would otherwise wrap to a negative (or zero) count.
    """
    limit = _LIMITS.get(count.dtype)
    if limit is None:
        limit = _limit(count.dtype)
        # Not while compiling: dynamo guards on the dict's contents, so filling it during the
        # first trace recompiled the step at its second call.
        if not torch.compiler.is_compiling():
            _LIMITS[count.dtype] = limit
    return torch.where(count < limit, count + 1, count)


def _limit(dtype: torch.dtype) -> int:
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return INT32_MAX
    return min(INT32_MAX, torch.iinfo(dtype).max)


# Per dtype, as it runs once per transform per step: torch.iinfo costs microseconds. Filled
# ahead for the usual counters, so that a compiled step never finds it changed.
_LIMITS: dict[torch.dtype, int] = {
    d: _limit(d) for d in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)
}


def resolve(value: ScalarOrSchedule, count: torch.Tensor) -> Scalar:
    """Evaluates a schedule at ``count``; returns numbers and tensors unchanged."""
    return value(count) if callable(value) else value


def float_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """The widest floating dtype among ``leaves`` (float32 when there is none)."""
    dtype = None
    for leaf in leaves:
        if leaf.is_floating_point():
            dtype = leaf.dtype if dtype is None else torch.promote_types(dtype, leaf.dtype)
    return dtype or torch.float32


def power(base: Scalar, count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``base ** count`` as a 0-d tensor of ``dtype`` on ``count``'s device (no host sync)."""
    exponent = count.to(dtype)
    if isinstance(base, torch.Tensor):
        return torch.pow(base.to(dtype=dtype, device=count.device), exponent)
    # A Python base stays a scalar argument: building a device tensor from it would be a
    # host-to-device copy on every step.
    return torch.pow(base, exponent)


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy real scalar (``int``, ``float``, ``np.float32``,
    ``np.int64``, …) and not a boolean.

    NumPy scalars are legal hyperparameters (optax takes them; torch's scalar arguments read
    them as numbers), so they must not be refused as "not a number". A bool is no number here:
    ``sgd(True)`` would silently mean a learning rate of 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False  # NumPy's bool is no ``numbers.Real``
    # ``fractions.Fraction`` is a ``numbers.Real`` that torch's scalar arguments refuse.
    return isinstance(value, (int, float)) or type(value).__module__ == "numpy"


def check_finite_number(name: str, value: Any, *, minimum: float | None = None) -> None:
    """Validates a real-number hyperparameter at construction (tensors and schedules pass).

    Python and NumPy scalars are checked (see :func:`is_real_number`); booleans are refused.
    An integer beyond int64's range (``10**400``) is refused: torch cannot take it as a scalar,
    so the update would otherwise fail at its first step.
    """
    if callable(value) or isinstance(value, torch.Tensor):
        return
    if not is_real_number(value):  # a bool, NumPy's bool included, is refused here too
        raise TypeError(f"{name} must be a number, a tensor or a schedule, got {value!r}")
    if isinstance(value, numbers.Integral) and not _INT64_MIN <= value <= _INT64_MAX:
        # torch's scalar arguments take integers as int64: the update would fail converting
        # it (OverflowError, or a TypeError for a NumPy uint64) at its first step.
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}…"
        raise ValueError(
            f"{name}={shown} is an integer beyond int64's range, which torch cannot take as "
            "a scalar; pass it as a float"
        )
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def flat(
    updates: Any, state_trees: dict[str, Any], constants: tuple[str, ...] = ("params",)
) -> tuple[list[torch.Tensor], Any, dict]:
    r"""Flattens ``updates`` and checks each state tree has its structure and shapes.

    Returns the update leaves, the treespec, and the leaves of each named state tree. Update
    leaves must be floating-point (or complex) tensors. Mismatches raise :class:`functrain.tree.TreeMismatchError` naming the path.
    The trees named in ``constants`` (functions of the parameters only: the params, a copy of
    the initial ones) come back detached when the update is not differentiated
    (:func:`functrain._foreach.constants`: ``nn.Parameter``\ s in a torch-style loop).
    """
    fast = _flat_plain(updates, state_trees)
    if fast is None:
        fast = _flat_checked(updates, state_trees)
    leaves, spec, out = fast
    for name in constants:
        if name in out:
            out[name] = _foreach.constants(leaves, out[name])
    return leaves, spec, out


def initial_copy(x: Any) -> Any:
    """A copy of an initial parameter for a state (never aliasing the live one).

    Kept in the graph (a derivative w.r.t. the initial parameters goes through it, as in
    optax) except for an ``nn.Parameter``: that is a module's weight in a torch-style loop,
    not an input being differentiated, and its copy made every such state hold a graph
    (``copy.deepcopy(state)`` failed, later updates chained it). Differentiate w.r.t. a
    module's weights with ``torch.func`` or pass ``p.clone()`` / a plain tensor.

    Example:
        >>> import torch
        >>> from functrain.optim import _utils
        >>> _utils.initial_copy(torch.nn.Parameter(torch.ones(1))).requires_grad
        False
    """
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone() if isinstance(x, torch.nn.Parameter) else x.clone()


def constant_tree(values: Any, grads: Any = ()) -> Any:
    r"""``values`` (the params, or a function of them only) with its tensor leaves detached
    when an update of ``grads`` is not :func:`functrain._foreach.differentiated`, else
    ``values`` itself: :func:`flat`'s ``constants`` for a whole tree, e.g. the params an
    ``init`` measures or an objective is evaluated at (``nn.Parameter``\ s in a torch-style
    loop would otherwise leave a graph to the module's weights in the state).

    Example:
        >>> import torch
        >>> from functrain.optim import _utils
        >>> p = {"w": torch.nn.Parameter(torch.ones(2))}
        >>> _utils.constant_tree(p)["w"].requires_grad
        False
    """
    if not torch.is_grad_enabled():
        return values
    leaves, spec = tree.flatten(values)
    g = grads if isinstance(grads, list) else tree.leaves(grads)
    out = _foreach.constants(g, leaves)
    return values if out is leaves else tree.unflatten(spec, out)


def retree(original: Any, spec: Any, leaves: list[Any]) -> Any:
    """A state field that :func:`flat` may have detached (``constants``), as a tree again:
    ``leaves`` unflattened with ``spec`` when grad mode is on, else ``original`` as it was
    (nothing is detached under ``no_grad``, and the tree is not rebuilt)."""
    if not torch.is_grad_enabled():
        return original
    return tree.unflatten(spec, leaves)


def _flat_checked(
    updates: Any, state_trees: dict[str, Any]
) -> tuple[list[torch.Tensor], Any, dict]:
    """:func:`flat`'s general path: every check, naming the first problem's path."""
    paths, u_leaves, spec = tree.flatten_with_paths(updates)
    for p, u in zip(paths, u_leaves):
        if not isinstance(u, torch.Tensor) or not (u.is_floating_point() or u.is_complex()):
            got = u.dtype if isinstance(u, torch.Tensor) else type(u).__name__
            raise TypeError(
                f"{tree.path_str(p, 'updates')} must be a floating-point tensor, got {got}"
            )
    out = {}
    for name, other in state_trees.items():
        leaves = tree.flatten_up_to(spec, other, ("updates", name), updates)
        for p, u, s in zip(paths, u_leaves, leaves):
            if not isinstance(s, torch.Tensor):
                raise tree.TreeMismatchError(
                    f"{tree.path_str(p, name)} is {type(s).__name__}, not a tensor like "
                    f"{tree.path_str(p, 'updates')} (was the state made for these parameters, "
                    "with the same mask?)"
                )
            if isinstance(u, torch.Tensor) and s.shape != u.shape:
                raise tree.TreeMismatchError(
                    f"{tree.path_str(p, 'updates')}: shape {tuple(u.shape)} does not match "
                    f"{tree.path_str(p, name)} shape {tuple(s.shape)}"
                )
        out[name] = leaves
    return u_leaves, spec, out


def _flat_plain(updates: Any, state_trees: dict[str, Any]) -> tuple[list, Any, dict] | None:
    """:func:`flat` for plain containers that pass every check, else ``None`` (the general
    path then finds and names the problem). Saves optree's per-leaf cost on the hot path."""
    from functrain.optim import _ops

    leaves = _ops.plain_leaves(updates)
    if leaves is None or not all(u.is_floating_point() or u.is_complex() for u in leaves):
        return None
    shapes = [u.shape for u in leaves]
    out = {}
    for name, other in state_trees.items():
        other_leaves = _ops.plain_leaves(other)
        if (
            other_leaves is None
            or not _ops.same_container(updates, other)
            or [s.shape for s in other_leaves] != shapes
        ):
            return None
        out[name] = other_leaves
    return leaves, tree.structure(updates), out


def complex_leaf(values: Any, root: str) -> tuple[str, torch.dtype] | None:
    """The path (named from ``root``) and dtype of the first complex tensor leaf of
    ``values``, or ``None``: for the transforms that refuse complex leaves by name."""
    leaves = tree.leaves(values)
    if not any(isinstance(x, torch.Tensor) and x.is_complex() for x in leaves):
        return None
    paths, leaves, _ = tree.flatten_with_paths(values)
    path, x = next(
        (p, x) for p, x in zip(paths, leaves) if isinstance(x, torch.Tensor) and x.is_complex()
    )
    return tree.path_str(path, root), x.dtype


def loss_value(value: torch.Tensor, grads: Any, params: Any = ()) -> torch.Tensor:
    r"""The ``value=`` loss of an update: kept in the graph when the update is
    :func:`functrain._foreach.differentiated` (a ``torch.func`` ``grad``/``jvp``, tracked
    gradients, params computed by a tracked step: the step size then depends on the loss, as
    under optax's ``jax.grad``), else detached, so that a torch-style loop passing a loss that
    still has its graph does not chain every step's graph into the updates and the state (a
    loss average in the state would keep them all). Params that merely require grad
    (``nn.Parameter``\ s) do not count: they kept the whole forward graph in momo's state."""
    g = grads if isinstance(grads, list) else tree.leaves(grads)
    p = params if isinstance(params, list) else tree.leaves(params)
    return value if _foreach.differentiated(g, p) else value.detach()
