"""Dynamic loss scaling for float16 training: ``torch.amp.GradScaler``'s policy as a pure state.

Float16 has a narrow range (about ``6e-8`` to ``65504``): small gradients underflow to zero in
the backward pass. Multiplying the loss by a large scale ``s`` before differentiating moves the
gradients into range; dividing them by ``s`` afterwards gives the true gradients. When ``s`` is
too large the backward pass overflows (``inf``/``NaN`` gradients): the step is then skipped and
``s`` is halved. After ``growth_interval`` finite steps in a row ``s`` is doubled again.

:class:`DynamicLossScale` holds the (static) policy and :class:`LossScaleState` the scale and the
count of finite steps, as tensors on the params' device: nothing reads them on the host.
``make_train_step(..., loss_scale=ft.DynamicLossScale())`` does all of this inside the step
(see :mod:`functrain.train.faults`); the methods below are the same pieces for a custom loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _utils

__all__ = ["DynamicLossScale", "LossScaleState", "all_finite"]


def all_finite(values: Any) -> torch.Tensor:
    """Whether every element of every tensor leaf is finite: a 0-d bool tensor, no host sync.

    A NaN or an inf anywhere gives ``False``. Empty tensors and non-floating leaves count as
    finite; a tree without tensors gives ``True`` (on the CPU). Real CPU tensors are checked with
    ``torch.aminmax`` (one vectorised pass: NaN reaches both ends, ``±inf`` one of them), which
    is several times faster there than the inf-norm used on accelerators and for complex leaves.

    Args:
        values: any pytree; its non-tensor leaves are ignored.

    Returns:
        A 0-d bool tensor on the first checked leaf's device (with none, the first tensor
        leaf's, else PyTorch's default device).

    Example:
        >>> import torch, functrain as ft
        >>> ft.all_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])})
        tensor(False)
        >>> ft.all_finite([torch.zeros(3)])
        tensor(True)
    """
    leaves = [
        x
        for x in tree.leaves(values)
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) and x.numel()
    ]
    if not leaves:
        device = next((x.device for x in tree.leaves(values) if isinstance(x, torch.Tensor)), None)
        return torch.ones((), dtype=torch.bool, device=device)
    device = leaves[0].device
    ends_by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    others = []
    for x in leaves:
        if x.is_cpu and not x.is_complex():
            ends_by_dtype.setdefault(x.dtype, []).extend(torch.aminmax(x))
        else:
            others.append(x)
    # A parameter tree may span devices (model parallel): flags gather on the first one.
    flags = [
        torch.isfinite(torch.stack(ends)).all().reshape(1).to(device)
        for ends in ends_by_dtype.values()
    ]
    if others:
        norms = _foreach.norm(others, float("inf"))
        flags.extend(torch.isfinite(n).reshape(1).to(device) for n in norms)
    return torch.cat(flags).all() if len(flags) > 1 else flags[0].reshape(())


class LossScaleState(NamedTuple):
    """State of :class:`DynamicLossScale`.

    Attributes:
        scale: the current loss scale (0-d float32 tensor).
        growth_tracker: finite steps in a row since the scale last changed (0-d int32 tensor),
            as ``GradScaler``'s ``_growth_tracker``.
    """

    scale: torch.Tensor
    growth_tracker: torch.Tensor


def _check_number(name: str, value: Any, condition: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"DynamicLossScale.{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"DynamicLossScale.{name} must be {condition}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """The dynamic loss-scale policy of ``torch.amp.GradScaler`` (same defaults, same updates).

    Each step: differentiate ``loss · s``; unscale the gradients by ``1 / s`` (the reciprocal
    taken in float64 and rounded to float32, as ``GradScaler`` does); then

    * a non-finite gradient: skip the update, ``s ← s · backoff_factor``, tracker ``← 0``;
    * otherwise tracker ``← tracker + 1``; when it reaches ``growth_interval``:
      ``s ← s · growth_factor`` (only if that is finite) and tracker ``← 0``.

    Pass it to ``make_train_step(..., loss_scale=...)``, which keeps the
    :class:`LossScaleState` in ``state.extra["loss_scale"]`` and reports ``loss_scale`` (the
    scale this step used) in the metrics. For fp16 training keep float32 parameters and run the
    forward under ``torch.autocast(device_type, dtype=torch.float16)`` inside the loss.

    Args:
        init_scale: the first scale (``2**16``).
        growth_factor: multiplies the scale after ``growth_interval`` finite steps (> 1).
        backoff_factor: multiplies the scale after a non-finite step (in (0, 1)).
        growth_interval: finite steps in a row before the scale grows (a positive int).

    Example:
        >>> import torch, functrain as ft
        >>> policy = ft.DynamicLossScale(init_scale=8.0, growth_interval=2)
        >>> s = policy.init()
        >>> grads, finite = policy.unscale(s, {"w": torch.tensor([16.0, float("inf")])})
        >>> bool(finite), float(policy.update(s, finite).scale)   # overflow: halve
        (False, 4.0)
        >>> grads, finite = policy.unscale(s, {"w": torch.tensor([16.0, 8.0])})
        >>> grads["w"], int(policy.update(s, finite).growth_tracker)
        (tensor([2., 1.]), 1)
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        # The scale is a float32 tensor: outside float32's normal range it would round to inf
        # (an error at init) or to 0 (a scale that can never grow back).
        f32 = torch.finfo(torch.float32)
        _check_number(
            "init_scale",
            self.init_scale,
            f"finite and > 0, in float32's normal range [{f32.tiny}, {f32.max}]",
            lambda v: f32.tiny <= v <= f32.max,
        )
        _check_number("growth_factor", self.growth_factor, "> 1", lambda v: v > 1)
        _check_number("backoff_factor", self.backoff_factor, "in (0, 1)", lambda v: 0 < v < 1)
        interval = self.growth_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(
                f"DynamicLossScale.growth_interval must be a positive int, got {interval!r}"
            )

    def init(self, device: torch.device | str | None = None) -> LossScaleState:
        """The initial state on ``device`` (the params' device).

        Example:
            >>> import functrain as ft
            >>> ft.DynamicLossScale().init()
            LossScaleState(scale=tensor(65536.), growth_tracker=tensor(0, dtype=torch.int32))
        """
        return LossScaleState(
            scale=torch.full((), float(self.init_scale), dtype=torch.float32, device=device),
            growth_tracker=torch.zeros((), dtype=torch.int32, device=device),
        )

    @staticmethod
    def scale(state: LossScaleState, loss: torch.Tensor) -> torch.Tensor:
        """``loss · s`` (in float32 or wider, so a float16 loss cannot overflow here).

        Example:
            >>> import torch, functrain as ft
            >>> ft.DynamicLossScale.scale(ft.DynamicLossScale(4.0).init(), torch.tensor(0.5))
            tensor(2.)
        """
        _check_state(state)
        # A 0-d float32 scale does not promote a float16 loss that has dimensions (per-token
        # losses): ``loss * 2**16`` would overflow in float16.
        wide = torch.promote_types(loss.dtype, state.scale.dtype)
        return loss.to(wide) * state.scale

    @staticmethod
    def unscale(state: LossScaleState, grads: Any) -> tuple[Any, torch.Tensor]:
        """``(grads / s, finite)``: new unscaled gradients and whether all of them are finite.

        Example:
            >>> import torch, functrain as ft
            >>> g, ok = ft.DynamicLossScale.unscale(ft.DynamicLossScale(4.0).init(), [torch.ones(2)])
            >>> g, ok
            ([tensor([0.2500, 0.2500])], tensor(True))
        """
        _check_state(state)
        inv = state.scale.double().reciprocal().float()
        leaves, spec = tree.flatten(grads)
        tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        if tensors:
            scaled = _foreach.mul([leaves[i] for i in tensors], inv)
            for i, x in zip(tensors, scaled):
                leaves[i] = x
        unscaled = tree.unflatten(spec, leaves)
        return unscaled, all_finite(unscaled)

    def update(self, state: LossScaleState, finite: torch.Tensor) -> LossScaleState:
        """The next state given whether this step's gradients were finite (no host sync).

        Example:
            >>> import torch, functrain as ft
            >>> policy = ft.DynamicLossScale(init_scale=2.0, growth_interval=1)
            >>> float(policy.update(policy.init(), torch.tensor(True)).scale)
            4.0
        """
        _check_state(state)
        scale, tracker = state.scale, state.growth_tracker
        if isinstance(finite, bool):
            finite = torch.tensor(finite, device=scale.device)
        if not isinstance(finite, torch.Tensor) or finite.dtype != torch.bool:
            got = finite.dtype if isinstance(finite, torch.Tensor) else type(finite).__name__
            raise TypeError(
                f"DynamicLossScale.update: `finite` must be a bool tensor (as unscale returns), "
                f"got {got}"
            )
        successful = _utils.safe_increment(tracker)  # no wrap to a negative count
        if self.growth_interval <= torch.iinfo(tracker.dtype).max:
            grow = finite & (successful >= self.growth_interval)
        else:  # out of the tracker's range: never (torch would wrap 2**31 to -2**31: always)
            grow = torch.zeros_like(finite)
        # GradScaler multiplies the float32 scale by the factors as doubles and rounds the
        # product to float32; a float32 multiply rounds the factor first (1.1, 0.3 differ).
        wide = scale.double()
        grown = (wide * self.growth_factor).to(scale.dtype)
        new_scale = torch.where(
            finite,
            torch.where(grow & torch.isfinite(grown), grown, scale),
            (wide * self.backoff_factor).to(scale.dtype),
        )
        new_tracker = torch.where(finite & ~grow, successful, torch.zeros_like(tracker))
        return LossScaleState(new_scale, new_tracker)


def _check_state(state: Any) -> None:
    if not isinstance(state, LossScaleState):
        raise TypeError(f"expected a LossScaleState (policy.init()), got {type(state).__name__}")
