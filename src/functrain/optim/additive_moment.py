"""Yogi: Adam with an additive, sign-controlled second-moment update (optax's ``scale_by_yogi``, ``yogi``)."""

from __future__ import annotations

from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, scaling
from functrain.optim._adam_ops import Hyper, _bias, _check, _denominator, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.adaptive import ScaleByAdamState
from functrain.optim.base import GradientTransformation, chain

__all__ = ["scale_by_yogi", "yogi"]


def scale_by_yogi(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-3,
    eps_root: Hyper = 0.0,
    initial_accumulator_value: Hyper = 1e-6,
) -> GradientTransformation:
    """Rescales updates by Yogi (Zaheer et al., 2018).

    Update rule, with ``t`` the step count after increment::

        mu ← b1 · mu + (1 − b1) · g
        nu ← nu − (1 − b2) · sign(nu − |g|²) · |g|²
        û = mu / (1 − b1ᵗ),  v̂ = nu / (1 − b2ᵗ)
        u ← û / (√(v̂ + eps_root) + eps)

    Unlike Adam's ``nu``, which moves multiplicatively towards ``g²``, Yogi's moves additively by
    ``(1 − b2)·g²``, so it grows or shrinks more slowly. Both moments start at
    ``initial_accumulator_value`` (as optax; the bias correction then is approximate). The state
    is a :class:`ScaleByAdamState`, as in optax.

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`. Complex leaves use ``|g|²``; their ``nu`` has a zero imaginary part.
    ``torch.optim`` has no Yogi.

    Args:
        b1: decay of the first moment, in ``[0, 1)``.
        b2: rate of the second moment's additive update, in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root.
        initial_accumulator_value: the starting value of both moments, ``>= 0`` (a negative
            ``nu`` has no square root).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_yogi(initial_accumulator_value=0.0, eps=0.0)
        >>> params = [torch.zeros(2)]
        >>> u, state = tx.update([torch.tensor([0.5, -2.0])], tx.init(params))
        >>> u  # from zero moments the first step is the sign of the gradient, as Adam's
        [tensor([ 1., -1.])]
    """
    _check(b1, b2, eps, eps_root)
    _utils.check_finite_number("initial_accumulator_value", initial_accumulator_value, minimum=0.0)
    _ops.check_scalar_tensor("initial_accumulator_value", initial_accumulator_value)

    def init_fn(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=_utils.zero_count(params),
            mu=_full_like(params, initial_accumulator_value),
            nu=_full_like(params, initial_accumulator_value),
        )

    def update_fn(
        updates: Any, state: ScaleByAdamState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdamState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        g, given = _operands(g, s["state.mu"], s["state.nu"]), g
        mu = _ops.moment(g, s["state.mu"], b1)
        nu = _yogi_nu(g, _ops.cast_like(s["state.nu"], g), b2)
        dtype = _ops.scalar_dtype(g)
        out = _ops.div(mu, _bias(b1, count, dtype))
        denom = _denominator(_ops.div(nu, _bias(b2, count, dtype)), eps, eps_root)
        w = _foreach.may_write(out, denom)
        out = _foreach.maybe_in_place(w, _foreach.div_, _foreach.div, out, denom)
        new_state = ScaleByAdamState(
            count,
            tree.unflatten(spec, _ops.cast_like(mu, s["state.mu"])),
            tree.unflatten(spec, _ops.cast_like(nu, s["state.nu"])),
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new_state

    return GradientTransformation(init_fn, update_fn)


def _full_like(params: Any, value: Hyper) -> Any:
    """``params``' structure filled with ``value`` (a number or a 0-d tensor, read on device)."""
    if not isinstance(value, torch.Tensor):
        return tree.full_like(params, value)
    return tree.map(
        lambda p: value.to(dtype=p.dtype, device=p.device).expand(p.shape).clone(), params
    )


def _yogi_nu(g: list[torch.Tensor], v: list[torch.Tensor], b2: Hyper) -> list[torch.Tensor]:
    """``v − (1 − b2)·sign(v − |g|²)·|g|²`` (complex ``v``: its real part, kept complex)."""
    rate = -(1 - _ops.on_device(b2, g[0]))
    if any(x.is_complex() for x in g):
        return [
            (vr + rate * torch.sign(vr - sq) * sq).to(x.dtype)
            for x, vr, sq in ((x, y.real, _ops.abs_sq(x)) for x, y in zip(g, v))
        ]
    sq = list(_foreach.mul(g, g))
    step = list(_foreach.sign(_foreach.sub(v, sq)))
    step = _foreach.maybe_in_place(
        _foreach.may_write(step, sq), _foreach.mul_, _foreach.mul, step, sq
    )
    return _ops.add_scaled(v, rate, step)


def yogi(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-3,
) -> GradientTransformation:
    """Yogi (Zaheer et al., 2018): :func:`scale_by_yogi` followed by ``−learning_rate``.

    Update rule: ``u = −lr · m̂ / (√v̂ + eps)`` with Yogi's additive second moment; the moments
    start at ``1e-6`` and ``eps_root`` is 0, as optax's alias. ``torch.optim`` has no Yogi; note
    the large default ``eps = 1e-3`` (the paper's).

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment, in ``[0, 1)``.
        b2: rate of the second moment's additive update, in ``[0, 1)``.
        eps: added to the denominator outside the square root.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.yogi(0.1, eps=0.0)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([2.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1000])
    """
    return chain(
        scale_by_yogi(b1, b2, eps),
        scaling.scale_by_learning_rate(learning_rate),
    )
