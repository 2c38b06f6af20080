"""Leaf-wise arithmetic on pytrees: ``add``, ``sub``, ``mul``, ``div``, scaling, casts, ``where``."""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch

from functrain import _foreach
from functrain.tree._structure import PyTree, _check_same, flatten, unflatten
from functrain.tree._structure import map as tree_map

# Errors name the arguments as optax spells them (``tree_x``, ``tree_y``).
_XY = ("tree_x", "tree_y")


def _binary(
    a: PyTree,
    b: PyTree,
    foreach: Callable[[list[torch.Tensor], list[torch.Tensor]], list[torch.Tensor]],
) -> PyTree:
    _check_same(a, b, _XY)
    a_leaves, spec = flatten(a)
    b_leaves = flatten(b)[0]
    if not a_leaves:
        return a
    return unflatten(spec, foreach(a_leaves, b_leaves))


def add(tree_x: PyTree, tree_y: PyTree, *other_trees: PyTree) -> PyTree:
    """Leaf-wise sum of two or more trees (optax's ``tree.add``).

    ``None`` subtrees stay ``None`` and must be ``None`` in every tree. Dtypes promote as in
    ``torch.add``; the inputs are not modified.

    Args:
        tree_x: a pytree of tensors.
        tree_y: a pytree with ``tree_x``'s structure and leaf shapes.
        *other_trees: more pytrees with ``tree_x``'s structure and leaf shapes.

    Returns:
        A new pytree with ``tree_x``'s structure holding the sums; ``tree_x`` itself when the
        trees have no leaves.

    Raises:
        TreeMismatchError: if the structures differ, a leaf's shape differs (no broadcasting),
            or another tree holds ``None`` where ``tree_x`` has a leaf; the message names the
            path.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.add([torch.ones(1)], [torch.ones(1)], [torch.ones(1)])
        [tensor([3.])]
    """
    out = tree_x
    for other in (tree_y, *other_trees):
        out = _binary(out, other, _foreach.add)
    return out


def sub(tree_x: PyTree, tree_y: PyTree) -> PyTree:
    """Leaf-wise ``tree_x - tree_y``.

    ``None`` subtrees stay ``None``; dtypes promote as in ``torch.sub``.

    Args:
        tree_x: a pytree of tensors.
        tree_y: a pytree with ``tree_x``'s structure and leaf shapes.

    Returns:
        A new pytree with ``tree_x``'s structure (``tree_x`` itself if it has no leaves).

    Raises:
        TreeMismatchError: if the structures differ, a leaf's shape differs (no broadcasting),
            or ``tree_y`` holds ``None`` where ``tree_x`` has a leaf; the message names the
            path.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.sub([torch.ones(1)], [torch.ones(1)])
        [tensor([0.])]
    """
    return _binary(tree_x, tree_y, _foreach.sub)


def mul(tree_x: PyTree, tree_y: PyTree) -> PyTree:
    """Leaf-wise ``tree_x * tree_y``.

    ``None`` subtrees stay ``None``; dtypes promote as in ``torch.mul``.

    Args:
        tree_x: a pytree of tensors.
        tree_y: a pytree with ``tree_x``'s structure and leaf shapes.

    Returns:
        A new pytree with ``tree_x``'s structure (``tree_x`` itself if it has no leaves).

    Raises:
        TreeMismatchError: if the structures differ, a leaf's shape differs (no broadcasting),
            or ``tree_y`` holds ``None`` where ``tree_x`` has a leaf; the message names the
            path.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.mul([torch.tensor([2.0])], [torch.tensor([3.0])])
        [tensor([6.])]
    """
    return _binary(tree_x, tree_y, _foreach.mul)


def div(tree_x: PyTree, tree_y: PyTree) -> PyTree:
    """Leaf-wise ``tree_x / tree_y``.

    ``None`` subtrees stay ``None``; dtypes promote as in ``torch.div`` (true division: integer
    leaves give floating-point results).

    Args:
        tree_x: a pytree of tensors.
        tree_y: a pytree with ``tree_x``'s structure and leaf shapes.

    Returns:
        A new pytree with ``tree_x``'s structure (``tree_x`` itself if it has no leaves).

    Raises:
        TreeMismatchError: if the structures differ, a leaf's shape differs (no broadcasting),
            or ``tree_y`` holds ``None`` where ``tree_x`` has a leaf; the message names the
            path.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.div([torch.tensor([3.0])], [torch.tensor([2.0])])
        [tensor([1.5000])]
    """
    return _binary(tree_x, tree_y, _foreach.div)


def scale(scalar: float | torch.Tensor, tree: PyTree) -> PyTree:
    """Multiplies every leaf by ``scalar`` (a number or a 0-d tensor); optax's ``tree_scalar_mul``.

    A tensor ``scalar`` acts like a Python number of its kind: a float64 scalar keeps a float32
    leaf float32, a fractional one makes an integer leaf floating point, a complex one makes a
    real leaf complex. ``None`` subtrees stay ``None``.

    Args:
        scalar: the factor, a Python number or a 0-d tensor (no host synchronization).
        tree: a pytree of tensors; not modified.

    Returns:
        A new pytree with ``tree``'s structure (``tree`` itself if it has no leaves).

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.scale(0.5, {"w": torch.tensor([2.0, 4.0])})
        {'w': tensor([1., 2.])}
    """
    tree_leaves, spec = flatten(tree)
    if not tree_leaves:
        return tree
    if isinstance(scalar, torch.Tensor):
        return unflatten(spec, [_keep_dtype(leaf * scalar, leaf.dtype) for leaf in tree_leaves])
    return unflatten(spec, _foreach.mul(tree_leaves, scalar))


# A complex scalar makes a real leaf complex of the same precision, as a Python complex does.
_COMPLEX_OF = {
    torch.float16: torch.complex32,
    torch.bfloat16: torch.complex64,
    torch.float32: torch.complex64,
    torch.float64: torch.complex128,
}


def _keep_dtype(result: torch.Tensor, base: torch.dtype) -> torch.Tensor:
    """``result`` in the dtype a Python number of the tensor scalar's kind would have given.

    ``base`` is the dtype of the leaf (for ``add_scale``, of both leaves promoted).
    """
    # A float64 0-d scalar must not promote a float32 0-d leaf, but an integer leaf times a
    # fractional scalar must become floating point (as with a Python float), not truncate it.
    # The product is rounded once: casting a float32 scalar to a float16 leaf's dtype first
    # made 1e5 inf and 1.2e-6 a subnormal 5% off. A complex result stays complex: casting it
    # back to a real leaf's dtype dropped the imaginary part.
    if not (base.is_floating_point or base.is_complex):
        return result
    target = _COMPLEX_OF.get(base, base) if result.is_complex() else base
    return result if result.dtype == target else result.to(target)


def add_scale(tree_x: PyTree, scalar: float | torch.Tensor, tree_y: PyTree) -> PyTree:
    """Returns ``tree_x + scalar * tree_y`` leaf-wise (optax's ``tree.add_scale``).

    Each result leaf has the dtype of ``tree_x + tree_y`` (``scalar`` does not promote it, as
    with :func:`scale`, except that a fractional ``scalar`` makes integer leaves floating point
    and a complex one makes real leaves complex). ``None`` subtrees stay ``None``.

    Args:
        tree_x: a pytree of tensors.
        scalar: the factor on ``tree_y``, a Python number or a 0-d tensor.
        tree_y: a pytree with ``tree_x``'s structure and leaf shapes.

    Returns:
        A new pytree with ``tree_x``'s structure (``tree_x`` itself if it has no leaves).

    Raises:
        TreeMismatchError: if the structures differ, a leaf's shape differs (no broadcasting),
            or ``tree_y`` holds ``None`` where ``tree_x`` has a leaf; the message names the
            path.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.add_scale([torch.ones(1)], 2.0, [torch.ones(1)])
        [tensor([3.])]
    """
    _check_same(tree_x, tree_y, _XY)
    a_leaves, spec = flatten(tree_x)
    b_leaves = flatten(tree_y)[0]
    if not a_leaves:
        return tree_x
    if isinstance(scalar, (torch.Tensor, complex)) or not all(
        _inexact(x) for x in a_leaves + b_leaves
    ):
        # An integer leaf takes no fractional ``alpha`` (nor a real one a complex ``alpha``); a
        # Python number then acts as in scale. The result has the dtype of ``x + y``, as with a
        # Python number: keeping ``tree_x``'s dtype rounded a float64 ``tree_y`` to float32
        # (and dropped a complex ``tree_y``'s imaginary part).
        out = [
            _keep_dtype(x + y * scalar, torch.promote_types(x.dtype, y.dtype))
            for x, y in zip(a_leaves, b_leaves)
        ]
        return unflatten(spec, out)
    return unflatten(spec, _foreach.add(a_leaves, b_leaves, alpha=scalar))


def _inexact(x: torch.Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


def cast(tree: PyTree, dtype: torch.dtype | None) -> PyTree:
    """Casts floating-point leaves to ``dtype`` (``None`` leaves the tree as is).

    Floating-point and complex leaves are cast; integer and boolean leaves keep their dtype, so
    casting an optimizer state leaves its step counters integers. ``None`` subtrees stay
    ``None``.

    Difference from optax: optax 0.2.8's ``tree.cast`` casts every leaf, integer ones included
    (:func:`cast_like` does, as optax's).

    Args:
        tree: a pytree of tensors (every leaf must be a tensor).
        dtype: the target dtype, or ``None`` for no cast.

    Returns:
        A pytree with ``tree``'s structure; a leaf already of ``dtype`` is returned as is (not
        copied), and ``dtype=None`` returns ``tree`` itself.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.cast({"a": torch.ones(1)}, torch.float64)["a"].dtype
        torch.float64
    """
    if dtype is None:
        return tree
    return optree.tree_map(
        lambda x: x.to(dtype) if x.is_floating_point() or x.is_complex() else x, tree
    )


def where(condition: torch.Tensor | PyTree, tree_x: PyTree, tree_y: PyTree) -> PyTree:
    """Leaf-wise ``torch.where``; ``condition`` is a single tensor or a tree like ``tree_x``.

    A single tensor ``condition`` (e.g. a 0-d bool) is broadcast against every leaf; a tree
    ``condition`` pairs its leaves with those of ``tree_x`` and ``tree_y``. ``None`` subtrees
    stay ``None``.

    Args:
        condition: a bool tensor, or a pytree of bool tensors with ``tree_x``'s structure.
        tree_x: values where ``condition`` is true, a pytree of tensors.
        tree_y: values where ``condition`` is false, with ``tree_x``'s structure and leaf
            shapes.

    Returns:
        A new pytree with ``tree_x``'s structure; dtypes promote as in ``torch.where``.

    Raises:
        TreeMismatchError: if ``tree_x`` and ``tree_y`` (or a tree ``condition`` and
            ``tree_x``) differ in structure, ``tree_x`` and ``tree_y`` in a leaf's shape, or
            ``tree_y`` holds ``None`` where ``tree_x`` has a leaf; the message names the path.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.where(torch.tensor(False), [torch.ones(1)], [torch.zeros(1)])
        [tensor([0.])]
    """
    _check_same(tree_x, tree_y, _XY)
    if isinstance(condition, torch.Tensor):
        return tree_map(lambda x, y: torch.where(condition, x, y), tree_x, tree_y)
    return tree_map(lambda c, x, y: torch.where(c, x, y), condition, tree_x, tree_y)


def clip(tree: PyTree, min_value: float | None = None, max_value: float | None = None) -> PyTree:
    """Clamps every element to ``[min_value, max_value]``.

    ``None`` subtrees stay ``None``. Dtypes follow ``torch.clamp``: a fractional bound makes an
    integer leaf floating point.

    Args:
        tree: a pytree of tensors.
        min_value: the lower bound, or ``None`` for none.
        max_value: the upper bound, or ``None`` for none.

    Returns:
        A new pytree with ``tree``'s structure; ``tree`` itself when both bounds are ``None``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.clip([torch.tensor([-2.0, 0.5, 2.0])], -1.0, 1.0)
        [tensor([-1.0000,  0.5000,  1.0000])]
    """
    if min_value is None and max_value is None:
        return tree
    return optree.tree_map(lambda x: torch.clamp(x, min_value, max_value), tree)
