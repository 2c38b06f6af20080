"""Pytree assertions on structure, leaf shapes and leaf dtypes, and the leaf pairing they share.

Re-exported by :mod:`functrain.testing._assertions`, whose value assertions build on the
helpers here.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from functrain import tree

__all__ = [
    "assert_trees_all_equal_dtypes",
    "assert_trees_all_equal_shapes",
    "assert_trees_all_equal_structs",
]


def _as_tensor(x: Any) -> torch.Tensor:
    # Python numbers and NumPy arrays are compared like the tensors they would become.
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _numeric(x: Any) -> bool:
    """Whether a leaf compares as a tensor: a tensor, a Python number or an array-like."""
    return isinstance(x, (torch.Tensor, bool, int, float, complex)) or hasattr(x, "__array__")


def _check_opaque(path: tuple[Any, ...], x: Any, y: Any) -> None:
    """Leaves that are not numbers (strings, enums, ...) must be of one type and ``==``."""
    if type(x) is not type(y) or not bool(x == y):
        raise AssertionError(f"leaves differ at {tree.path_str(path)}: {x!r} vs {y!r}")


def _check_two_or_more(trees: tuple[Any, ...]) -> None:
    # One tree compares against nothing and would always pass: a tuple passed as a single
    # argument, ``assert_trees_all_close((a, b))``, is a typo that must not hide a difference.
    if len(trees) < 2:
        raise ValueError(f"the assertion needs at least two trees to compare, got {len(trees)}")


def _node_kind(spec: optree.PyTreeSpec) -> str:
    if spec.is_leaf():
        return "a leaf"
    if spec.type is type(None):
        return "None"
    return f"a {spec.type.__qualname__}"


def _spec_difference(sa: optree.PyTreeSpec, sb: optree.PyTreeSpec, path: tuple[Any, ...]) -> str:
    """Names the first path where two treespecs differ ("" when no node differs visibly)."""
    if sa.is_leaf() and sb.is_leaf():
        return ""
    at_a, at_b = tree.path_str(path, "a"), tree.path_str(path, "b")
    if sa.is_leaf() or sb.is_leaf() or sa.type is not sb.type:
        return f"{at_a} is {_node_kind(sa)} but {at_b} is {_node_kind(sb)}"
    entries_a, entries_b = list(sa.entries()), list(sb.entries())
    if entries_a != entries_b:
        for e in entries_a:
            if e not in entries_b:
                return f"{tree.path_str((*path, e), 'a')} has no counterpart in b"
        for e in entries_b:
            if e not in entries_a:
                return f"{tree.path_str((*path, e), 'b')} has no counterpart in a"
        return f"{at_a} has keys {entries_a} but {at_b} has {entries_b}"
    for e, ca, cb in zip(entries_a, sa.children(), sb.children()):
        found = _spec_difference(ca, cb, (*path, e))
        if found:
            return found
    return ""


def _paired_leaves(a: Any, b: Any) -> list[tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]]:
    paths_a, leaves_a, spec_a = tree.flatten_with_paths(a)
    leaves_b, spec_b = tree.flatten(b)
    if spec_a != spec_b:
        where = _spec_difference(spec_a, spec_b, ()) or f"{spec_a} vs {spec_b}"
        raise AssertionError(f"tree structures differ: {where}")
    pairs = []
    for path, x, y in zip(paths_a, leaves_a, leaves_b):
        if _numeric(x) and _numeric(y):
            pairs.append((path, _as_tensor(x), _as_tensor(y)))
        else:  # a checkpointed str, say: compared here, skipped by the numeric checks
            _check_opaque(path, x, y)
    return pairs


def assert_trees_all_equal_structs(*trees: Any) -> None:
    """Asserts all trees have the same structure; names the first differing path.

    Leaves are not compared: only containers, keys and ``None`` placements.

    Args:
        *trees: two or more pytrees; each is compared with the first.

    Raises:
        AssertionError: ``tree structures differ: <path> ...``, naming the first path where a
            tree differs from the first one (missing key, ``None`` or leaf vs container).
        ValueError: if fewer than two trees are given (a single tuple compares nothing).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal_structs({"a": torch.ones(1)}, {"a": torch.zeros(3)})
        >>> try:
        ...     testing.assert_trees_all_equal_structs({"a": torch.ones(1)}, {"b": torch.ones(1)})
        ... except AssertionError as err:
        ...     print(err)
        tree structures differ: a['a'] has no counterpart in b
    """
    _check_two_or_more(trees)
    for other in trees[1:]:
        _paired_leaves(trees[0], other)


def _check_shape(path: tuple[Any, ...], x: torch.Tensor, y: torch.Tensor) -> None:
    if tuple(x.shape) != tuple(y.shape):
        raise AssertionError(
            f"shapes differ at {tree.path_str(path)}: {tuple(x.shape)} vs {tuple(y.shape)}"
        )


def assert_trees_all_equal_shapes(*trees: Any) -> None:
    """Asserts all trees have the same structure and leaf shapes.

    Leaves may be tensors, Python numbers or NumPy arrays (shape ``()`` for a number).

    Args:
        *trees: two or more pytrees; each is compared with the first.

    Raises:
        AssertionError: ``tree structures differ: ...`` as in
            :func:`assert_trees_all_equal_structs`, or ``shapes differ at <path>: (2,) vs
            (3,)`` for the first leaf whose shape differs.
        ValueError: if fewer than two trees are given (a single tuple compares nothing).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal_shapes([torch.ones(2)], [torch.zeros(2)])
        >>> try:
        ...     testing.assert_trees_all_equal_shapes([torch.ones(2)], [torch.zeros(3)])
        ... except AssertionError as err:
        ...     print(err)
        shapes differ at [0]: (2,) vs (3,)
    """
    _check_two_or_more(trees)
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_shape(path, x, y)


def _check_dtype(path: tuple[Any, ...], x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dtype != y.dtype:
        raise AssertionError(f"dtypes differ at {tree.path_str(path)}: {x.dtype} vs {y.dtype}")


def assert_trees_all_equal_dtypes(*trees: Any) -> None:
    """Asserts all trees have the same structure and leaf dtypes (shapes may differ).

    A Python number leaf has the dtype ``torch.as_tensor`` gives it (``1.0``: the default
    float dtype, ``1``: int64).

    Args:
        *trees: two or more pytrees; each is compared with the first.

    Raises:
        AssertionError: ``tree structures differ: ...`` as in
            :func:`assert_trees_all_equal_structs`, or ``dtypes differ at <path>:
            torch.float32 vs torch.float64`` for the first leaf whose dtype differs.
        ValueError: if fewer than two trees are given (a single tuple compares nothing).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal_dtypes([torch.ones(2)], [torch.zeros(3)])
        >>> try:
        ...     testing.assert_trees_all_equal_dtypes({"n": torch.ones(1)}, {"n": torch.ones(1).double()})
        ... except AssertionError as err:
        ...     print(err)
        dtypes differ at ['n']: torch.float32 vs torch.float64
    """
    _check_two_or_more(trees)
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_dtype(path, x, y)
