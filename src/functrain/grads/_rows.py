"""Per-example rows of per-sample gradient leaves (internal): norms and checks.

Shared by :mod:`functrain.grads.stats`, :mod:`functrain.grads._gram` and
:mod:`functrain.grads.clipping`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from functrain import tree
from functrain.grads._per_example import batch_size_of

PyTree = Any


def row_matrix(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a ``(batch, -1)`` matrix; ``reshape(n, -1)`` is ambiguous for an empty batch."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def leaf_row_norms(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-example L2 norm of each leaf: ``(batch,)`` tensors (``vector_norm`` was fastest)."""
    return [torch.linalg.vector_norm(row_matrix(x), dim=1) for x in leaves]


def global_row_norms(leaf_norms: list[torch.Tensor]) -> torch.Tensor:
    """Per-example global norm from per-leaf norms: ``sqrt(Σ_leaves norm²)``."""
    if len(leaf_norms) == 1:
        return leaf_norms[0]
    return torch.linalg.vector_norm(torch.stack(leaf_norms), dim=0)


def _check_rows(leaves: list[torch.Tensor], grads: PyTree, complex_ok: bool = False) -> None:
    """Every leaf is a floating-point tensor with the first leaf's leading dimension; else
    the error names the first leaf at fault (see ``batch_size_of``). Complex leaves only
    where ``complex_ok``: moments and Gram matrices here are real formulas (no conjugation)."""
    n = leaves[0].shape[0] if isinstance(leaves[0], torch.Tensor) and leaves[0].dim() else None
    if all(
        isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n and x.is_floating_point()
        for x in leaves
    ):
        return
    batch_size_of(grads, "grads")
    paths, leaves, _ = tree.flatten_with_paths(grads)
    for path, x in zip(paths, leaves):
        if not (x.is_floating_point() or (complex_ok and x.is_complex())):
            where = tree.path_str(path, "grads")
            raise TypeError(f"{where} must be a real floating-point tensor, got {x.dtype}")
