"""Scaling transforms: fixed scales, learning rates, schedules, signs and trust ratios."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import widen, widen_all
from functrain.optim import _ops, _utils, fused
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import EmptyState, GradientTransformation, identity

__all__ = [
    "ScaleByScheduleState",
    "ScaleByTrustRatioState",
    "ScaleState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_param_block_norm",
    "scale_by_param_block_rms",
    "scale_by_schedule",
    "scale_by_sign",
    "scale_by_trust_ratio",
]

ScaleState = EmptyState
ScaleByTrustRatioState = EmptyState

_NO_PARAMS = "{name} needs params: call update(updates, state, params)"


def _init_empty(params: Any) -> EmptyState:
    del params
    return EmptyState()


def _scale_leaves(leaves: list[Any], factor: Any) -> list[Any]:
    return _ops.mul(leaves, factor)


def _stateless_map(
    fn: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> GradientTransformation:
    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        leaves, spec = tree.flatten(updates)
        return tree.unflatten(spec, fn(leaves)), state

    return GradientTransformation(_init_empty, update_fn)


def scale(step_size: float | torch.Tensor) -> GradientTransformation:
    """Multiplies updates by a fixed ``step_size``.

    Update rule: ``u ← step_size · u``.

    Args:
        step_size: a number or a 0-d tensor (a tensor may be changed in place between steps:
            it is read at every update, so a compiled step does not recompile).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale(-0.1)
        >>> tx.update({"w": torch.ones(2)}, tx.init(None))[0]
        {'w': tensor([-0.1000, -0.1000])}
    """
    _utils.check_finite_number("step_size", step_size)
    tx = _stateless_map(lambda leaves: _scale_leaves(leaves, step_size))
    return fused.register(tx, fused.Scale(step_size))


class ScaleByScheduleState(NamedTuple):
    """State of :func:`scale_by_schedule`: the int32 step ``count``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_schedule(lambda n: 0.1).init([torch.ones(1)])
        ScaleByScheduleState(count=tensor(0, dtype=torch.int32))
    """

    count: torch.Tensor


def scale_by_schedule(step_size_fn: Callable[[torch.Tensor], Any]) -> GradientTransformation:
    """Multiplies updates by ``step_size_fn(count)``, then increments ``count``.

    The schedule is evaluated at the count *before* the increment, so the first update uses
    ``step_size_fn(0)``, as in optax. The count is an int32 tensor, so a schedule written with
    tensor operations compiles once and never recompiles as the step advances.

    Args:
        step_size_fn: schedule ``count -> step size`` (a number or a 0-d tensor).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_schedule(lambda n: 1.0 / (n + 1))
        >>> state = tx.init(None)
        >>> u, state = tx.update([torch.ones(1)], state)
        >>> u, state = tx.update([torch.ones(1)], state)
        >>> u
        [tensor([0.5000])]
    """
    if not callable(step_size_fn):
        raise TypeError(f"step_size_fn must be callable, got {step_size_fn!r}")

    def init_fn(params: Any) -> ScaleByScheduleState:
        return ScaleByScheduleState(count=_utils.zero_count(params))

    def update_fn(
        updates: Any, state: ScaleByScheduleState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByScheduleState]:
        del params, extra
        leaves, spec = tree.flatten(updates)
        factor = step_size_fn(state.count)
        new = tree.unflatten(spec, _scale_leaves(leaves, factor))
        return new, ScaleByScheduleState(count=_utils.safe_increment(state.count))

    tx = GradientTransformation(init_fn, update_fn)
    return fused.register(tx, fused.ScaleBySchedule(step_size_fn))


def scale_by_learning_rate(
    learning_rate: ScalarOrSchedule | None = None, *, flip_sign: bool = True
) -> GradientTransformation:
    """Scales updates by ``-learning_rate`` (or ``+learning_rate`` with ``flip_sign=False``).

    ``learning_rate`` is a number, a 0-d tensor (read at every update, so it can be changed in
    place without recompiling) or a schedule of the step count (see :func:`scale_by_schedule`).
    ``None`` means no scaling (the identity), as in optax.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        flip_sign: scale by ``-learning_rate`` (descent) when ``True``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_learning_rate(0.5)
        >>> tx.update([torch.ones(1)], tx.init(None))[0]
        [tensor([-0.5000])]
    """
    if learning_rate is None:
        return identity()
    _utils.check_finite_number("learning_rate", learning_rate)
    sign = -1 if flip_sign else 1
    if callable(learning_rate):
        return scale_by_schedule(lambda count: sign * learning_rate(count))
    if isinstance(learning_rate, torch.Tensor):
        # Negate at update time so that a learning-rate tensor changed in place takes effect.
        tx = _stateless_map(lambda leaves: _scale_leaves(leaves, sign * learning_rate))
        return fused.register(tx, fused.Scale(learning_rate, sign))
    return scale(sign * learning_rate)


def scale_by_sign() -> GradientTransformation:
    """Replaces every update element by its sign (``-1``, ``0`` or ``1``).

    A complex element becomes its phase ``u / |u|`` (0 at 0), as ``jnp.sign`` in optax.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_sign()
        >>> tx.update([torch.tensor([-2.0, 0.0, 0.3])], tx.init(None))[0]
        [tensor([-1.,  0.,  1.])]
    """
    # A function of scale_by_sign's own: distributed.shardable recognises it by that name.
    return _stateless_map(lambda leaves: _ops.sign(leaves))


def _leaf_pairs(name: str, updates: Any, params: Any) -> tuple[list[Any], Any, list[Any]]:
    if params is None:
        raise ValueError(_NO_PARAMS.format(name=name))
    g, spec, other = _utils.flat(updates, {"params": params})
    return g, spec, other["params"]


def scale_by_trust_ratio(
    min_norm: float | torch.Tensor = 0.0,
    trust_coefficient: float | torch.Tensor = 1.0,
    eps: float | torch.Tensor = 0.0,
) -> GradientTransformation:
    """Scales each leaf's update by its trust ratio ``‖p‖ / ‖u‖`` (LARS, LAMB).

    Update rule, per leaf (each tensor is one "layer")::

        ‖p‖ ← max(‖p‖, min_norm),  ‖u‖ ← max(‖u‖, min_norm)
        ratio = trust_coefficient · ‖p‖ / (‖u‖ + eps), or 1 where ‖p‖ = 0 or ‖u‖ = 0
        u ← ratio · u

    float16/bfloat16 leaves are computed in float32 and rounded once (optax: in the leaf's
    dtype, where a ratio above 65504, ``‖p‖ = 3`` and ``‖u‖ = 4e-5`` say, is inf).

    Args:
        min_norm: lower bound for both norms (0 disables it).
        trust_coefficient: multiplier of the ratio.
        eps: added to the update norm in the denominator.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_trust_ratio()
        >>> params = [torch.tensor([3.0, 4.0])]
        >>> tx.update([torch.tensor([0.6, 0.8])], tx.init(params), params)[0]
        [tensor([3., 4.])]
    """
    for name, value in (("min_norm", min_norm), ("eps", eps)):
        _utils.check_finite_number(name, value, minimum=0.0)
    _utils.check_finite_number("trust_coefficient", trust_coefficient)

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del extra
        g, spec, p = _leaf_pairs("scale_by_trust_ratio", updates, params)
        out = list(g)
        idx = [i for i, (u, w) in enumerate(zip(g, p)) if u is not None and w is not None]
        if idx:
            # float16/bfloat16 leaves in float32, rounded once: a float16 ratio above 65504
            # (‖p‖ = 3, ‖u‖ = 4e-5) was inf, and so was the update.
            p_norms = _foreach.norm(widen_all([p[i] for i in idx]))
            u_norms = _foreach.norm(widen_all([g[i] for i in idx]))
            for i, pn, un in zip(idx, p_norms, u_norms):
                u = widen(g[i])
                # The norms are real for complex leaves too (clamp has no complex kernel).
                pn = torch.clamp_min(pn.to(_ops.real_dtype(u.dtype)), _ops.on_device(min_norm, u))
                un = torch.clamp_min(un, _ops.on_device(min_norm, u))
                # A double where: a zero update norm's inf ratio, though discarded, made every
                # derivative through the update NaN (0·inf; a leaf with zero gradients in LAMB).
                bad = (pn == 0) | (un == 0)
                den = torch.where(bad, torch.ones_like(un), un + _ops.on_device(eps, u))
                ratio = _ops.on_device(trust_coefficient, u) * pn / den
                safe = torch.where(bad, torch.ones_like(ratio), ratio)
                out[i] = (u * safe.to(u.dtype)).to(g[i].dtype)
        return tree.unflatten(spec, out), state

    return GradientTransformation(_init_empty, update_fn)


def _clamped_norm(w: torch.Tensor, floor: Any) -> torch.Tensor:
    """``max(‖w‖, floor)``; torch's norm has a finite derivative at 0 (optax's ``safe_norm``)."""
    return torch.clamp_min(torch.linalg.vector_norm(w), floor)


def _clamped_rms(w: torch.Tensor, floor: Any) -> torch.Tensor:
    """``max(sqrt(mean(|w|²)), floor)`` with optax's ``safe_root_mean_squares`` derivative.

    ``clamp_min(sqrt(...))`` has a NaN derivative at ``w = 0``: the clamp sends ``sqrt`` a zero
    cotangent, and ``0 / (2·sqrt(0))`` is NaN. Where the floor wins, the root is taken of 1
    instead (a double ``where``), so the derivative there is 0, as optax's. Same values.
    """
    sq = _ops.abs_sq(w).mean()
    small = sq.sqrt() <= floor
    root = torch.where(small, torch.ones_like(sq), sq).sqrt()
    return torch.where(small, floor, root)


def _scale_by_param_block(
    name: str,
    min_scale: float | torch.Tensor,
    stat_fn: Callable[[torch.Tensor, Any], torch.Tensor],
) -> GradientTransformation:
    _utils.check_finite_number("min_scale", min_scale, minimum=0.0)

    def _scaled_by_block(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # float16/bfloat16 in float32, rounded once: |p|² of a float16 entry above 256 was inf,
        # and so were the rms and the update.
        x = widen(u)
        stat = stat_fn(widen(w), _ops.on_device(min_scale, w))
        return (x * stat.to(x.dtype)).to(u.dtype)

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del extra
        g, spec, p = _leaf_pairs(name, updates, params)
        out = [u if u is None or w is None else _scaled_by_block(u, w) for u, w in zip(g, p)]
        return tree.unflatten(spec, out), state

    return GradientTransformation(_init_empty, update_fn)


def scale_by_param_block_norm(min_scale: float | torch.Tensor = 1e-3) -> GradientTransformation:
    """Scales each leaf's update by ``max(‖p‖, min_scale)``, the L2 norm of its parameter.

    float16/bfloat16 leaves are computed in float32 and rounded once.

    Args:
        min_scale: lower bound of the parameter-block statistic.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_param_block_norm()
        >>> params = [torch.tensor([3.0, 4.0])]
        >>> tx.update([torch.ones(2)], tx.init(params), params)[0]
        [tensor([5., 5.])]
    """
    return _scale_by_param_block("scale_by_param_block_norm", min_scale, _clamped_norm)


def scale_by_param_block_rms(min_scale: float | torch.Tensor = 1e-3) -> GradientTransformation:
    """Scales each leaf's update by ``max(rms(p), min_scale)`` (used by :func:`adafactor`).

    ``rms(p) = sqrt(mean(|p|²))`` over the whole parameter tensor. float16/bfloat16 leaves are
    computed in float32 and rounded once (optax: in the leaf's dtype, where ``|p|²`` of a
    float16 entry above 256 overflows). Where ``min_scale`` wins (``p = 0`` included) the
    derivative w.r.t. ``p`` is 0, as optax's ``safe_root_mean_squares``, not NaN.

    Args:
        min_scale: lower bound of the parameter-block statistic.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_param_block_rms()
        >>> params = [torch.tensor([3.0, -3.0])]
        >>> tx.update([torch.ones(2)], tx.init(params), params)[0]
        [tensor([3., 3.])]
    """
    return _scale_by_param_block("scale_by_param_block_rms", min_scale, _clamped_rms)
