"""Dtypes, complex parts and shapes of pytrees: ``dtype``, ``cast_like``, ``conj``, ``real``,
``batch_shape``, and the reduction ``min`` (optax's ``tree_*`` counterparts)."""

from __future__ import annotations

import functools
from typing import Any

import optree
import torch

from functrain.tree._reduce import _stack_promoted
from functrain.tree._structure import PyTree, flatten_with_paths, leaves, path_str
from functrain.tree._structure import map as tree_map


def min(tree: PyTree) -> torch.Tensor:
    """Smallest element over all leaves, as a 0-d tensor (the counterpart of :func:`max`).

    Empty leaves are skipped (their dtype still counts); NaN propagates, as in ``torch.min``.

    Args:
        tree: a pytree of tensors; ``None`` subtrees add nothing.

    Returns:
        A 0-d tensor in the dtype promoted over all leaves, on the first non-empty leaf's
        device. Difference from optax: an integer-only tree gives an integer (int64 for int64
        leaves), where ``optax.tree.min`` starts its reduction from a float ``inf`` and gives a
        float.

    Raises:
        ValueError: if no leaf has an element (optax returns ``inf`` there; this matches
            ``ft.tree.max``).

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.min({"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([-3.0])})
        tensor(-3.)
    """
    all_leaves = leaves(tree)
    # Shapes are static, so skipping empty leaves costs no device synchronization.
    tree_leaves = [leaf for leaf in all_leaves if leaf.numel()]
    if not tree_leaves:
        raise ValueError("tree.min of a tree without elements is undefined")
    dtype = _stack_promoted([x.new_zeros(()) for x in all_leaves]).dtype
    return _stack_promoted([leaf.min() for leaf in tree_leaves]).min().to(dtype)


def conj(tree: PyTree) -> PyTree:
    """The complex conjugate of every leaf; real leaves are returned as they are.

    Complex leaves are conjugated into new memory (``torch.conj_physical``), not as
    ``torch.conj``'s lazy views, which share the input's memory and refuse ``.numpy()``.

    Args:
        tree: a pytree of tensors; ``None`` subtrees stay ``None``.

    Returns:
        A pytree of ``tree``'s structure.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.conj({"z": torch.tensor([1.0 + 2.0j])})
        {'z': tensor([1.-2.j])}
    """
    return optree.tree_map(lambda x: torch.conj_physical(x) if x.is_complex() else x, tree)


def real(tree: PyTree) -> PyTree:
    """The real part of every leaf; real leaves are returned as they are.

    The real part of a complex leaf is copied into a new contiguous tensor (``torch.real`` is
    a strided view of the input's memory).

    Args:
        tree: a pytree of tensors; ``None`` subtrees stay ``None``.

    Returns:
        A pytree of ``tree``'s structure; complex64 leaves become float32, complex128 float64.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.real([torch.tensor([1.0 + 2.0j]), torch.tensor([3.0])])
        [tensor([1.]), tensor([3.])]
    """
    return optree.tree_map(lambda x: x.real.contiguous() if x.is_complex() else x, tree)


def cast_like(tree: PyTree, other_tree: PyTree) -> PyTree:
    """Casts each leaf of ``tree`` to the dtype of the matching leaf of ``other_tree`` (optax's).

    Every leaf is cast, integer ones included (unlike :func:`cast`, which keeps counters); a
    leaf whose counterpart has no ``dtype`` (``None``, a Python number) is kept.

    Args:
        tree: a pytree of tensors; ``None`` subtrees stay ``None``.
        other_tree: a pytree with ``tree``'s structure whose leaves give the dtypes.

    Returns:
        A pytree of ``tree``'s structure; a leaf already of the wanted dtype is returned as it
        is, not copied.

    Raises:
        TreeMismatchError: if ``other_tree`` does not have ``tree``'s structure, naming the path.

    Example:
        >>> import torch, functrain as ft
        >>> like = {"a": torch.zeros(1, dtype=torch.bfloat16)}
        >>> ft.tree.cast_like({"a": torch.ones(1)}, like)["a"].dtype
        torch.bfloat16
    """
    return tree_map(lambda x, o: x.to(o.dtype) if hasattr(o, "dtype") else x, tree, other_tree)


def _leaf_dtype(x: Any) -> torch.dtype:
    return x.dtype if isinstance(x, torch.Tensor) else torch.as_tensor(x).dtype


def _order(a: torch.dtype, b: torch.dtype, highest: bool) -> torch.dtype:
    """The higher (or lower) of two dtypes, one promoting to the other."""
    promoted = torch.promote_types(a, b)
    if promoted not in (a, b):
        raise ValueError(
            f"tree.dtype: cannot order {a} and {b}: neither promotes to the other "
            f"(they promote to {promoted}); use mixed_dtype_handler='promote'"
        )
    if highest:
        return promoted
    return b if promoted == a else a


def dtype(tree: PyTree, mixed_dtype_handler: str | None = None) -> torch.dtype:
    """The dtype of the leaves of ``tree`` (optax's ``tree_dtype``, with torch's promotion).

    Args:
        tree: a pytree of tensors (a Python number counts with ``torch.as_tensor``'s dtype).
        mixed_dtype_handler: what to do if the leaves' dtypes differ: ``None`` raises;
            ``"promote"`` returns ``torch.promote_types`` over all of them; ``"highest"`` and
            ``"lowest"`` return the highest or lowest under the order "``a <= b`` if ``a``
            promotes to ``b``", which raises where neither of two dtypes promotes to the other
            (``float16`` and ``bfloat16``).

    Returns:
        A ``torch.dtype``; ``torch.get_default_dtype()`` for a tree without leaves.

    Raises:
        ValueError: if the dtypes differ and ``mixed_dtype_handler`` is ``None`` (the message
            names each differing path), if two dtypes cannot be ordered, or if
            ``mixed_dtype_handler`` is not one of the four values.

    Example:
        >>> import torch, functrain as ft
        >>> tree = {"a": torch.ones(1, dtype=torch.float16), "b": torch.ones(1)}
        >>> ft.tree.dtype(tree, "lowest"), ft.tree.dtype(tree, "highest")
        (torch.float16, torch.float32)
    """
    if mixed_dtype_handler not in (None, "promote", "highest", "lowest"):
        raise ValueError(
            f"tree.dtype: invalid mixed_dtype_handler={mixed_dtype_handler!r}; possible values "
            "are None, 'promote', 'highest', 'lowest'"
        )
    paths, tree_leaves, _ = flatten_with_paths(tree)
    if not tree_leaves:
        return torch.get_default_dtype()
    dtypes = [_leaf_dtype(x) for x in tree_leaves]
    if mixed_dtype_handler is None:
        bad = [f"{path_str(p, 'tree')} is {d}" for p, d in zip(paths, dtypes) if d != dtypes[0]]
        if bad:
            raise ValueError(
                f"tree.dtype: leaves have different dtypes: expected {dtypes[0]} (of "
                f"{path_str(paths[0], 'tree')}) but {'; '.join(bad)}; pass mixed_dtype_handler"
            )
        return dtypes[0]
    if mixed_dtype_handler == "promote":
        return functools.reduce(torch.promote_types, dtypes)
    highest = mixed_dtype_handler == "highest"
    return functools.reduce(lambda a, b: _order(a, b, highest), dtypes)


def batch_shape(tree: PyTree, shape: tuple[int, ...] = ()) -> PyTree:
    """Adds leading batch dimensions ``shape`` to every leaf, repeating its values (optax's).

    Each leaf ``x`` becomes a new tensor of shape ``(*shape, *x.shape)`` holding copies of
    ``x`` (materialized, like ``jnp.broadcast_to``; ``torch.broadcast_to``'s view would share
    ``x``'s memory and refuse in-place writes).

    Args:
        tree: a pytree of tensors; ``None`` subtrees stay ``None``.
        shape: the leading dimensions to add; ``()`` copies the leaves.

    Returns:
        A new pytree of ``tree``'s structure.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.batch_shape({"w": torch.tensor([1.0, 2.0])}, (3,))["w"].shape
        torch.Size([3, 2])
    """
    shape = tuple(shape)
    return optree.tree_map(lambda x: x.expand((*shape, *x.shape)).clone(), tree)
