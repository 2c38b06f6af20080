"""Reduce-on-plateau scaling of the updates (optax's ``contrib.reduce_on_plateau``)."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import GradientTransformation

__all__ = ["ReduceLROnPlateauState", "reduce_on_plateau"]


class ReduceLROnPlateauState(NamedTuple):
    """State of :func:`reduce_on_plateau` (0-d tensors on the params' device).

    Attributes:
        scale: the factor the updates are multiplied by (lowest float dtype of the params).
        best_value: the best averaged value seen so far (highest float dtype of the params).
        plateau_count: int32 number of averaged values without improvement.
        cooldown_count: int32 number of averaged values still to wait after a reduction.
        count: int32 number of values accumulated towards the next average.
        avg_value: running mean of the values accumulated so far.

    Example:
        >>> import torch, functrain as ft
        >>> ft.reduce_on_plateau().init([torch.zeros(1)]).scale
        tensor(1.)
    """

    scale: torch.Tensor
    best_value: torch.Tensor
    plateau_count: torch.Tensor
    cooldown_count: torch.Tensor
    count: torch.Tensor
    avg_value: torch.Tensor


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _float_dtypes(params: Any) -> tuple[torch.dtype, torch.dtype]:
    """The lowest and highest floating dtypes (by size) of the params, default dtype if none."""
    dtypes = [x.dtype for x in tree.leaves(params) if isinstance(x, torch.Tensor)]
    floats = [d for d in dtypes if d.is_floating_point] or [torch.get_default_dtype()]
    ordered = sorted(floats, key=lambda d: torch.finfo(d).bits)
    return ordered[0], ordered[-1]


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
) -> GradientTransformation:
    """Multiplies the updates by a scale that drops by ``factor`` when a value stops improving.

    ``update(updates, state, params, value=loss)`` reads the monitored value (a 0-d tensor or a
    number; :func:`functrain.make_train_step` passes the step's mean loss). Values are averaged
    over ``accumulation_size`` calls; each full average ``a`` then runs::

        improved = a < (1 − rtol) · best − atol
        best ← a if improved
        bad ← 0 if improved else bad + 1
        if cooldown_count > 0:  cooldown_count ← cooldown_count − 1; bad ← 0
        elif bad == patience:   scale ← max(scale · factor, min_scale);
                                bad ← 0; cooldown_count ← cooldown

    and the updates are multiplied by the (new) scale. Every decision is a ``torch.where`` on
    the device: no host reads. Place it after the optimizer, e.g.
    ``ft.chain(ft.adam(1e-3), ft.reduce_on_plateau())``.

    Differences from ``torch.optim.lr_scheduler.ReduceLROnPlateau``:
        * It scales the updates (a factor starting at 1) instead of the learning rate;
          ``min_scale`` is torch's ``min_lr`` divided by the initial learning rate.
        * One improvement test ``a < (1 − rtol)·best − atol`` for ``mode="min"``: torch's
          ``threshold_mode="rel"`` is ``atol=0, rtol=threshold``, ``"abs"`` is
          ``rtol=0, atol=threshold``. There is no ``mode="max"`` (pass ``-value``).
        * ``patience`` counts differently: the scale drops when the count of bad values
          *reaches* ``patience``; torch reduces when it *exceeds* it. optax's ``patience=p``
          is torch's ``patience=p - 1``.
        * torch skips a reduction smaller than ``eps``; here there is no ``eps``.
        * ``accumulation_size`` averages several values (e.g. per-batch losses) before the test.

    The step's ``lr`` metric is the learning rate before this scale. Inside
    :class:`~functrain.MultiSteps` the transform sees the value of the mini-step that completes
    each accumulation only, as in optax.

    Args:
        factor: multiplier of the scale at a reduction, in ``(0, 1)``.
        patience: number of averaged values without improvement that triggers a reduction.
        rtol: relative tolerance of the improvement test, in ``[0, 1]``.
        atol: absolute tolerance of the improvement test, ``>= 0``; ``rtol`` or ``atol`` must
            be positive.
        cooldown: number of averaged values after a reduction during which nothing is counted.
        accumulation_size: number of values averaged before each test (``>= 1``).
        min_scale: lower bound of the scale.

    Returns:
        A :class:`GradientTransformation` whose state is a :class:`ReduceLROnPlateauState`.

    Raises:
        ValueError: on hyperparameters out of range.
        TypeError: from ``update`` when ``value`` is missing or not a single number.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.reduce_on_plateau(factor=0.5, patience=1)
        >>> state = tx.init([torch.zeros(1)])
        >>> for loss in [1.0, 1.0]:
        ...     u, state = tx.update([torch.ones(1)], state, value=loss)
        >>> u
        [tensor([0.5000])]
    """
    _utils.check_finite_number("factor", factor)
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor!r}")
    _utils.check_finite_number("rtol", rtol)
    _utils.check_finite_number("atol", atol)
    if rtol < 0.0 or atol < 0.0:
        raise ValueError(f"rtol and atol must be non-negative, got rtol={rtol!r}, atol={atol!r}")
    if rtol == 0.0 and atol == 0.0:
        raise ValueError("at least one of rtol and atol must be positive, got both 0")
    if rtol > 1.0:
        raise ValueError(f"rtol must be <= 1, got {rtol!r}")
    _check_int("patience", patience, 0)
    _check_int("cooldown", cooldown, 0)
    _check_int("accumulation_size", accumulation_size, 1)
    _utils.check_finite_number("min_scale", min_scale)
    if min_scale < 0.0:
        raise ValueError(f"min_scale must be non-negative, got {min_scale!r}")

    def init_fn(params: Any) -> ReduceLROnPlateauState:
        low, high = _float_dtypes(params)
        device = _utils.default_device(params)
        zero = torch.zeros((), dtype=torch.int32, device=device)
        return ReduceLROnPlateauState(
            scale=torch.ones((), dtype=low, device=device),
            best_value=torch.full((), float("inf"), dtype=high, device=device),
            plateau_count=zero,
            cooldown_count=zero.clone(),
            count=zero.clone(),
            avg_value=torch.zeros((), dtype=high, device=device),
        )

    def _test(s: ReduceLROnPlateauState, avg: torch.Tensor) -> ReduceLROnPlateauState:
        """The plateau test on a full average (computed always, selected by the caller)."""
        improved = avg < (1.0 - rtol) * s.best_value - atol
        best = torch.where(improved, avg, s.best_value)
        bad = torch.where(improved, 0, _utils.safe_increment(s.plateau_count))
        cooling = s.cooldown_count > 0
        reduce = (bad == patience) & ~cooling
        scaled = torch.clamp_min(torch.where(reduce, s.scale * factor, s.scale), min_scale)
        zero = torch.zeros_like(s.count)
        return ReduceLROnPlateauState(
            scale=torch.where(cooling, s.scale, scaled).to(s.scale.dtype),
            best_value=best,
            plateau_count=torch.where(cooling | reduce, zero, bad).to(torch.int32),
            cooldown_count=torch.where(
                cooling, s.cooldown_count - 1, torch.where(reduce, cooldown, 0)
            ).to(torch.int32),
            count=zero,
            avg_value=torch.zeros_like(s.avg_value),
        )

    def update_fn(
        updates: Any,
        state: ReduceLROnPlateauState,
        params: Any = None,
        *,
        value: Any = None,
        **extra: Any,
    ) -> tuple[Any, ReduceLROnPlateauState]:
        del params, extra
        if value is None:
            raise TypeError(
                "reduce_on_plateau needs the monitored value: call "
                "tx.update(updates, state, params, value=loss) (ft.make_train_step passes the "
                "step's loss)"
            )
        avg_dtype, device = state.avg_value.dtype, state.avg_value.device
        v = torch.as_tensor(value).detach()
        if v.numel() != 1 or v.is_complex():
            raise TypeError(f"value must be a single real number, got shape {tuple(v.shape)}")
        v = v.reshape(()).to(device=device, dtype=avg_dtype)
        count = _utils.safe_increment(state.count)
        avg = (state.count.to(avg_dtype) * state.avg_value + v) / count.to(avg_dtype)
        full = count == accumulation_size
        tested = _test(state, avg)
        new_state = ReduceLROnPlateauState(
            *(
                torch.where(full, t, s)
                for t, s in zip(tested, state._replace(count=count, avg_value=avg))
            )
        )
        scale = new_state.scale
        out = tree.map(lambda g: g * scale.to(g.dtype), updates)
        return out, new_state

    return GradientTransformation(init_fn, update_fn)
