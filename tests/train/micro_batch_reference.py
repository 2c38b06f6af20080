"""Reference micro-batch gradients for the ``grad_stats`` tests: ``torch.autograd.grad`` of
``loss_fn`` on each consecutive slice of the batch, at fixed parameters."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import functrain as ft


def micro_batch_grads(
    loss_fn: Callable[[Any, Any], torch.Tensor], params: Any, batch: Any, sizes: Sequence[int]
) -> list[list[torch.Tensor]]:
    """Each slice's gradient leaves, in ``params``' leaf order (zeros for unused leaves)."""
    out, start = [], 0
    for n in sizes:
        rows = ft.tree.map(lambda v, a=start, b=start + n: v[a:b], batch)
        leaves = [p.clone().requires_grad_() for p in ft.tree.leaves(params)]
        tracked = ft.tree.unflatten(ft.tree.structure(params), leaves)
        grads = torch.autograd.grad(loss_fn(tracked, rows), leaves, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)])
        start += n
    return out
