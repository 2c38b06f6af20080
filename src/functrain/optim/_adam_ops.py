"""Shared arithmetic of the Adam family (:mod:`functrain.optim.adaptive`, :mod:`functrain.optim.lion`).

Hyperparameter checks, bias corrections, the widened operand dtypes and Adam's update direction;
also used by the ``"foreach"`` engine of :mod:`functrain.optim.fused`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from functrain import _foreach
from functrain._precision import widen_all
from functrain.optim import _ops, _utils

Hyper = float | torch.Tensor


def _check(b1: Any, b2: Any, eps: Any = 0.0, eps_root: Any = 0.0, mu_dtype: Any = None) -> None:
    _ops.check_decay("b1", b1)
    _ops.check_decay("b2", b2)
    for name, value in (("eps", eps), ("eps_root", eps_root)):
        _utils.check_finite_number(name, value, minimum=0.0)
        _ops.check_scalar_tensor(name, value)
    _ops.check_dtype("mu_dtype", mu_dtype)


def _bias(decay: Hyper, count: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``1 - decay ** count`` as a 0-d tensor (the bias-correction denominator)."""
    return 1 - _utils.power(decay, count, dtype)


def _mu_hat(
    g: list[torch.Tensor], mu: list[torch.Tensor], b1: Hyper, count: torch.Tensor, nesterov: bool
) -> list[torch.Tensor]:
    """Bias-corrected first moment; with ``nesterov`` Dozat's (NAdam) look-ahead."""
    dtype = _ops.scalar_dtype(g)
    if not nesterov:
        return _ops.div(mu, _bias(b1, count, dtype))
    ahead = _ops.div(_ops.mul(mu, b1), _bias(b1, _utils.safe_increment(count), dtype))
    now = _ops.div(_ops.mul(g, 1 - _ops.on_device(b1, g[0])), _bias(b1, count, dtype))
    return list(_foreach.add(ahead, now))


def _denominator(nu_hat: list[torch.Tensor], eps: Hyper, eps_root: Hyper) -> list[torch.Tensor]:
    """``sqrt(nu_hat + eps_root) + eps``."""
    if not _ops.is_zero(eps_root):
        nu_hat = _ops.add(nu_hat, eps_root)
    return _ops.add_fresh(_ops.sqrt(nu_hat), eps)


def _operands(g: list[torch.Tensor], *states: list[torch.Tensor]) -> list[torch.Tensor]:
    """The update leaves in the dtype their moments are computed in: float32 for float16 and
    bfloat16 (the fused kernels' arithmetic: in float16 ``eps = 1e-8`` is 0 and a small
    gradient's update was ``m / 0``), and at least the precision of each state leaf, so that a
    float32 moment of bfloat16 gradients is not rounded to bfloat16 on the way."""
    out = widen_all(g)
    dtypes = {y.dtype for y in out}
    if len(dtypes) == 1 and all({x.dtype for x in st} <= dtypes for st in states):
        return out  # the common case: one dtype throughout
    wanted = [
        functools.reduce(torch.promote_types, (x[i].dtype for x in states), y.dtype)
        for i, y in enumerate(out)
    ]
    if all(y.dtype == d for y, d in zip(out, wanted)):
        return out
    return [y.to(d) for y, d in zip(out, wanted)]


def _direction(
    g: list[torch.Tensor],
    mu: list[torch.Tensor],
    nu: list[torch.Tensor],
    count: torch.Tensor,
    b1: Hyper,
    b2: Hyper,
    eps: Hyper,
    eps_root: Hyper,
    nesterov: bool,
) -> list[torch.Tensor]:
    """``û / (√(v̂ + eps_root) + eps)`` from the new moments, on fresh temporaries.

    Formed as ``√(nu + eps_root·(1 − b2ᵗ)) / √(1 − b2ᵗ)``, the same number (``v̂ = nu/(1 − b2ᵗ)``),
    and with ``eps_root = 0`` the order of ``torch.optim.Adam`` and the fused kernels: early on
    ``nu / (1 − b2ᵗ)`` overflows where ``nu`` does not (float32 gradients near 1e19).
    """
    dtype = _ops.scalar_dtype(g)
    correction = _bias(b2, count, dtype)
    # Written in place unless differentiated (autograd refuses writes into ``sqrt``'s result).
    w = _foreach.may_write(g, mu, nu, b1, correction, eps, eps_root)
    if _ops.is_zero(eps_root):
        denom = _ops.sqrt(nu)
    else:
        shift = _ops.on_device(correction * _ops.on_device(eps_root, correction), nu[0])
        denom = _foreach.maybe_in_place(w, _foreach.sqrt_, _foreach.sqrt, _ops.add(nu, shift))
    scale = _ops.on_device(correction.sqrt(), denom[0])
    denom = _foreach.maybe_in_place(w, _foreach.div_, _foreach.div, denom, scale)
    denom = _foreach.maybe_in_place(w, _ops.add_, _ops.add, denom, eps)
    out = _mu_hat(g, mu, b1, count, nesterov)
    if any(o is m for o, m in zip(out, mu)):
        return list(_foreach.div(out, denom))
    return _foreach.maybe_in_place(w, _foreach.div_, _foreach.div, out, denom)
