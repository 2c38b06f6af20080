"""Reductions of pytrees to one value: ``vdot``, ``sum``, ``max``, ``size``, ``norm``, ``allclose``.

``sum`` and ``max`` shadow the builtins in this module; ``builtins.sum`` is the builtin.
"""

from __future__ import annotations

import builtins

import torch

from functrain import _foreach
from functrain._precision import HALF as _HALF
from functrain._sq_norms import sum_sq_norms
from functrain.tree._structure import (
    PyTree,
    _check_same,
    flatten,
    flatten_with_paths,
    leaves,
    path_str,
)


def vdot(tree_x: PyTree, tree_y: PyTree) -> torch.Tensor:
    """Sum over leaves of the inner products ``<x_i, y_i>``, as a 0-d tensor.

    ``tree_x`` is conjugated, as in ``torch.vdot``, ``jnp.vdot`` and optax's ``tree.vdot``.
    Products of float16 and bfloat16 leaves are summed in float32 and the total rounded once.

    Args:
        tree_x: a pytree of tensors (conjugated).
        tree_y: a pytree with ``tree_x``'s structure and leaf shapes.

    Returns:
        A 0-d tensor in the dtype promoted over all leaves of both trees (integer leaves give
        an integer), on the first leaf's device; a float32 zero on the CPU if the trees have
        no leaves.

    Raises:
        TreeMismatchError: if the structures or a leaf's shape differ, or ``tree_y`` holds
            ``None`` where ``tree_x`` has a leaf; the message names the path.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.vdot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
        tensor(11.)
    """
    _check_same(tree_x, tree_y, ("tree_x", "tree_y"))
    a_leaves, b_leaves = flatten(tree_x)[0], flatten(tree_y)[0]
    if not a_leaves:
        return torch.zeros(())
    dots, result = [], None
    for x, y in zip(a_leaves, b_leaves):
        dtype = torch.promote_types(x.dtype, y.dtype)  # torch.vdot wants equal dtypes
        result = dtype if result is None else torch.promote_types(result, dtype)
        # Half-precision products are summed in float32 and rounded once, as in norm: in
        # float16 two leaves' dots of +-90000 were inf and -inf, their sum NaN instead of 0.
        dtype = torch.float32 if dtype in _HALF else dtype
        dots.append(torch.vdot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype)))
    return _sum_scalars(dots).to(result)


_REAL_OF_COMPLEX = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def _stack_promoted(values: list[torch.Tensor]) -> torch.Tensor:
    dtype, device = values[0].dtype, values[0].device
    if all(v.dtype == dtype and v.device == device for v in values):
        return torch.stack(values)  # the common case, without a ``to`` call per value
    for v in values[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    return torch.stack([v.to(dtype=dtype, device=device) for v in values])


def _sum_scalars(values: list[torch.Tensor]) -> torch.Tensor:
    return _stack_promoted(values).sum()


def sum(tree: PyTree, associative_reduction: bool = False) -> torch.Tensor:
    """Sum of all elements of all leaves, as a 0-d tensor.

    float16 and bfloat16 leaves are summed in float32 and the total rounded once.

    Args:
        tree: a pytree of tensors; ``None`` subtrees add nothing.
        associative_reduction: accepted for optax's signature, where ``True`` sums the
            leaves' totals in a tree-shaped order to compile faster in JAX. Here the totals
            are always summed in one stacked reduction, so both values give the same result.

    Returns:
        A 0-d tensor on the first leaf's device, in the dtype promoted over the leaves' sum
        dtypes (``torch.sum``'s: a float leaf's own, int64 for integer and bool leaves); a
        float32 zero on the CPU if the tree has no leaves.

    Raises:
        TypeError: if ``associative_reduction`` is not a bool.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.sum({"a": torch.ones(3), "b": torch.ones(2)})
        tensor(5.)
    """
    if not isinstance(associative_reduction, bool):
        raise TypeError(
            f"associative_reduction must be a bool, got {type(associative_reduction).__name__}"
        )
    tree_leaves = leaves(tree)
    if not tree_leaves:
        return torch.zeros(())
    # Half-precision leaves are summed in float32 and the total rounded once: per-leaf float16
    # sums of +-120000 were inf and -inf, the total NaN instead of 0.
    sums = [
        leaf.sum(dtype=torch.float32) if leaf.dtype in _HALF else leaf.sum() for leaf in tree_leaves
    ]
    dtype = sums[0].dtype if tree_leaves[0].dtype not in _HALF else tree_leaves[0].dtype
    for leaf, total in zip(tree_leaves[1:], sums[1:]):
        # torch.sum's dtype: the leaf's own for floats, int64 for integers and booleans.
        dtype = torch.promote_types(dtype, leaf.dtype if leaf.dtype in _HALF else total.dtype)
    return _sum_scalars(sums).to(dtype)


def max(tree: PyTree) -> torch.Tensor:
    """Largest element over all leaves, as a 0-d tensor.

    Empty leaves are skipped (their dtype still counts); NaN propagates, as in ``torch.max``.

    Args:
        tree: a pytree of tensors; ``None`` subtrees add nothing.

    Returns:
        A 0-d tensor in the dtype promoted over all leaves, on the first non-empty leaf's
        device.

    Raises:
        ValueError: if no leaf has an element.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.max({"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([3.0])})
        tensor(5.)
    """
    all_leaves = leaves(tree)
    # Shapes are static, so skipping empty leaves costs no device synchronization.
    tree_leaves = [leaf for leaf in all_leaves if leaf.numel()]
    if not tree_leaves:
        raise ValueError("tree.max of a tree without elements is undefined")
    dtype = _stack_promoted([x.new_zeros(()) for x in all_leaves]).dtype
    return _stack_promoted([leaf.max() for leaf in tree_leaves]).max().to(dtype)


def size(tree: PyTree) -> int:
    """Total number of elements over all leaves (a Python int: shapes are static).

    Args:
        tree: a pytree of tensors; ``None`` subtrees add nothing.

    Returns:
        The sum of the leaves' ``numel()``, 0 for a tree without leaves.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.size({"w": torch.ones(3, 4), "b": torch.ones(4)})
        16
    """
    return builtins.sum(leaf.numel() for leaf in leaves(tree))


def norm(tree: PyTree, ord: float | None = None, squared: bool = False) -> torch.Tensor:
    """Global norm over all leaves, as if they were concatenated into one vector.

    Args:
        tree: a pytree of tensors.
        ord: ``None`` or ``2`` (the L2 norm, default, as optax), ``1`` or ``float('inf')``.
        squared: return the squared norm (only for ``ord=2``).

    Returns:
        A 0-d tensor in the promoted dtype of the leaves, on the first leaf's device.

    float16 and bfloat16 leaves are reduced in float32 and rounded once. On the CPU with more
    than one thread, float32/float64 leaves of 2¹⁹ elements or more are reduced as 1024 rows in
    parallel (faster, and about 10⁴ times more accurate over 2²⁴ values than one sequential
    sum; the same bits for any thread count above one). Works under ``torch.func`` transforms
    (``vmap``, ``grad``) and ``torch.compile``. Wider leaves are not rescaled: where the sum of
    squares overflows the dtype (a float32 norm above about 1.8e19, e.g. of ``[1e30, 1e30]``)
    the norm is ``inf``, as with ``torch.linalg.vector_norm`` and
    ``torch.nn.utils.clip_grad_norm_``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
        >>> ft.tree.norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, squared=True)
        tensor(25.)
    """
    ord = 2 if ord is None else ord
    if squared and ord != 2:
        raise ValueError(f"squared=True needs ord=2, got ord={ord!r}")
    if ord not in (1, 2, float("inf")):
        raise ValueError(f"ord must be 1, 2 or inf, got {ord!r}")
    all_leaves = leaves(tree)
    if not all_leaves:
        return torch.zeros(())
    # Checked per dtype, not per leaf: a model's hundreds of leaves share one or two.
    dtypes = {x.dtype for x in all_leaves}
    if not all(d.is_floating_point or d.is_complex for d in dtypes):
        bad = [x for x in all_leaves if not (x.is_floating_point() or x.is_complex())]
        paths, path_leaves, _ = flatten_with_paths(tree)
        path = next(p for p, x in zip(paths, path_leaves) if x is bad[0])
        where = path_str(path, "tree")
        raise TypeError(f"tree.norm needs floating-point leaves; {where} is {bad[0].dtype}")
    # The result dtype comes from every leaf (a norm of complex leaves is real); empty leaves
    # add nothing to any of these norms (and the inf-norm kernel rejects them). Shapes are
    # static: skipping them does not sync.
    dtype = all_leaves[0].dtype
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    dtype = _REAL_OF_COMPLEX.get(dtype, dtype)
    zero = torch.zeros((), dtype=dtype, device=all_leaves[0].device)
    tree_leaves = [leaf for leaf in all_leaves if leaf.numel()]
    if not tree_leaves:
        return zero
    if ord == float("inf"):
        return _stack_promoted([zero, *_foreach.norm(tree_leaves, ord)]).max()
    # Half-precision leaves: per-leaf norms (and, for a half result, their sum) in float32,
    # rounded once at the end. In float16 the squares overflow (two leaves of norm 200 gave
    # inf, the norm being 283); each rounding of a norm or square cost bf16 a further 2⁻⁹.
    live = dtypes if len(tree_leaves) == len(all_leaves) else {x.dtype for x in tree_leaves}
    half = any(d in _HALF for d in live) and not any(d.is_complex for d in live)  # complex32
    acc = (torch.float32 if dtype in _HALF else dtype) if half else None
    if ord == 2 and all(x.device == zero.device for x in tree_leaves):
        total = sum_sq_norms(tree_leaves, acc)
    else:  # the 1-norm, or leaves on several devices: per-leaf norms gathered on the first's
        per_leaf = _foreach.norm(tree_leaves, ord, dtype=acc)
        # Promote before squaring: a float32 norm beside float64 ones is squared in float64.
        norms = _stack_promoted([zero if acc is None else zero.to(acc), *per_leaf])
        if ord == 1:
            return norms.sum().to(dtype)
        total = norms.square().sum()
    return (total if squared else total.sqrt()).to(dtype)


def allclose(
    a: PyTree, b: PyTree, rtol: float = 1e-5, atol: float = 1e-8, equal_nan: bool = False
) -> bool:
    """True when both trees have the same structure and every leaf pair is ``allclose``.

    ``equal_nan=True`` counts NaNs in the same places as equal, as ``torch.allclose`` does.

    This reads values on the host; use it in tests and checks, not inside a step.

    A leaf pair is close when ``|x - y| <= atol + rtol * |y|`` element-wise. Dtypes may differ
    (an integer beside a float is compared in float64); ``b``'s leaf is moved to ``a``'s
    leaf's device. A structure or shape mismatch gives ``False``, not an error (difference
    from optax, whose ``tree.allclose`` raises on a structure mismatch).

    Args:
        a: a pytree of tensors.
        b: a pytree of tensors, the reference whose magnitude scales ``rtol``.
        rtol: relative tolerance.
        atol: absolute tolerance.
        equal_nan: whether NaNs in the same places count as equal.

    Returns:
        A Python bool.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.allclose([torch.ones(1)], [torch.ones(1) + 1e-9])
        True
    """
    a_leaves, spec_a = flatten(a)
    b_leaves, spec_b = flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(a_leaves, b_leaves):
        if x.shape != y.shape:
            return False
        dtype = torch.promote_types(x.dtype, y.dtype)  # torch.allclose wants equal dtypes
        if (dtype.is_floating_point or dtype.is_complex) and not (_exact(x) and _exact(y)):
            # An integer beside a float is compared in double precision: promoted to float32,
            # 2**30 + 1 and 2.0**30 were the same number even with rtol=atol=0.
            dtype = torch.complex128 if dtype.is_complex else torch.float64
        close = torch.allclose(
            x.to(dtype), y.to(x.device, dtype), rtol=rtol, atol=atol, equal_nan=equal_nan
        )
        if not bool(close):
            return False
    return True


def _exact(x: torch.Tensor) -> bool:
    return x.is_floating_point() or x.is_complex() or x.dtype == torch.bool
