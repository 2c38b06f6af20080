"""Clipping transforms: element-wise and global-norm clipping of updates."""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import EmptyState, GradientTransformation

__all__ = [
    "clip",
    "clip_by_global_norm",
]


def clip(max_delta: float | torch.Tensor) -> GradientTransformation:
    """Clamps every update element to ``[-max_delta, max_delta]``.

    Like ``torch.nn.utils.clip_grad_value_``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.clip(1.0)
        >>> tx.update([torch.tensor([-3.0, 0.5, 2.0])], tx.init(None))[0]
        [tensor([-1.0000,  0.5000,  1.0000])]
    """
    _utils.check_finite_number("max_delta", max_delta, minimum=0.0)

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        return tree.map(lambda u: torch.clamp(u, -max_delta, max_delta), updates), state

    return GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Rescales updates so that their global L2 norm is at most ``max_norm``.

    Update rule: ``u ← u`` if ``‖u‖ < max_norm`` else ``u · max_norm / ‖u‖``.

    Differences from ``torch.nn.utils.clip_grad_norm_``: PyTorch multiplies by
    ``min(1, max_norm / (‖u‖ + 1e-6))``; optax and functrain add no epsilon and leave updates
    whose norm is below ``max_norm`` bit-for-bit unchanged.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.clip_by_global_norm(1.0)
        >>> tx.update([torch.tensor([3.0, 4.0])], tx.init(None))[0]
        [tensor([0.6000, 0.8000])]
    """
    _utils.check_finite_number("max_norm", max_norm, minimum=0.0)

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        leaves, spec = tree.flatten(updates)
        if not leaves:
            return updates, state
        g_norm = tree.norm(updates)
        factor = torch.where(g_norm < max_norm, torch.ones_like(g_norm), max_norm / g_norm)
        return tree.unflatten(spec, torch._foreach_mul(leaves, factor)), state

    return GradientTransformation(init_fn, update_fn)
