"""Splitting a batch pytree into micro-batches along its leading dimension.

A batch is any pytree of tensors sharing a leading (batch) dimension ``N``. ``micro_batches=K``
splits it as ``torch.tensor_split`` does: sizes differ by at most one, larger ones first (a batch
of 10 with ``K=4`` gives 3, 3, 2, 2). An explicit sequence of sizes (``(5, 3, 2)``) is also
accepted. Micro-batches are views: splitting copies nothing.

Example:
    >>> import torch, functrain as ft
    >>> split = ft.split_batch({"x": torch.zeros(10, 2)}, 4)
    >>> split.sizes
    (3, 3, 2, 2)
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence, Set
from typing import Any, NamedTuple

import torch

from functrain import tree

__all__ = ["BatchSplit", "split_batch"]


class BatchSplit(NamedTuple):
    """How a batch of ``total`` examples is cut.

    Micro-batch ``i`` is rows ``starts[i] : starts[i] + sizes[i]`` of every leaf.

    Example:
        >>> import torch
        >>> from functrain import split_batch
        >>> split = split_batch({"x": torch.arange(10)}, 4)
        >>> split.sizes, split.starts, split.num_micro_batches
        ((3, 3, 2, 2), (0, 3, 6, 8), 4)
    """

    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    total: int

    @property
    def num_micro_batches(self) -> int:
        """The number of micro-batches ``K``."""
        return len(self.sizes)


def batch_size(batch: Any) -> int:
    """The common leading size of all leaves; clear errors for non-tensors or mismatches."""
    leaves = tree.leaves(batch)
    # The common case checked without building path names (they are only needed for errors).
    if leaves and all(isinstance(x, torch.Tensor) and x.dim() for x in leaves):
        size = leaves[0].shape[0]
        if all(x.shape[0] == size for x in leaves):
            return size
    paths, leaves, _ = tree.flatten_with_paths(batch)
    if not leaves:
        raise ValueError("the batch has no tensors: it must be a pytree of tensors")
    size = None
    first = None
    for path, leaf in zip(paths, leaves):
        where = tree.path_str(path, "batch")
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{where} must be a tensor with a leading batch dimension, got "
                f"{type(leaf).__name__}"
            )
        if leaf.dim() == 0:
            raise ValueError(f"{where} is 0-d; every batch leaf needs a leading batch dimension")
        if size is None:
            size, first = leaf.shape[0], where
        elif leaf.shape[0] != size:
            raise ValueError(
                f"batch leaves have different leading (batch) sizes: {first} has {size}, "
                f"{where} has {leaf.shape[0]}"
            )
    assert size is not None
    return size


def split_batch(batch: Any, micro_batches: int | Sequence[int]) -> BatchSplit:
    """Plans the split of ``batch`` into micro-batches (validating the batch).

    Args:
        batch: pytree of tensors with a shared leading dimension.
        micro_batches: the number ``K`` of micro-batches, or their sizes.

    Returns:
        A :class:`BatchSplit` of Python ints: ``sizes`` (``K`` near-equal sizes, larger first,
        or the given ones), ``starts`` (their offsets) and ``total`` (the batch size). Only a
        plan: ``batch`` is neither copied nor sliced.

    Raises:
        ValueError: an empty batch (leading size 0), a batch without tensors or with a 0-d
            leaf, leaves with different leading sizes, ``K < 1``, more micro-batches than
            examples, non-positive sizes, or sizes that do not add up to the batch size.
        TypeError: a batch leaf that is not a tensor, or ``micro_batches`` neither an int nor
            a sequence of ints (a float size such as ``2.5`` is refused, not truncated).

    Example:
        >>> import torch, functrain as ft
        >>> ft.split_batch([torch.zeros(5)], (2, 3)).starts
        (0, 2)
    """
    n = batch_size(batch)
    if n == 0:
        raise ValueError("the batch is empty (leading size 0); a step needs at least one example")
    k = _as_int(micro_batches) if not isinstance(micro_batches, (Sequence, bool)) else None
    if k is not None:
        if k < 1:
            raise ValueError(f"micro_batches must be >= 1, got {k}")
        if k > n:
            raise ValueError(
                f"micro_batches={k} is more than the {n} examples in the batch; every "
                "micro-batch needs at least one example"
            )
        q, r = divmod(n, k)
        sizes = tuple(q + 1 if i < r else q for i in range(k))
    else:
        # Sets and dicts have no order of their own (a dict would give its keys): refused. So
        # are 0-d tensors that are not ints (iterating one raises an unrelated error).
        scalar_tensor = isinstance(micro_batches, torch.Tensor) and micro_batches.dim() == 0
        unordered = isinstance(micro_batches, (str, bytes, bool, Set, Mapping))
        if scalar_tensor or unordered or not isinstance(micro_batches, Iterable):
            raise TypeError(
                "micro_batches must be an int (the number of micro-batches) or a sequence of "
                f"ints (their sizes), got {micro_batches!r}"
            )
        as_ints = [_as_int(s) for s in micro_batches]
        if any(s is None for s in as_ints):
            raise TypeError(f"micro-batch sizes must be ints, got {tuple(micro_batches)}")
        sizes = tuple(s for s in as_ints if s is not None)
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"micro-batch sizes must be positive, got {sizes}")
        if sum(sizes) != n:
            raise ValueError(
                f"micro-batch sizes {sizes} add up to {sum(sizes)}, not the batch size {n}"
            )
    starts = tuple(sum(sizes[:i]) for i in range(len(sizes)))
    return BatchSplit(sizes, starts, n)


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer (numpy's and 0-d integer tensors too; not a bool,
    nor a bool tensor, which ``operator.index`` would read as 0 or 1), else ``None``.

    A tensor must be 0-d: ``operator.index(torch.tensor([4]))`` is 4, which read the sizes
    ``[4]`` as four micro-batches."""
    if isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.dim() != 0):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def micro_batch(batch: Any, split: BatchSplit, i: int) -> Any:
    """Micro-batch ``i`` (views of the batch leaves)."""
    start, size = split.starts[i], split.sizes[i]
    return tree.map(lambda x: x.narrow(0, start, size), batch)


def micro_batches(batch: Any, split: BatchSplit) -> Iterator[Any]:
    """Every micro-batch in order, as :func:`micro_batch` gives them (one flatten in all)."""
    leaves, spec = tree.flatten(batch)
    for start, size in zip(split.starts, split.sizes):
        yield tree.unflatten(spec, [x.narrow(0, start, size) for x in leaves])


def size_groups(split: BatchSplit) -> list[tuple[int, list[int]]]:
    """Micro-batch indices grouped by size, in order of first appearance (for stacking)."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(split.sizes):
        groups.setdefault(s, []).append(i)
    return list(groups.items())


def stack(batch: Any, split: BatchSplit, indices: Sequence[int]) -> Any:
    """Micro-batches ``indices`` (all of one size) stacked along a new leading dimension.

    Consecutive micro-batches are a view of the batch; others are copied by ``torch.stack``.
    """
    size = split.sizes[indices[0]]
    start = split.starts[indices[0]]
    if all(split.starts[j] == start + k * size for k, j in enumerate(indices)):
        count = len(indices)
        return tree.map(
            lambda x: x.narrow(0, start, count * size).unflatten(0, (count, size)), batch
        )
    return tree.map(
        lambda x: torch.stack([x.narrow(0, split.starts[j], size) for j in indices]), batch
    )
