"""Clipping transforms: element-wise, global-norm, per-block RMS and adaptive (AGC) clipping."""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree
from functrain.optim import _ops, _utils, fused
from functrain.optim.base import EmptyState, GradientTransformation

__all__ = [
    "ClipByGlobalNormState",
    "ClipState",
    "adaptive_grad_clip",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "unitwise_norm",
]

ClipState = EmptyState
ClipByGlobalNormState = EmptyState


def clip(max_delta: float | torch.Tensor) -> GradientTransformation:
    """Clamps every update element to ``[-max_delta, max_delta]``.

    Like ``torch.nn.utils.clip_grad_value_``.

    Args:
        max_delta: the largest allowed absolute value of an update element.

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

        def clip_leaf(u: torch.Tensor) -> torch.Tensor:
            bound = _ops.on_device(max_delta, u)
            return torch.clamp(u, -bound, bound)

        return tree.map(clip_leaf, updates), state

    return GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Rescales updates so that their global L2 norm is at most ``max_norm``.

    Update rule: ``u ← u`` if ``‖u‖ < max_norm`` else ``u · max_norm / ‖u‖``.

    Differences from ``torch.nn.utils.clip_grad_norm_``: PyTorch multiplies by
    ``min(1, max_norm / (‖u‖ + 1e-6))``; optax and functrain add no epsilon and leave updates
    whose norm is below ``max_norm`` bit-for-bit unchanged.

    Args:
        max_norm: the largest allowed global L2 norm.

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
        bound = _ops.on_device(max_norm, g_norm)
        factor = torch.where(g_norm < bound, torch.ones_like(g_norm), bound / g_norm)
        return tree.unflatten(spec, _ops.mul(leaves, factor)), state  # each in its leaf's dtype

    tx = GradientTransformation(init_fn, update_fn)
    return fused.register(tx, fused.ClipByGlobalNorm(max_norm))


def _init_empty(params: Any) -> EmptyState:
    del params
    return EmptyState()


def clip_by_block_rms(threshold: float | torch.Tensor) -> GradientTransformation:
    """Clips each leaf ("block") of the updates to a root-mean-square of at most ``threshold``.

    Update rule, per leaf: ``u ← u / max(1, rms(u) / threshold)`` with ``rms(u) = √mean(u²)``.

    Args:
        threshold: the largest allowed RMS of each leaf's update.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.clip_by_block_rms(1.0)
        >>> tx.update([torch.tensor([3.0, -3.0]), torch.tensor([0.5])], tx.init(None))[0]
        [tensor([ 1., -1.]), tensor([0.5000])]
    """
    _utils.check_finite_number("threshold", threshold, minimum=0.0)

    def clip_leaf(u: torch.Tensor) -> torch.Tensor:
        rms = u.square().mean().sqrt()
        return u / torch.clamp_min(rms / _ops.on_device(threshold, u), 1.0)

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        leaves, spec, _ = _utils.flat(updates, {})  # names a non-float leaf's path
        return tree.unflatten(spec, [clip_leaf(u) for u in leaves]), state

    return GradientTransformation(_init_empty, update_fn)


def unitwise_norm(x: torch.Tensor, axis: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """The L2 norm of each "unit" of ``x``, broadcast back to ``x``'s shape.

    With ``axis=None`` the units follow PyTorch layouts: a scalar or vector (also after
    squeezing) is one unit; otherwise each slice along dimension 0 (an output unit of a
    ``Linear`` weight ``(out, in)`` or a ``Conv`` kernel ``(out, in, *k)``) is a unit, i.e.
    the norm reduces every dimension but the first.

    Differences from ``optax.unitwise_norm``: optax assumes JAX layouts (``(in, out)``
    matrices, ``HWIO`` kernels) and reduces the *leading* dimensions; on PyTorch layouts that
    would mix output units, so functrain reduces the *trailing* ones. Pass ``axis`` to choose
    the reduced dimensions explicitly (then both libraries agree).

    Args:
        x: the tensor.
        axis: dimensions that form a unit; ``None`` for the PyTorch-layout default.

    Example:
        >>> import torch, functrain as ft
        >>> ft.unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[5., 5.],
                [1., 1.]])
    """
    if axis is not None:
        sq = x.square().sum(dim=axis, keepdim=True)
    elif x.squeeze().dim() <= 1:
        sq = x.square().sum().reshape([1] * x.dim())
    else:
        sq = x.square().sum(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.broadcast_to(sq.sqrt(), x.shape)


def adaptive_grad_clip(
    clipping: float | torch.Tensor,
    eps: float | torch.Tensor = 1e-3,
    axis: int | tuple[int, ...] | None = None,
) -> GradientTransformation:
    """Adaptive gradient clipping (Brock et al., 2021): per unit, ``‖u‖ ≤ clipping · ‖p‖``.

    Update rule, for each unit (see :func:`unitwise_norm`)::

        limit = clipping · max(‖p‖, eps)
        u ← u                               if ‖u‖ < limit
        u ← u · limit / max(‖u‖, 1e-6)      otherwise

    Differences from optax: the default units follow PyTorch weight layouts (norms over all
    dimensions but the first); see :func:`unitwise_norm`.

    Args:
        clipping: maximum ratio of update norm to parameter norm.
        eps: lower bound of the parameter norm (so zero-initialised weights still move).
        axis: dimensions reduced to form a unit (``None``: the PyTorch-layout default).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adaptive_grad_clip(0.1)
        >>> params = [torch.tensor([[3.0, 4.0]])]
        >>> tx.update([torch.tensor([[6.0, 8.0]])], tx.init(params), params)[0]
        [tensor([[0.3000, 0.4000]])]
    """
    _utils.check_finite_number("clipping", clipping, minimum=0.0)
    _utils.check_finite_number("eps", eps, minimum=0.0)

    def clip_leaf(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        g_norm = unitwise_norm(u, axis)
        p_norm = unitwise_norm(p, axis).to(u.dtype)
        max_norm = _ops.on_device(clipping, u) * torch.clamp_min(p_norm, _ops.on_device(eps, u))
        clipped = u * (max_norm / torch.clamp_min(g_norm, 1e-6))
        return torch.where(g_norm < max_norm, u, clipped)

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del extra
        if params is None:
            raise ValueError("adaptive_grad_clip needs params: call update(updates, state, params)")
        g, spec, other = _utils.flat(updates, {"params": params})
        out = [u if u is None or p is None else clip_leaf(u, p) for u, p in zip(g, other["params"])]
        return tree.unflatten(spec, out), state

    return GradientTransformation(_init_empty, update_fn)
