"""Gram and cosine matrices between per-sample or per-micro-batch gradients (internal).

:func:`grad_gram` (rows of a per-sample gradient pytree) and :func:`tree_gram` (a list of
gradient pytrees), re-exported by :mod:`functrain.grads.stats`; the row helpers are shared with
:mod:`functrain.grads.streaming`'s blocked Gram matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from functrain import tree
from functrain._precision import HALF as _HALF
from functrain._precision import widen
from functrain.grads._rows import _check_rows, row_matrix

PyTree = Any


def _flat_rows(grads: PyTree) -> list[torch.Tensor]:
    return [row_matrix(x) for x in tree.leaves(grads)]


def _gram_dtype(rows: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype of a Gram matrix of ``rows``: the leaves' promoted dtype."""
    dtype = rows[0].dtype
    for x in rows[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _cross_gram(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_leaves aᵢ bⱼᵀ`` in the promoted dtype, but float32 for half-precision leaves.

    Leaves of different dtypes are promoted (``addmm`` refuses mixed dtypes); float16 and
    bfloat16 rows are multiplied in float32: a float16 Gram overflows at a norm of 256 and
    its cosines became NaN. Callers round the result to :func:`_gram_dtype` once.
    """
    dtype = _gram_dtype(a + b)
    work = torch.float32 if dtype in _HALF else dtype
    out = None
    for x, y in zip(a, b):
        x, y = x.to(work), y.to(work)
        out = x @ y.T if out is None else out.addmm(x, y.T)
    assert out is not None
    return out


def _to_cosine(g: torch.Tensor, eps: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Cosines from a Gram matrix, in at least float32 (``eps`` is 0 in float16), as ``dtype``."""
    dtype = g.dtype if dtype is None else dtype
    g = widen(g)
    norms = g.diagonal().clamp_min(0).sqrt().clamp_min(eps)
    return (g / norms[:, None] / norms[None, :]).to(dtype)


def grad_gram(grads: PyTree, cosine: bool = False, eps: float = 1e-30) -> torch.Tensor:
    """Gram matrix ``⟨gᵢ, gⱼ⟩`` (or cosine similarities) between per-sample gradients.

    Args:
        grads: per-sample gradients with a leading batch dimension ``n``.
        cosine: divide by ``‖gᵢ‖·‖gⱼ‖`` (a zero gradient gets cosine 0 with everything).
            The cosines come from the Gram matrix, in at least float32: a gradient whose
            squared norm overflows that dtype (float32: a norm above about 1.8e19) gives NaN,
            and one whose squared norm underflows it gets cosine 0.
        eps: floor on norms when ``cosine``.

    Returns:
        An ``(n, n)`` tensor.

    Example:
        >>> import torch, functrain as ft
        >>> ft.grad_gram({"w": torch.tensor([[1.0, 0.0], [1.0, 1.0]])}, cosine=True)
        tensor([[1.0000, 0.7071],
                [0.7071, 1.0000]])
    """
    leaves = tree.leaves(grads)
    if not leaves:
        raise ValueError("gram needs at least one gradient leaf")
    _check_rows(leaves, grads)
    rows = [row_matrix(x) for x in leaves]
    g = _cross_gram(rows, rows)
    dtype = _gram_dtype(rows)
    return _to_cosine(g, eps, dtype) if cosine else g.to(dtype)


def tree_gram(trees: Sequence[PyTree], cosine: bool = False, eps: float = 1e-30) -> torch.Tensor:
    """Gram / cosine matrix between ``K`` gradient pytrees (e.g. the micro-batch gradients).

    Args:
        trees: ``K`` pytrees of real tensors with the same structure and leaf shapes.
        cosine: divide by ``‖gᵢ‖·‖gⱼ‖`` (a zero gradient gets cosine 0 with everything).
        eps: floor on norms when ``cosine``.

    Returns:
        A ``(K, K)`` tensor in the leaves' promoted dtype (half precision multiplied, and
        cosines formed, in float32, then rounded once).

    Raises:
        ValueError: no trees, or trees without leaves; ``TreeMismatchError`` (a
            ``ValueError``) when structures or shapes differ.
        TypeError: a complex leaf.

    Example:
        >>> import torch, functrain as ft
        >>> g1, g2 = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 2.0])}
        >>> ft.tree_gram([g1, g2])
        tensor([[1., 2.],
                [2., 8.]])
    """
    if len(trees) == 0:
        raise ValueError("tree_gram needs at least one tree")
    first, spec = tree.flatten(trees[0])
    for k, t in enumerate(trees[1:], 1):
        tree.check_shapes(trees[0], t, ("trees[0]", f"trees[{k}]"))
    columns = [first] + [
        tree.flatten_up_to(spec, t, ("trees[0]", f"trees[{k}]"), trees[0])
        for k, t in enumerate(trees[1:], 1)
    ]
    if any(x.is_complex() for x in tree.leaves(columns)):
        raise TypeError("tree_gram needs real leaves (its inner products do not conjugate)")
    # One (K, size) matrix per leaf: K inner products per leaf via a single matmul.
    stacked = [torch.stack(leaf_k).reshape(len(trees), -1) for leaf_k in zip(*columns)]
    if not stacked:
        raise ValueError("tree_gram needs trees with at least one leaf")
    g = _cross_gram(stacked, stacked)
    dtype = _gram_dtype(stacked)
    return _to_cosine(g, eps, dtype) if cosine else g.to(dtype)
