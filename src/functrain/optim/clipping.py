"""Clipping transforms: element-wise, global-norm, per-block RMS and adaptive (AGC) clipping."""

from __future__ import annotations

from typing import Any

import torch

from functrain import tree
from functrain._precision import HALF as _HALF
from functrain.optim import _ops, _utils, fused
from functrain.optim.base import EmptyState, GradientTransformation

__all__ = [
    "AdaptiveGradClipState",
    "ClipByGlobalNormState",
    "ClipState",
    "adaptive_grad_clip",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "unitwise_clip",
    "unitwise_norm",
]

AdaptiveGradClipState = EmptyState
ClipState = EmptyState
ClipByGlobalNormState = EmptyState

_REAL_OF_COMPLEX = {
    torch.complex32: torch.float16,
    torch.complex64: torch.float32,
    torch.complex128: torch.float64,
}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` with half-precision parts widened to float32 (other dtypes as they are).

    Squares of float16 values above 256 overflow, so a norm or RMS reduced in float16 came out
    ``inf`` and the clipping factor ``bound / inf`` zeroed (or, in AGC, NaN'd) the updates.
    """
    if x.dtype in _HALF:
        return x.float()
    if x.dtype == torch.complex32:
        return x.to(torch.complex64)
    return x


def _global_clip_factor(leaves: list[torch.Tensor], max_norm: float | torch.Tensor) -> Any:
    """:func:`_clip_factor` of the global norm, which survives a float16 overflow.

    ``tree.norm`` reduces half leaves in float32 and rounds the norm to their dtype, where a
    float16 norm above 65504 became ``inf`` and ``max_norm / inf`` zeroed every update. An
    empty float32 leaf joins the result-dtype promotion, so ``tree.norm`` returns that float32
    norm instead; rounding it gives bitwise ``tree.norm(leaves)`` (the norm the in-place
    engine uses, whose numbers must stay equal), and the float32 norm is used only where that
    rounding overflowed.
    """
    wide = tree.norm([*leaves, leaves[0].new_empty(0, dtype=torch.float32)])
    dtype = leaves[0].dtype
    for x in leaves[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    dtype = _REAL_OF_COMPLEX.get(dtype, dtype)
    if dtype not in _HALF:
        return _clip_factor(wide, max_norm)  # already tree.norm(leaves)'s dtype and bits
    narrow = wide.to(dtype)
    # The select and the norm as in optax (the rounded norm), the division in float32: a Python
    # ``max_norm / narrow`` runs as ``narrow.reciprocal() * max_norm`` in float16, where the
    # reciprocal of a norm below 1/65504 is inf and the updates came out inf.
    factor = _clip_factor(narrow.float(), max_norm)  # a half value is exact in float32
    return torch.where(torch.isinf(narrow), _clip_factor(wide, max_norm).float(), factor)


def _check_hyperparameter(name: str, value: Any) -> None:
    """:func:`_utils.check_finite_number`, and a tensor must be a real 0-d one.

    A tensor of shape ``(1,)`` or ``(n,)`` failed inside ``torch._foreach_mul`` ("scalar
    tensor expected to be 0 dim") or was silently broadcast against the leaves (a per-element
    bound in ``clip``); neither error named the argument. The check reads only the shape and
    dtype, never the value, so it needs no host sync and is free under ``torch.compile``.
    """
    _utils.check_finite_number(name, value, minimum=0.0)
    if not isinstance(value, torch.Tensor):
        return
    if value.dim() != 0:
        raise ValueError(f"{name} must be a 0-d tensor, got shape {tuple(value.shape)}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a real number, got a tensor of dtype {value.dtype}")


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
    _check_hyperparameter("max_delta", max_delta)

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra

        def clip_leaf(u: torch.Tensor) -> torch.Tensor:
            bound = _ops.on_device(max_delta, u)
            if isinstance(bound, torch.Tensor):
                # A 0-d float32 bound promoted a 0-d float16 leaf to float32.
                bound = bound.to(u.dtype)
            return torch.clamp(u, -bound, bound)

        _refuse_complex(updates, "clip")
        return tree.map(clip_leaf, updates), state

    return GradientTransformation(init_fn, update_fn)


def _refuse_complex(updates: Any, name: str) -> None:
    """Raises a ``TypeError`` naming the first complex leaf (complex numbers have no order)."""
    found = _utils.complex_leaf(updates, "updates")
    if found is not None:
        raise TypeError(
            f"{name} clamps real values; {found[0]} is complex "
            "(clip its real and imaginary parts separately)"
        )


def _clip_factor(g_norm: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """``1`` where ``g_norm < max_norm``, else ``max_norm / g_norm`` (optax's select).

    The in-place foreach engine repeats this expression and must stay bitwise equal to it.
    (``number / tensor`` is ``tensor.reciprocal() * number``, so a Python ``max_norm`` and a
    tensor one can give factors one ulp apart.)
    """
    bound = _ops.on_device(max_norm, g_norm)
    return torch.where(g_norm < bound, torch.ones_like(g_norm), bound / g_norm)


def clip_by_global_norm(max_norm: float | torch.Tensor) -> GradientTransformation:
    """Rescales updates so that their global L2 norm is at most ``max_norm``.

    Update rule: ``u ← u`` if ``‖u‖ < max_norm`` else ``u · max_norm / ‖u‖``.

    Differences from ``torch.nn.utils.clip_grad_norm_``: PyTorch multiplies by
    ``min(1, max_norm / (‖u‖ + 1e-6))``; optax and functrain add no epsilon and leave updates
    whose norm is below ``max_norm`` bit-for-bit unchanged. Like optax, a zero tree with
    ``max_norm=0`` and any tree with a NaN norm come out NaN. The norm of float16/bfloat16
    leaves is accumulated in float32 (optax squares in the leaf dtype, where float16 overflows
    above 256) and rounded to their dtype as in optax, except where that rounding overflows:
    a float16 tree of norm above 65504 is rescaled by its float32 norm, not zeroed.

    Args:
        max_norm: the largest allowed global L2 norm.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.clip_by_global_norm(1.0)
        >>> tx.update([torch.tensor([3.0, 4.0])], tx.init(None))[0]
        [tensor([0.6000, 0.8000])]
    """
    _check_hyperparameter("max_norm", max_norm)

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
        factor = _global_clip_factor(leaves, max_norm)
        return tree.unflatten(spec, _ops.mul(leaves, factor)), state  # each in its leaf's dtype

    tx = GradientTransformation(init_fn, update_fn)
    return fused.register(tx, fused.ClipByGlobalNorm(max_norm))


def _init_empty(params: Any) -> EmptyState:
    del params
    return EmptyState()


def clip_by_block_rms(threshold: float | torch.Tensor) -> GradientTransformation:
    """Clips each leaf ("block") of the updates to a root-mean-square of at most ``threshold``.

    Update rule, per leaf: ``u ← u / max(1, rms(u) / threshold)`` with ``rms(u) = √mean(|u|²)``,
    reduced in at least float32.

    Args:
        threshold: the largest allowed RMS of each leaf's update.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.clip_by_block_rms(1.0)
        >>> tx.update([torch.tensor([3.0, -3.0]), torch.tensor([0.5])], tx.init(None))[0]
        [tensor([ 1., -1.]), tensor([0.5000])]
    """
    _check_hyperparameter("threshold", threshold)

    def clip_leaf(u: torch.Tensor) -> torch.Tensor:
        # |u|² (optax's abs_sq: a complex u squared would be complex), in at least float32.
        sq = _ops.abs_sq(_wide(u)).mean()
        # A zero update's √0 had an infinite slope, and the clamp's zero cotangent times it
        # made derivatives through the update NaN.
        rms = _ops.safe_sqrt(sq)
        denom = torch.clamp_min(rms / _ops.on_device(threshold, rms), 1.0)
        return (u / denom).to(u.dtype)  # a 0-d leaf would take the float32 denominator's dtype

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
    the reduced dimensions explicitly (then both libraries agree). The result has ``x``'s real
    dtype; half-precision squares are summed in float32 and rounded once.

    Args:
        x: the tensor.
        axis: dimensions that form a unit; ``None`` for the PyTorch-layout default.

    Returns:
        A tensor of ``x``'s shape (a broadcast view: do not write to it) and real dtype.

    Raises:
        TypeError: an integer or bool ``x``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[5., 5.],
                [1., 1.]])
    """
    if not (x.is_floating_point() or x.is_complex()):
        # The norms were cast back to the integer dtype: [1, 1] gave 1, not √2.
        raise TypeError(f"unitwise_norm needs a floating-point or complex x, got {x.dtype}")
    real = _REAL_OF_COMPLEX.get(x.dtype, x.dtype)
    return torch.broadcast_to(_unit_norms(x, axis).to(real), x.shape)


def _unit_norms(x: torch.Tensor, axis: int | tuple[int, ...] | None) -> torch.Tensor:
    """The unit norms of :func:`unitwise_norm`, not broadcast, in at least float32.

    ``|x|²`` as optax's ``abs_sq`` (a complex ``x·x`` is not its squared modulus).
    """
    sq = _ops.abs_sq(_wide(x))
    if axis is not None:
        sq = sq.sum(dim=axis, keepdim=True)
    elif x.squeeze().dim() <= 1:
        sq = sq.sum().reshape([1] * x.dim())
    else:
        sq = sq.sum(dim=tuple(range(1, x.dim())), keepdim=True)
    return sq.sqrt()


def _unitwise_clip(
    g_norm: torch.Tensor, max_norm: torch.Tensor, grad: torch.Tensor, div_eps: Any
) -> torch.Tensor:
    """:func:`unitwise_clip` without its checks; the norms need only broadcast to ``grad``.

    :func:`adaptive_grad_clip` passes its unit norms unbroadcast (in at least float32).
    """
    clipped = (grad * (max_norm / torch.clamp_min(g_norm, div_eps))).to(grad.dtype)
    return torch.where(g_norm < max_norm, grad, clipped)


def _unit_operand(name: str, value: Any, grad: torch.Tensor) -> torch.Tensor:
    """``g_norm`` or ``max_norm`` of :func:`unitwise_clip` as a real tensor of ``grad``'s shape.

    Shapes must be equal, as optax checks (a norm of the wrong shape would otherwise broadcast
    into a different clipping, or fail inside ``torch.where`` without naming the argument).
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(
                f"unitwise_clip: {name} must be a real floating tensor, got {value.dtype}"
            )
    elif not _utils.is_real_number(value):
        raise TypeError(f"unitwise_clip: {name} must be a tensor or a real number, got {value!r}")
    else:
        value = torch.tensor(
            value, dtype=_REAL_OF_COMPLEX.get(grad.dtype, grad.dtype), device=grad.device
        )
    if value.shape != grad.shape:
        raise ValueError(
            f"unitwise_clip: {name} has shape {tuple(value.shape)} but grad has "
            f"{tuple(grad.shape)}; they must be equal (unitwise_norm gives norms of grad's shape)"
        )
    return _wide(_ops.on_device(value, grad))


def unitwise_clip(
    g_norm: torch.Tensor | float,
    max_norm: torch.Tensor | float,
    grad: torch.Tensor,
    div_eps: float | torch.Tensor = 1e-6,
) -> torch.Tensor:
    """Clips ``grad`` unit by unit, given the units' norms (the core of :func:`adaptive_grad_clip`).

    Element-wise::

        out = grad                                   where g_norm < max_norm
        out = grad · max_norm / max(g_norm, div_eps)  elsewhere

    ``g_norm`` is typically ``unitwise_norm(grad)`` and ``max_norm`` a bound of the same shape
    (AGC: ``clipping · max(unitwise_norm(param), eps)``); ``div_eps`` only guards the division
    (with ``g_norm ≥ max_norm`` it matters only where ``max_norm`` is below it). A NaN
    ``g_norm`` gives NaN (the comparison is false), as in optax.

    Differences from optax: the result has ``grad``'s dtype (optax's promotes it with the
    norms'); float16/bfloat16 norms are divided in float32. Reads nothing back to the host.

    Args:
        g_norm: the norm of the unit of each element of ``grad`` (``grad``'s shape).
        max_norm: the largest allowed unit norm, per element (``grad``'s shape).
        grad: the floating-point (or complex) tensor to clip.
        div_eps: lower bound of the divisor ``g_norm``.

    Returns:
        A tensor of ``grad``'s shape, dtype and device.

    Raises:
        TypeError: a non-floating ``grad``, or a complex or non-numeric norm.
        ValueError: ``g_norm`` or ``max_norm`` of a shape other than ``grad``'s; a negative or
            non-finite ``div_eps``.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain.optim.clipping import unitwise_clip
        >>> grad = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
        >>> g_norm = ft.unitwise_norm(grad)  # 5 for the first row, 0.5 for the second
        >>> unitwise_clip(g_norm, torch.ones(2, 2), grad)
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    if not isinstance(grad, torch.Tensor) or not (grad.is_floating_point() or grad.is_complex()):
        got = grad.dtype if isinstance(grad, torch.Tensor) else type(grad).__name__
        raise TypeError(
            f"unitwise_clip: grad must be a floating-point or complex tensor, got {got}"
        )
    _check_hyperparameter("div_eps", div_eps)
    g = _unit_operand("g_norm", g_norm, grad)
    bound = _unit_operand("max_norm", max_norm, grad)
    return _unitwise_clip(g, bound, grad, _ops.on_device(div_eps, grad))


def _check_axis(axis: Any) -> None:
    """Refuses an ``axis`` that is not ``None``, an int or a non-empty sequence of ints.

    A string or float failed only at the first update, in ``torch.sum``, without naming
    ``axis``. (A dimension out of range is still reported by PyTorch, per leaf.)
    """
    if axis is None:
        return
    dims = axis if isinstance(axis, (tuple, list)) else (axis,)
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"axis must be None, an int or a non-empty tuple of ints, got {axis!r}")


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
    dimensions but the first); see :func:`unitwise_norm`. Norms of float16/bfloat16 leaves are
    computed and compared in float32 (optax: in the leaf dtype, where float16 overflows).

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
    _check_hyperparameter("clipping", clipping)
    _check_hyperparameter("eps", eps)
    _check_axis(axis)

    def clip_leaf(u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        # Norms (not broadcast) in at least float32: in float16 a unit norm above 65504 was inf
        # and the factor inf/inf made the update NaN.
        g_norm = _unit_norms(u, axis)
        p_norm = _unit_norms(p, axis).to(g_norm.dtype)
        bound = torch.clamp_min(p_norm, _ops.on_device(eps, p_norm))
        max_norm = (_ops.on_device(clipping, bound) * bound).to(g_norm.dtype)
        return _unitwise_clip(g_norm, max_norm, u, 1e-6)

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
