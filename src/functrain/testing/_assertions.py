"""Pytree assertions that name the path and the worst element on failure.

This module holds the value assertions (closeness, equality, finiteness, device) and
re-exports the structure/shape/dtype assertions of :mod:`functrain.testing._structure_asserts`
and the tensor shape/rank ones of :mod:`functrain.testing._shape_asserts`.
"""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree

# Structure and shape assertions live in sibling modules; re-exported (``X as X``) here.
from functrain.testing._shape_asserts import _dims_match as _dims_match
from functrain.testing._shape_asserts import _tensor_list as _tensor_list
from functrain.testing._shape_asserts import assert_rank, assert_shape
from functrain.testing._structure_asserts import (
    _as_tensor,
    _check_dtype,
    _check_shape,
    _check_two_or_more,
    _numeric,
    _paired_leaves,
    assert_trees_all_equal_dtypes,
    assert_trees_all_equal_shapes,
    assert_trees_all_equal_structs,
)
from functrain.testing._structure_asserts import _node_kind as _node_kind
from functrain.testing._structure_asserts import _spec_difference as _spec_difference

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


def _wide(x: torch.Tensor, complex_: bool) -> torch.Tensor:
    return x.detach().to("cpu", torch.complex128 if complex_ else torch.float64)


_TWO_32 = 2.0**32


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as ``hi * 2**32 + lo`` in float64 (exact for every integer dtype and finite float)."""
    if x.is_floating_point():
        w = x.detach().cpu().double()
        hi = torch.floor(w / _TWO_32)
        return hi, w - hi * _TWO_32
    x = x.detach().cpu()
    # uint64 has no lossless cast to int64: its bits are read as int64 and the high word masked.
    bits = x.view(torch.int64) if x.dtype == torch.uint64 else x.long()
    hi = bits >> 32
    if x.dtype == torch.uint64:
        hi = hi & 0xFFFFFFFF
    return hi.double(), (bits & 0xFFFFFFFF).double()


def _abs_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|x - y|`` in float64 on the CPU; exact for integers beyond float64's 2**53."""
    complex_ = x.is_complex() or y.is_complex()
    diff = (_wide(x, complex_) - _wide(y, complex_)).abs()
    if not complex_ and not (x.is_floating_point() and y.is_floating_point()):
        # float64 rounds 2**62 + 1 to 2**62 (and 2**63 + 1 in uint64 to 2**63): an integer
        # leaf is split into 32-bit halves, whose differences float64 holds exactly. Where the
        # other leaf is not finite the plain difference (inf or NaN) stands.
        (hi_x, lo_x), (hi_y, lo_y) = _split(x), _split(y)
        exact = ((hi_x - hi_y) * _TWO_32 + (lo_x - lo_y)).abs()
        diff = torch.where(diff.isfinite(), exact, diff)
    return diff


def _parts(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # A complex NaN is NaN in one part or both: parts are compared separately so that
    # nan+1j and nan+2j (or 1+nanj and nan+1j) are not taken for the same value.
    return (x.real, x.imag) if x.is_complex() else (x,)


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
    diff = _abs_diff(xc[index], yc[index])
    return (
        f"trees differ at {tree.path_str(path)} (shape {tuple(x.shape)}, {x.dtype}): "
        f"{int(bad.sum())} of {x.numel()} elements differ; worst at index {index}: "
        f"a={_fmt(xc[index])}, b={_fmt(yc[index])}, |a-b|={_fmt(diff)}; {tolerance}"
    )


def _close(
    x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float, equal_nan: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise ``(ok, |a-b| - allowed)`` of ``|a-b| <= atol + rtol*|b|``."""
    complex_ = x.is_complex() or y.is_complex()
    a, b = _wide(x, complex_), _wide(y, complex_)
    allowed = atol + rtol * b.abs()
    diff = _abs_diff(x, y)
    nan_a = [p.isnan() for p in _parts(a)]
    nan_b = [p.isnan() for p in _parts(b)]
    any_nan = torch.zeros_like(diff, dtype=torch.bool)
    same_nans = torch.ones_like(any_nan)
    for na, nb in zip(nan_a, nan_b):
        any_nan |= na | nb
        same_nans &= na == nb
    if bool(any_nan.any()):
        # NaNs in the same parts are set aside; the other parts must still be close.
        def clean(t: torch.Tensor, nans: list[torch.Tensor]) -> torch.Tensor:
            parts = [p.masked_fill(n, 0.0) for p, n in zip(_parts(t), nans)]
            return torch.complex(*parts) if complex_ else parts[0]

        a, b = clean(a, nan_a), clean(b, nan_b)
        # Only elements with a NaN change; the others keep their exact integer difference.
        diff_clean = torch.where(any_nan, (a - b).abs(), diff)
    else:
        diff_clean = diff
    # Infinities match only the same infinity (rtol·|inf| would accept anything).
    finite = torch.isfinite(a) & torch.isfinite(b)
    ok = torch.where(finite, diff_clean <= atol + rtol * b.abs(), a == b)
    ok &= torch.where(any_nan, same_nans & equal_nan, True)
    return ok, torch.nan_to_num(diff - allowed, nan=float("inf"))


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
        equal_nan: whether NaNs in the same places count as equal (for complex leaves: in
            the same parts, the other part still compared).

    Raises:
        AssertionError: if the trees differ.
        ValueError: if fewer than two trees are given (a single tuple compares nothing), or a
            tolerance is negative or NaN.

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
    _check_two_or_more(trees)
    if not (rtol >= 0 and atol >= 0):  # NaN fails both comparisons
        raise ValueError(f"rtol and atol must be non-negative numbers, got {rtol=}, {atol=}")
    tolerance = f"allowed |a-b| <= atol={atol:g} + rtol={rtol:g}*|b|"
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_shape(path, x, y)
            if x.numel() == 0:
                continue
            ok, excess = _close(x, y, rtol, atol, equal_nan)
            bad = ~ok
            if bool(bad.any()):
                score = torch.where(bad, excess, torch.full_like(excess, -float("inf")))
                raise AssertionError(_describe(path, x, y, bad, score, tolerance))


def assert_trees_all_equal(*trees: Any, bitwise: bool = False) -> None:
    """Asserts all trees are exactly equal to the first: same structure, shapes, dtypes, values.

    NaNs in the same places (for complex leaves: in the same real or imaginary parts) count
    as equal; ``0.0`` and ``-0.0`` are equal (as in chex). Integers compare exactly. With
    ``bitwise=True`` floating leaves must have identical bit patterns instead: ``-0.0`` differs
    from ``0.0`` and NaN payloads must match (what "state kept bit for bit" means).

    Values are copied to the CPU to compare (a host synchronization); devices may differ.

    Args:
        *trees: two or more pytrees of tensors (Python numbers and NumPy arrays are accepted
            as leaves; any other leaf, a string say, must be of the same type and ``==``);
            each is compared with the first.
        bitwise: compare floating and complex leaves by bit pattern.

    Raises:
        AssertionError: at the first leaf that differs, checked in this order: ``tree
            structures differ: ...``, ``dtypes differ at <path>: ...``, ``shapes differ at
            <path>: ...``, or ``trees differ at <path> (shape, dtype): k of n elements differ;
            worst at index ...: a=..., b=..., |a-b|=...; exact equality required`` (``bitwise
            equality required`` with ``bitwise=True``).
        ValueError: if fewer than two trees are given (a single tuple compares nothing).

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
    _check_two_or_more(trees)
    for other in trees[1:]:
        for path, x, y in _paired_leaves(trees[0], other):
            _check_dtype(path, x, y)
            _check_shape(path, x, y)
            xc, yc = x.detach().cpu(), y.detach().cpu()
            if bitwise and (xc.is_floating_point() or xc.is_complex()):
                same = _bits(xc) == _bits(yc)
                if xc.is_complex():
                    same = same.all(-1)
            else:
                same = torch.ones(xc.shape, dtype=torch.bool)
                for p, q in zip(_parts(xc), _parts(yc)):
                    same &= (p == q) | (p.isnan() & q.isnan()) if p.is_floating_point() else p == q
            bad = ~same
            if bool(bad.any()):
                required = "bitwise equality required" if bitwise else "exact equality required"
                raise AssertionError(_describe(path, x, y, bad, bad.to(torch.int8), required))


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a floating (complex: real and imaginary parts) tensor, as integers."""
    # conj() and some complex ops return lazy views that view_as_real/view cannot read.
    x = x.resolve_conj().resolve_neg()
    real = torch.view_as_real(x) if x.is_complex() else x
    return real.contiguous().view(_INT_OF_SIZE[real.element_size()])


def assert_tree_all_finite(tree_: Any) -> None:
    """Asserts no leaf holds NaN or infinity; names the first offending path and element.

    Integer and boolean leaves are always finite and are skipped. Values are copied to the CPU
    (a host synchronization): use it in tests, not inside a step.

    Args:
        tree_: a pytree of tensors (Python numbers and NumPy arrays are accepted as leaves);
            ``None`` subtrees are skipped.

    Raises:
        AssertionError: ``non-finite value at <path>[index]: <value> (k of n elements
            non-finite)`` for the first leaf, in :func:`functrain.tree.flatten` order, holding
            NaN or +-inf.

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
        if not _numeric(leaf):
            continue  # a string has no non-finite values
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

    Leaves that are not tensors (Python numbers, ``None`` subtrees) are skipped.

    Args:
        tree_: a pytree.
        device: the expected device; with an index (``"cuda:1"``) a leaf must be on that index.

    Raises:
        AssertionError: ``<path> is on <leaf device>, expected <device>`` for the first leaf
            elsewhere.

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
