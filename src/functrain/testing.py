"""chex-like assertions for pytrees of tensors.

Failures name the pytree path and the worst element, e.g.::

    AssertionError: trees differ at ['fc']['weight'] (shape (3, 4), float32): max |a-b| = 0.5
    at index (2, 1) (a=1.5, b=1.0); allowed atol=1e-06 + rtol=1e-05*|b|

Example:
    >>> import torch
    >>> from functrain import testing
    >>> testing.assert_trees_all_close({"w": torch.ones(2)}, {"w": torch.ones(2) + 1e-9})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from functrain import tree

__all__ = [
    "assert_rank",
    "assert_shape",
    "assert_tree_all_finite",
    "assert_trees_all_close",
    "assert_trees_all_equal",
    "assert_trees_all_equal_dtypes",
    "assert_trees_all_equal_shapes",
    "assert_trees_all_equal_structs",
]


def _paired_leaves(a: Any, b: Any) -> list[tuple[tuple[Any, ...], Any, Any]]:
    paths_a, leaves_a, spec_a = tree.flatten_with_paths(a)
    leaves_b, spec_b = tree.flatten(b)
    if spec_a != spec_b:
        try:
            tree.flatten_up_to(spec_a, b, ("a", "b"), a)
        except tree.TreeMismatchError as err:
            raise AssertionError(str(err)) from None
        raise AssertionError(f"tree structures differ: {spec_a} vs {spec_b}")
    return list(zip(paths_a, leaves_a, leaves_b))


def assert_trees_all_equal_structs(*trees: Any) -> None:
    """Asserts all trees have the same structure; names the first differing path.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal_structs({"a": torch.ones(1)}, {"a": torch.zeros(3)})
    """
    for other in trees[1:]:
        _paired_leaves(trees[0], other)


def assert_trees_all_equal_shapes(*trees: Any) -> None:
    """Asserts same structure and leaf shapes.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal_shapes([torch.ones(2)], [torch.zeros(2)])
    """
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            if tuple(x.shape) != tuple(y.shape):
                raise AssertionError(
                    f"shapes differ at {tree.path_str(path)}: {tuple(x.shape)} vs {tuple(y.shape)}"
                )


def assert_trees_all_equal_dtypes(*trees: Any) -> None:
    """Asserts same structure and leaf dtypes.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal_dtypes([torch.ones(2)], [torch.zeros(3)])
    """
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            if x.dtype != y.dtype:
                raise AssertionError(
                    f"dtypes differ at {tree.path_str(path)}: {x.dtype} vs {y.dtype}"
                )


def _describe_worst(path: Any, x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> str:
    xd, yd = x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)
    diff = (xd - yd).abs()
    diff = torch.where(torch.isnan(xd) ^ torch.isnan(yd), torch.full_like(diff, float("inf")), diff)
    excess = diff - (atol + rtol * yd.abs())
    flat = int(torch.nan_to_num(excess, nan=-1.0).reshape(-1).argmax()) if excess.numel() else 0
    index = (
        tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape)) if x.dim() else ()
    )
    return (
        f"trees differ at {tree.path_str(path)} (shape {tuple(x.shape)}, {x.dtype}): "
        f"max |a-b| = {float(diff.max()) if diff.numel() else 0.0:.6g} at index {index} "
        f"(a={xd[index].item():.10g}, b={yd[index].item():.10g}); "
        f"allowed atol={atol:g} + rtol={rtol:g}*|b|"
    )


def assert_trees_all_close(
    *trees: Any, rtol: float = 1e-6, atol: float = 0.0, equal_nan: bool = True
) -> None:
    """Asserts all trees are element-wise close to the first: ``|a - b| <= atol + rtol·|b|``.

    Shapes must match; dtypes may differ (values are compared in float64 on the CPU).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_close([torch.tensor([1.0])], [torch.tensor([1.0 + 1e-7])])
    """
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            if tuple(x.shape) != tuple(y.shape):
                raise AssertionError(
                    f"shapes differ at {tree.path_str(path)}: {tuple(x.shape)} vs {tuple(y.shape)}"
                )
            xd = x.detach().to("cpu", torch.float64)
            yd = y.detach().to("cpu", torch.float64)
            if not torch.allclose(xd, yd, rtol=rtol, atol=atol, equal_nan=equal_nan):
                raise AssertionError(_describe_worst(path, x, y, rtol, atol))


def assert_trees_all_equal(*trees: Any) -> None:
    """Asserts all trees are bit-for-bit equal to the first (same dtypes, NaNs equal).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal({"a": torch.arange(3)}, {"a": torch.arange(3)})
    """
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            if x.dtype != y.dtype:
                raise AssertionError(
                    f"dtypes differ at {tree.path_str(path)}: {x.dtype} vs {y.dtype}"
                )
            if tuple(x.shape) != tuple(y.shape) or not torch.equal(
                torch.nan_to_num(x.detach().cpu()) if x.is_floating_point() else x.detach().cpu(),
                torch.nan_to_num(y.detach().cpu()) if y.is_floating_point() else y.detach().cpu(),
            ):
                raise AssertionError(_describe_worst(path, x, y, 0.0, 0.0))


def assert_tree_all_finite(tree_: Any) -> None:
    """Asserts no leaf holds NaN or infinity; names the first offending path.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_tree_all_finite({"a": torch.ones(2)})
    """
    paths, leaves, _ = tree.flatten_with_paths(tree_)
    for path, x in zip(paths, leaves):
        if x.is_floating_point() or x.is_complex():
            bad = ~torch.isfinite(x.detach())
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0]) if x.dim() else ()
                raise AssertionError(
                    f"non-finite value at {tree.path_str(path)}{list(index)}: {x[index].item()}"
                )


def assert_shape(
    tensors: torch.Tensor | Sequence[torch.Tensor], shape: Sequence[int | None]
) -> None:
    """Asserts each tensor has ``shape``; ``None`` entries match any size.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_shape(torch.ones(2, 3), (None, 3))
    """
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    for i, t in enumerate(items):
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
        if not ok:
            raise AssertionError(f"tensor {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def assert_rank(tensors: torch.Tensor | Sequence[torch.Tensor], rank: int | set[int]) -> None:
    """Asserts each tensor's number of dimensions is ``rank`` (or one of a set of ranks).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_rank([torch.ones(2, 3), torch.ones(4, 1)], 2)
    """
    items = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    allowed = {rank} if isinstance(rank, int) else set(rank)
    for i, t in enumerate(items):
        if t.dim() not in allowed:
            raise AssertionError(f"tensor {i} has rank {t.dim()}, expected {sorted(allowed)}")
