"""Accumulators of :mod:`functrain.microbatching`: the public :class:`Accumulator` and
:class:`AccumulationType` (re-exported there) and the built-in accumulations (sum, mean,
running mean, concat), composed over a pytree of outputs.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, TypeAlias

import torch

from functrain import tree as _tree

AccumulatorTree: TypeAlias = Any
PyTreeFn: TypeAlias = Callable[[Any], Any]
UpdateFn: TypeAlias = Callable[[Any, Any, int], Any]


@dataclasses.dataclass(frozen=True)
class Accumulator:
    """How the outputs ``x_0, ..., x_{n-1}`` of the micro-batches are combined.

    The microbatched function runs::

        carry = init(x_0)
        for i in range(n):
            carry = update(carry, x_i, i)
        return finalize(carry)

    Attributes:
        init: ``f(value)``: the initial state, from the first micro-batch's output (only its
            structure, shapes and dtypes should matter).
        update: ``f(carry, value, index)``: the state after micro-batch ``index`` (a Python
            int).
        finalize: ``f(carry)``: the result from the final state.
        aggregate: ``f(per_example_values)``: reduces a leading batch axis in one go (what
            :func:`micro_vmap` does inside a micro-batch).

    Example:
        >>> import torch
        >>> import functrain.microbatching as mb
        >>> maximum = mb.Accumulator(
        ...     init=lambda v: torch.full_like(v, -torch.inf),
        ...     update=lambda c, v, i: torch.maximum(c, v),
        ...     finalize=lambda c: c,
        ...     aggregate=lambda v: v.amax(0),
        ... )
        >>> mb.microbatch(lambda x: x.max(), 0, 2, maximum)(torch.tensor([1.0, 5.0, 2.0, 3.0]))
        tensor(5.)
    """

    init: PyTreeFn
    update: UpdateFn
    finalize: PyTreeFn
    aggregate: PyTreeFn


class AccumulationType(enum.Enum):
    """The built-in accumulations (optax's members and values).

    Example:
        >>> import functrain.microbatching as mb
        >>> [t.name for t in mb.AccumulationType]
        ['MEAN', 'SUM', 'RUNNING_MEAN', 'CONCAT']
    """

    MEAN = enum.auto()
    """Average of the micro-batch outputs (divided by all micro-batches)."""
    SUM = enum.auto()
    """Sum of the micro-batch outputs."""
    RUNNING_MEAN = enum.auto()
    """Average of the micro-batch outputs over the ``num_real_microbatches`` real ones."""
    CONCAT = enum.auto()
    """The micro-batch outputs concatenated along axis 0, rows in the original order."""


def _check_tensor(value: Any, kind: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"AccumulationType.{kind} needs tensor outputs, got {type(value).__name__}")
    return value


def _check_floating(value: Any) -> torch.Tensor:
    if not _check_tensor(value, "MEAN/RUNNING_MEAN").is_floating_point():
        raise ValueError(
            f"MEAN and RUNNING_MEAN Accumulators require floating-point values, got {value.dtype}"
        )
    return value


def _lift(acc: Accumulator) -> Accumulator:
    """A leaf-wise Accumulator applied to every leaf of a (sub)tree."""
    return Accumulator(
        lambda value: _tree.map(acc.init, value),
        # The value leads: a carry leaf may be an object (CONCAT's slots) but sits where the
        # value has a leaf.
        lambda carry, value, i: _tree.map(lambda v, c: acc.update(c, v, i), value, carry),
        lambda carry: _tree.map(acc.finalize, carry),
        lambda values: _tree.map(acc.aggregate, values),
    )


def _compose(accumulators: AccumulatorTree) -> Accumulator:
    """One Accumulator from a pytree of them, each applied to its subtree of the output."""
    accs, spec = _tree.flatten(accumulators)
    names = ("accumulator", "output")

    def up_to(x: Any) -> list[Any]:
        return _tree.flatten_up_to(spec, x, names, accumulators)

    return Accumulator(
        lambda values: _tree.unflatten(spec, [a.init(v) for a, v in zip(accs, up_to(values))]),
        lambda carry, value, i: _tree.unflatten(
            spec,
            [a.update(c, v, i) for a, c, v in zip(accs, spec.flatten_up_to(carry), up_to(value))],
        ),
        lambda carry: _tree.unflatten(
            spec, [a.finalize(c) for a, c in zip(accs, spec.flatten_up_to(carry))]
        ),
        lambda values: _tree.unflatten(spec, [a.aggregate(v) for a, v in zip(accs, up_to(values))]),
    )


# bool and integers narrower than 32 bits, which jnp.sum sums in (at least) 32 bits.
_NARROW = (torch.bool, torch.uint8, torch.int8, torch.int16)


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    """``jnp.sum(x, axis=0)``: a float, complex or 32/64-bit integer dtype is kept (torch
    would sum int32 into int64); bool and narrower integers are summed in int32, so that a
    ``SUM`` over per-example booleans counts them (a bool sum would be their ``any``) and
    uint8 rows do not wrap around at 256."""
    return x.sum(0, dtype=torch.int32 if x.dtype in _NARROW else x.dtype)


def _mean_rows(x: Any) -> torch.Tensor:
    """``jnp.mean(x, axis=0)``: integer and bool values are averaged in the default float
    dtype (as jnp.mean promotes them), so MEAN / RUNNING_MEAN in :func:`micro_vmap` accept
    per-example integers or booleans (e.g. accuracies), as in optax."""
    x = _check_tensor(x, "MEAN/RUNNING_MEAN")
    if x.is_floating_point() or x.is_complex():
        return x.mean(0)
    return x.mean(0, dtype=torch.get_default_dtype())


def _sum() -> Accumulator:
    return _lift(
        Accumulator(
            init=lambda v: torch.zeros_like(_check_tensor(v, "SUM")),
            update=lambda carry, value, _: carry + value,
            finalize=lambda x: x,
            aggregate=lambda x: _sum_rows(_check_tensor(x, "SUM")),
        )
    )


def _mean(num_microbatches: int) -> Accumulator:
    if num_microbatches <= 0:
        raise ValueError(f"num_microbatches={num_microbatches} must be positive.")
    return _lift(
        Accumulator(
            init=lambda v: torch.zeros_like(_check_floating(v)),
            update=lambda carry, value, _: carry + value,
            finalize=lambda carry: carry / num_microbatches,
            aggregate=_mean_rows,
        )
    )


def _running_mean() -> Accumulator:
    def update(carry: torch.Tensor, value: torch.Tensor, index: int) -> torch.Tensor:
        p = index / (index + 1)
        return carry * p + value * (1 - p)

    return _lift(
        Accumulator(
            init=lambda v: torch.zeros_like(_check_floating(v)),
            update=update,
            finalize=lambda x: x,
            aggregate=_mean_rows,
        )
    )


class _Slots:
    """CONCAT's carry for one leaf: the n micro-batch outputs (a pytree leaf for optree).

    Keeping them apart (rather than writing into one (n, ...) buffer) keeps ``update`` pure
    without copying the whole buffer per micro-batch; ``finalize`` stacks them once.
    """

    __slots__ = ("values",)

    def __init__(self, values: tuple[torch.Tensor, ...]) -> None:
        self.values = values

    def where(self, keep: torch.Tensor, old: _Slots) -> _Slots:
        """Slots where each changed slot is ``self``'s if ``keep`` else ``old``'s."""
        return _Slots(
            tuple(
                a if a is b else torch.where(keep.to(a.device), a, b)
                for a, b in zip(self.values, old.values)
            )
        )


def _concat(num_microbatches: int) -> Accumulator:
    if num_microbatches <= 0:
        raise ValueError(f"num_microbatches={num_microbatches} must be positive.")

    def init(value: Any) -> _Slots:
        zeros = torch.zeros_like(_check_tensor(value, "CONCAT"))
        return _Slots((zeros,) * num_microbatches)

    def update(carry: _Slots, value: torch.Tensor, index: int) -> _Slots:
        return _Slots((*carry.values[:index], value, *carry.values[index + 1 :]))

    def finalize(carry: _Slots) -> torch.Tensor:
        values = carry.values
        if values[0].dim() == 0:
            return torch.stack(values)
        # Row b of micro-batch a is row a + n*b of the batch: stack at dim 1, then merge.
        return torch.stack(values, 1).flatten(0, 1)

    return _lift(Accumulator(init, update, finalize, lambda x: x))


def _canonicalize(accumulator: AccumulatorTree, num_microbatches: int) -> Accumulator:
    """An Accumulator from a pytree of Accumulators / AccumulationTypes."""

    def one(acc: Any) -> Accumulator:
        if isinstance(acc, Accumulator):
            return acc
        if acc is AccumulationType.MEAN:
            return _mean(num_microbatches)
        if acc is AccumulationType.SUM:
            return _sum()
        if acc is AccumulationType.RUNNING_MEAN:
            return _running_mean()
        if acc is AccumulationType.CONCAT:
            return _concat(num_microbatches)
        raise ValueError(f"Unknown accumulator: {acc!r}")

    return _compose(_tree.map(one, accumulator))


def _select(keep: torch.Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``keep`` (a 0-d bool tensor) else ``old``, leaf by leaf, on the device."""

    def one(n: Any, o: Any) -> Any:
        if isinstance(n, _Slots):
            return n.where(keep, o)
        return torch.where(keep.to(n.device), n, o)

    return _tree.map(one, new, old)
