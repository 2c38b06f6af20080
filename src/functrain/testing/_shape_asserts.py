"""Shape and rank assertions on a tensor or a list of tensors (chex's ``assert_shape``).

Re-exported by :mod:`functrain.testing._assertions`.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "assert_rank",
    "assert_shape",
]


def _tensor_list(tensors: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def _dims_match(expected: Sequence[Any], dims: Sequence[int]) -> bool:
    return len(expected) == len(dims) and all(
        s is None or (d in s if isinstance(s, (set, frozenset)) else d == s)
        for s, d in zip(expected, dims)
    )


def assert_shape(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    shape: Sequence[int | set[int] | types.EllipsisType | None],
) -> None:
    """Asserts each tensor has ``shape``; ``None`` matches any size, a set any of its sizes.

    One ``...`` matches any number of dimensions, as in chex: ``(..., 3)`` is any tensor whose
    last dimension is 3 (a 1-d tensor of size 3 included).

    Args:
        tensors: a tensor or a sequence of tensors, each checked.
        shape: one entry per dimension: an int, ``None`` (any size), a set of sizes, or one
            ``...`` standing for any number of dimensions.

    Raises:
        AssertionError: ``tensor <i> has shape <shape>, expected <shape>`` for the first
            tensor (``i`` its index in ``tensors``) that does not match.
        ValueError: if ``shape`` holds more than one ``...``.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_shape(torch.ones(2, 3), (None, 3))
        >>> testing.assert_shape([torch.ones(2, 3), torch.ones(5, 4)], (None, {3, 4}))
        >>> testing.assert_shape([torch.ones(3), torch.ones(7, 2, 3)], (..., 3))
        >>> try:
        ...     testing.assert_shape(torch.ones(2, 3), (2, 4))
        ... except AssertionError as err:
        ...     print(err)
        tensor 0 has shape (2, 3), expected (2, 4)
    """
    shape = tuple(shape)
    ellipses = [i for i, s in enumerate(shape) if s is Ellipsis]
    if len(ellipses) > 1:
        raise ValueError(f"a shape may hold at most one '...', got {shape}")
    for i, t in enumerate(_tensor_list(tensors)):
        dims = tuple(t.shape)
        if ellipses:
            head, tail = shape[: ellipses[0]], shape[ellipses[0] + 1 :]
            ok = (
                len(dims) >= len(head) + len(tail)
                and _dims_match(head, dims[: len(head)])
                and _dims_match(tail, dims[len(dims) - len(tail) :])
            )
        else:
            ok = _dims_match(shape, dims)
        if not ok:
            expected = str(shape).replace("Ellipsis", "...")
            raise AssertionError(f"tensor {i} has shape {dims}, expected {expected}")


def assert_rank(tensors: torch.Tensor | Sequence[torch.Tensor], rank: int | set[int]) -> None:
    """Asserts each tensor's number of dimensions is ``rank`` (or one of a set of ranks).

    Args:
        tensors: a tensor or a sequence of tensors, each checked.
        rank: the allowed number of dimensions, or a set of them.

    Raises:
        AssertionError: ``tensor <i> has rank <r>, expected [<allowed ranks>]`` for the
            first tensor (``i`` its index in ``tensors``) of another rank.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_rank([torch.ones(2, 3), torch.ones(4, 1)], 2)
        >>> try:
        ...     testing.assert_rank(torch.ones(2), {0, 2})
        ... except AssertionError as err:
        ...     print(err)
        tensor 0 has rank 1, expected [0, 2]
    """
    allowed = {rank} if isinstance(rank, int) else set(rank)
    for i, t in enumerate(_tensor_list(tensors)):
        if t.dim() not in allowed:
            raise AssertionError(f"tensor {i} has rank {t.dim()}, expected {sorted(allowed)}")
