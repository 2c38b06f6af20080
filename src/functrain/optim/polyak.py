"""Polyak step sizes from the loss value (optax's ``scale_by_polyak``, ``polyak_sgd``)."""

from __future__ import annotations

import sys
from typing import Any, Literal

import torch

from functrain import _foreach, tree
from functrain._precision import widen_all
from functrain.optim import _ops, _utils, aliases
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import EmptyState, GradientTransformation, chain

__all__ = ["polyak_sgd", "scale_by_polyak"]

# optax compares with ``jnp.finfo(float).eps``, float64's machine epsilon, for every dtype.
_TINY = sys.float_info.epsilon


def _check(f_min: Any, max_learning_rate: Any, eps: Any, variant: str) -> None:
    _utils.check_finite_number("f_min", f_min)
    _utils.check_finite_number("max_learning_rate", max_learning_rate, minimum=0.0)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    for name, value in (("f_min", f_min), ("max_learning_rate", max_learning_rate), ("eps", eps)):
        if callable(value) and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a number or a 0-d tensor, not a schedule")
        _ops.check_scalar_tensor(name, value)
    if variant not in ("sps", "sps+"):
        raise ValueError(f"variant must be 'sps' or 'sps+', got {variant!r}")


def _value(
    value: Any, dtype: torch.dtype, device: torch.device, grads: list[torch.Tensor] | None = None
) -> torch.Tensor:
    """The loss as a 0-d tensor of ``dtype`` on ``device``.

    Kept in the graph when the update is differentiated (``grads`` tracked): the step size
    depends on the loss, and a derivative through the update (meta-learning) takes that path,
    as optax's ``jax.grad`` does. Detached otherwise (:func:`functrain.optim._utils.loss_value`).
    """
    if value is None:
        raise TypeError(
            "scale_by_polyak needs the loss: call tx.update(updates, state, params, value=loss) "
            "(ft.make_train_step passes the step's loss)"
        )
    # A Python number goes straight to ``dtype``: through torch's default float32 a float64
    # loss of 0.1 became 0.10000000149.
    v = (
        _utils.loss_value(value, grads or [])
        if isinstance(value, torch.Tensor)
        else torch.as_tensor(value, dtype=dtype if isinstance(value, float) else None)
    )
    if v.numel() != 1 or v.is_complex():
        raise TypeError(f"value must be a single real number, got shape {tuple(v.shape)}")
    return v.reshape(()).to(device=device, dtype=dtype)


def scale_by_polyak(
    f_min: float | torch.Tensor = 0.0,
    max_learning_rate: float | torch.Tensor = 1.0,
    eps: float | torch.Tensor = 0.0,
    variant: Literal["sps", "sps+"] = "sps",
) -> GradientTransformation:
    """Scales the updates by the Polyak step size (Loizou et al., 2021), read from the loss.

    Update rule, with ``f = value`` the loss and ``‖u‖`` the global L2 norm of the updates::

        gap = f − f_min                (variant "sps+": max(gap, 0), Garrigos et al., 2023)
        step = min(gap / (‖u‖² + eps), max_learning_rate),  or 0 where ‖u‖² + eps ≤ 2.2e-16
        u ← step · u

    ``update(updates, state, params, value=loss)`` takes the loss as the keyword ``value`` (a
    number or a 0-d tensor; :func:`functrain.make_train_step` passes the step's loss); without
    it the update raises a TypeError. The threshold is float64's machine epsilon for every
    dtype, as optax's ``jnp.finfo(float).eps``. ``torch.optim`` has no equivalent.

    Args:
        f_min: a lower bound of the loss (``f*`` of the formula; 0 for interpolating models).
        max_learning_rate: the largest step size.
        eps: added to the squared norm in the denominator.
        variant: ``"sps"`` or ``"sps+"`` (the gap's positive part only).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_polyak()
        >>> g = [torch.tensor([2.0, 0.0])]
        >>> tx.update(g, tx.init(g), value=torch.tensor(1.0))[0]  # 1 / |g|² = 0.25
        [tensor([0.5000, 0.0000])]
    """
    _check(f_min, max_learning_rate, eps, variant)

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any,
        state: EmptyState,
        params: Any = None,
        *,
        value: Any = None,
        **extra: Any,
    ) -> tuple[Any, EmptyState]:
        del params, extra
        g, spec = tree.flatten(updates)
        if not g:
            _value(value, torch.float32, torch.device("cpu"))  # still refuse a missing value
            return updates, state
        norms = _foreach.norm(widen_all(g))  # float32 sums for half-precision leaves
        dtype = _utils.float_dtype(list(norms))
        sq = torch.stack([n.to(dtype) for n in norms]).square().sum()
        gap = _value(value, dtype, sq.device, g) - _ops.on_device(f_min, sq)
        if variant == "sps+":
            gap = torch.clamp_min(gap, 0.0)
        denom = sq + _ops.on_device(eps, sq)
        step = torch.clamp_max(gap / denom, _ops.on_device(max_learning_rate, sq))
        step = torch.where(denom <= _TINY, torch.zeros_like(step), step)
        return tree.unflatten(spec, _scale(g, step)), state

    return GradientTransformation(init_fn, update_fn)


def _scale(g: list[torch.Tensor], step: torch.Tensor) -> list[torch.Tensor]:
    """``[step · x]`` with each leaf keeping its dtype (a float64 step must not promote a 0-d leaf)."""
    return _ops.cast_like(_ops.mul(g, step), g)


def polyak_sgd(
    max_learning_rate: float | torch.Tensor = 1.0,
    scaling: ScalarOrSchedule = 1.0,
    f_min: float | torch.Tensor = 0.0,
    eps: float | torch.Tensor = 0.0,
    variant: Literal["sps", "sps+"] = "sps",
) -> GradientTransformation:
    """SGD with the Polyak step size (Loizou et al., 2021): ``sgd(scaling)`` then
    :func:`scale_by_polyak`.

    Update rule: ``u = −scaling · γ · g`` with
    ``γ = min((f − f_min) / (scaling² · ‖g‖² + eps), max_learning_rate)``; the squared norm is
    of the already scaled gradient, as in optax's chain. Pass the loss at every update:
    ``tx.update(grads, state, params, value=loss)`` (:func:`functrain.make_train_step` does).
    ``torch.optim`` has no equivalent.

    Args:
        max_learning_rate: the largest Polyak step size.
        scaling: a global factor: a number, a 0-d tensor or a schedule of the step count.
        f_min: a lower bound of the loss (0 for models that interpolate the data).
        eps: added to the squared norm in the denominator.
        variant: ``"sps"`` or ``"sps+"`` (only the positive part of ``f − f_min``).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.polyak_sgd()
        >>> params = [torch.tensor([1.0, 2.0, 3.0])]
        >>> loss = (params[0] ** 2).sum()  # 14, gradient 2·params
        >>> u, _ = tx.update([2 * params[0]], tx.init(params), params, value=loss)
        >>> ft.apply_updates(params, u)  # step 14 / 56 = 0.25
        [tensor([0.5000, 1.0000, 1.5000])]
    """
    return chain(
        aliases.sgd(learning_rate=scaling),
        scale_by_polyak(f_min=f_min, max_learning_rate=max_learning_rate, eps=eps, variant=variant),
    )
