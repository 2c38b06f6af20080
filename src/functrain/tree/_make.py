"""New pytrees shaped like a given one: ``zeros_like``, ``ones_like``, ``full_like``."""

from __future__ import annotations

import optree
import torch

from functrain.tree._structure import PyTree


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of zeros with the structure, shapes and devices of ``tree``.

    ``None`` subtrees stay ``None``; the new leaves do not require grad.

    Args:
        tree: a pytree of tensors (every leaf must be a tensor).
        dtype: the dtype of the new leaves; ``None`` keeps each leaf's own dtype.

    Returns:
        A new pytree with ``tree``'s structure whose leaves have the shapes and devices of
        ``tree``'s leaves.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.zeros_like({"a": torch.ones(2)})
        {'a': tensor([0., 0.])}
    """
    return optree.tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def ones_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of ones with the structure, shapes and devices of ``tree``.

    ``None`` subtrees stay ``None``; the new leaves do not require grad.

    Args:
        tree: a pytree of tensors (every leaf must be a tensor).
        dtype: the dtype of the new leaves; ``None`` keeps each leaf's own dtype.

    Returns:
        A new pytree with ``tree``'s structure whose leaves have the shapes and devices of
        ``tree``'s leaves.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.ones_like({"a": torch.zeros(2)})
        {'a': tensor([1., 1.])}
    """
    return optree.tree_map(lambda x: torch.ones_like(x, dtype=dtype), tree)


def full_like(tree: PyTree, fill_value: float, dtype: torch.dtype | None = None) -> PyTree:
    """A tree filled with ``fill_value``, with the structure, shapes and devices of ``tree``.

    ``None`` subtrees stay ``None``; the new leaves do not require grad.

    Args:
        tree: a pytree of tensors (every leaf must be a tensor).
        fill_value: the value of every element, converted to the leaf's dtype (2.5 in an
            integer leaf becomes 2).
        dtype: the dtype of the new leaves; ``None`` keeps each leaf's own dtype.

    Returns:
        A new pytree with ``tree``'s structure whose leaves have the shapes and devices of
        ``tree``'s leaves.

    Example:
        >>> import torch, functrain as ft
        >>> ft.tree.full_like([torch.zeros(2)], 7.0)
        [tensor([7., 7.])]
    """
    return optree.tree_map(lambda x: torch.full_like(x, fill_value, dtype=dtype), tree)
