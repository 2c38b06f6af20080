"""Pytree assertions that name the path and the worst element on failure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from functrain import tree

__all__ = [
    "assert_rank",
    "assert_shape",
    "assert_tree_all_finite",
    "assert_tree_on_device",
    "assert_trees_all_close",
    "assert_trees_all_equal",
    "assert_trees_all_equal_dtypes",
    "assert_trees_all_equal_shapes",
    "assert_trees_all_equal_structs",
]


def _as_tensor(x: Any) -> torch.Tensor:
    # Python numbers and NumPy arrays are compared like the tensors they would become.
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _paired_leaves(a: Any, b: Any) -> list[tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]]:
    paths_a, leaves_a, spec_a = tree.flatten_with_paths(a)
    leaves_b, spec_b = tree.flatten(b)
    if spec_a != spec_b:
        try:
            up_to = tree.flatten_up_to(spec_a, b, ("a", "b"), a)
        except tree.TreeMismatchError as err:
            raise AssertionError(str(err)) from None
        # b fits a's structure only because it holds None (an empty subtree) at a leaf of a.
        for path, leaf in zip(paths_a, up_to):
            if leaf is None:
                raise AssertionError(
                    f"tree structures differ: {tree.path_str(path, 'a')} is a leaf but "
                    f"{tree.path_str(path, 'b')} is None"
                )
        raise AssertionError(f"tree structures differ: {spec_a} vs {spec_b}")
    return [(p, _as_tensor(x), _as_tensor(y)) for p, x, y in zip(paths_a, leaves_a, leaves_b)]


def assert_trees_all_equal_structs(*trees: Any) -> None:
    """Asserts all trees have the same structure; names the first differing path.

    Leaves are not compared: only containers, keys and ``None`` placements.

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
    for other in trees[1:]:
        _paired_leaves(trees[0], other)


def _check_shape(path: tuple[Any, ...], x: torch.Tensor, y: torch.Tensor) -> None:
    if tuple(x.shape) != tuple(y.shape):
        raise AssertionError(
            f"shapes differ at {tree.path_str(path)}: {tuple(x.shape)} vs {tuple(y.shape)}"
        )


def assert_trees_all_equal_shapes(*trees: Any) -> None:
    """Asserts all trees have the same structure and leaf shapes.

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
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_shape(path, x, y)


def _check_dtype(path: tuple[Any, ...], x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dtype != y.dtype:
        raise AssertionError(f"dtypes differ at {tree.path_str(path)}: {x.dtype} vs {y.dtype}")


def assert_trees_all_equal_dtypes(*trees: Any) -> None:
    """Asserts all trees have the same structure and leaf dtypes (shapes may differ).

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
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_dtype(path, x, y)


def _wide(x: torch.Tensor, complex_: bool) -> torch.Tensor:
    return x.detach().to("cpu", torch.complex128 if complex_ else torch.float64)


def _fmt(value: torch.Tensor) -> str:
    v = value.item()
    return f"{v:.10g}" if isinstance(v, float) else repr(v)


def _describe(
    path: tuple[Any, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    bad: torch.Tensor,
    score: torch.Tensor,
    tolerance: str,
) -> str:
    """The failure message: path, how many elements fail, and the worst one."""
    flat = int(score.reshape(-1).argmax()) if score.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
    xc, yc = x.detach().cpu(), y.detach().cpu()
    complex_ = xc.is_complex() or yc.is_complex()
    diff = (_wide(xc[index], complex_) - _wide(yc[index], complex_)).abs()
    return (
        f"trees differ at {tree.path_str(path)} (shape {tuple(x.shape)}, {x.dtype}): "
        f"{int(bad.sum())} of {x.numel()} elements differ; worst at index {index}: "
        f"a={_fmt(xc[index])}, b={_fmt(yc[index])}, |a-b|={_fmt(diff)}; {tolerance}"
    )


def assert_trees_all_close(
    *trees: Any, rtol: float = 1e-6, atol: float = 0.0, equal_nan: bool = True
) -> None:
    """Asserts all trees are element-wise close: ``|a - b| <= atol + rtol·|b|``.

    ``a`` is the first tree and ``b`` each of the others (numpy's and chex's convention: the
    expected values go second, their magnitude scales ``rtol``). Structures and shapes must match;
    dtypes and devices may differ (values are compared in float64, or complex128, on the CPU).
    The defaults are chex's (``rtol=1e-6``, ``atol=0``). A failure names the path, the number of
    failing elements and the worst one (largest excess over the tolerance).

    Args:
        *trees: two or more pytrees of tensors (Python numbers are accepted as leaves).
        rtol: relative tolerance, scaled by the reference's magnitude.
        atol: absolute tolerance.
        equal_nan: whether NaNs in the same places count as equal.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_close([torch.tensor([1.0])], [torch.tensor([1.0 + 1e-7])])
        >>> try:
        ...     testing.assert_trees_all_close({"b": torch.zeros(3)}, {"b": torch.tensor([0.0, 0.5, 0.1])}, atol=0.2)
        ... except AssertionError as err:
        ...     print(err)
        trees differ at ['b'] (shape (3,), torch.float32): 1 of 3 elements differ; worst at
        index (1,): a=0, b=0.5, |a-b|=0.5; allowed |a-b| <= atol=0.2 + rtol=1e-06*|b|
    """
    tolerance = f"allowed |a-b| <= atol={atol:g} + rtol={rtol:g}*|b|"
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_shape(path, x, y)
            if x.numel() == 0:
                continue
            complex_ = x.is_complex() or y.is_complex()
            a, b = _wide(x, complex_), _wide(y, complex_)
            allowed = atol + rtol * b.abs()
            diff = (a - b).abs()
            # Infinities match only the same infinity (rtol·|inf| would accept anything).
            finite = torch.isfinite(a) & torch.isfinite(b)
            ok = torch.where(finite, diff <= allowed, a == b)
            if equal_nan:
                ok |= a.isnan() & b.isnan()
            bad = ~ok
            if bool(bad.any()):
                excess = torch.nan_to_num(diff - allowed, nan=float("inf"))
                score = torch.where(bad, excess, torch.full_like(excess, -float("inf")))
                raise AssertionError(_describe(path, x, y, bad, score, tolerance))


def assert_trees_all_equal(*trees: Any, bitwise: bool = False) -> None:
    """Asserts all trees are exactly equal to the first: same structure, shapes, dtypes, values.

    NaNs in the same places count as equal; ``0.0`` and ``-0.0`` are equal (as in chex). With
    ``bitwise=True`` floating leaves must have identical bit patterns instead: ``-0.0`` differs
    from ``0.0`` and NaN payloads must match (what "state kept bit for bit" means).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_trees_all_equal({"a": torch.arange(3)}, {"a": torch.arange(3)})
        >>> try:
        ...     testing.assert_trees_all_equal({"a": torch.arange(3)}, {"a": torch.tensor([0, 1, 7])})
        ... except AssertionError as err:
        ...     print(err)
        trees differ at ['a'] (shape (3,), torch.int64): 1 of 3 elements differ; worst at
        index (2,): a=2, b=7, |a-b|=5; exact equality required
        >>> testing.assert_trees_all_equal([torch.tensor(0.0)], [torch.tensor(-0.0)])
        >>> try:
        ...     testing.assert_trees_all_equal(
        ...         [torch.tensor(0.0)], [torch.tensor(-0.0)], bitwise=True
        ...     )
        ... except AssertionError as err:
        ...     print(str(err).split(":")[0])
        trees differ at [0] (shape (), torch.float32)
    """
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_dtype(path, x, y)
            _check_shape(path, x, y)
            xc, yc = x.detach().cpu(), y.detach().cpu()
            floating = xc.is_floating_point() or xc.is_complex()
            if bitwise and floating:
                same = _bits(xc) == _bits(yc)
                if xc.is_complex():
                    same = same.all(-1)
            else:
                same = xc == yc
                if floating:
                    same |= xc.isnan() & yc.isnan()
            bad = ~same
            if bool(bad.any()):
                required = "bitwise equality required" if bitwise else "exact equality required"
                raise AssertionError(_describe(path, x, y, bad, bad.to(torch.int8), required))


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating (complex: real and imaginary parts) tensor, as integers."""
    real = torch.view_as_real(x) if x.is_complex() else x
    return real.contiguous().view(_INT_OF_SIZE[real.element_size()])


def assert_tree_all_finite(tree_: Any) -> None:
    """Asserts no leaf holds NaN or infinity; names the first offending path and element.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_tree_all_finite({"a": torch.ones(2)})
        >>> try:
        ...     testing.assert_tree_all_finite({"a": torch.tensor([1.0, float("nan")])})
        ... except AssertionError as err:
        ...     print(err)
        non-finite value at ['a'][1]: nan (1 of 2 elements non-finite)
    """
    paths, leaves, _ = tree.flatten_with_paths(tree_)
    for path, leaf in zip(paths, leaves):
        x = _as_tensor(leaf).detach().cpu()
        if x.is_floating_point() or x.is_complex():
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                index = tuple(int(i) for i in bad.nonzero()[0]) if x.dim() else ()
                raise AssertionError(
                    f"non-finite value at {tree.path_str(path)}{''.join(f'[{i}]' for i in index)}"
                    f": {x[index].item()} ({int(bad.sum())} of {x.numel()} elements non-finite)"
                )


def assert_tree_on_device(tree_: Any, device: torch.device | str) -> None:
    """Asserts every tensor leaf lives on ``device`` (``"cuda"`` matches any CUDA index).

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_tree_on_device({"w": torch.ones(2)}, "cpu")
    """
    want = torch.device(device)
    paths, leaves, _ = tree.flatten_with_paths(tree_)
    for path, x in zip(paths, leaves):
        if not isinstance(x, torch.Tensor):
            continue
        if x.device.type != want.type or (
            want.index is not None and x.device.index not in (want.index, None)
        ):
            raise AssertionError(f"{tree.path_str(path)} is on {x.device}, expected {want}")


def _tensor_list(tensors: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def assert_shape(
    tensors: torch.Tensor | Sequence[torch.Tensor],
    shape: Sequence[int | set[int] | None],
) -> None:
    """Asserts each tensor has ``shape``; ``None`` matches any size, a set any of its sizes.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> testing.assert_shape(torch.ones(2, 3), (None, 3))
        >>> testing.assert_shape([torch.ones(2, 3), torch.ones(5, 4)], (None, {3, 4}))
        >>> try:
        ...     testing.assert_shape(torch.ones(2, 3), (2, 4))
        ... except AssertionError as err:
        ...     print(err)
        tensor 0 has shape (2, 3), expected (2, 4)
    """
    for i, t in enumerate(_tensor_list(tensors)):
        ok = t.dim() == len(shape) and all(
            s is None or (d in s if isinstance(s, (set, frozenset)) else d == s)
            for s, d in zip(shape, t.shape)
        )
        if not ok:
            raise AssertionError(f"tensor {i} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def assert_rank(tensors: torch.Tensor | Sequence[torch.Tensor], rank: int | set[int]) -> None:
    """Asserts each tensor's number of dimensions is ``rank`` (or one of a set of ranks).

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
