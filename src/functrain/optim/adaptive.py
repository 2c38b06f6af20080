"""Adaptive scaling transforms: Adam and its family (moment estimates of the gradient)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import GradientTransformation

__all__ = [
    "ScaleByAdamState",
    "scale_by_adam",
]


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`: step ``count``, first moment ``mu``, second ``nu``."""

    count: torch.Tensor
    mu: Any
    nu: Any


def _bias_corrections(
    count: torch.Tensor, leaves: list[torch.Tensor], *decays: Any
) -> list[torch.Tensor]:
    dtype = _utils.float_dtype(leaves)
    return [1 - _utils.power(d, count, dtype) for d in decays]


def scale_by_adam(
    b1: float | torch.Tensor = 0.9,
    b2: float | torch.Tensor = 0.999,
    eps: float | torch.Tensor = 1e-8,
    eps_root: float | torch.Tensor = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rescales updates by Adam's bias-corrected moment estimates (Kingma & Ba, 2014).

    Update rule, with ``t`` the step count after increment::

        mu ← b1 · mu + (1 − b1) · g
        nu ← b2 · nu + (1 − b2) · g²
        û = mu / (1 − b1ᵗ),  v̂ = nu / (1 − b2ᵗ)
        u ← û / (√(v̂ + eps_root) + eps)

    With ``nesterov=True`` (NAdam), ``û = b1·mu/(1 − b1ᵗ⁺¹) + (1 − b1)·g/(1 − b1ᵗ)``.

    Args:
        b1: decay of the first moment.
        b2: decay of the second moment.
        eps: added to the denominator outside the square root (as ``torch.optim.Adam``).
        eps_root: added inside the square root (useful when differentiating through Adam).
        mu_dtype: optional dtype of the first moment (e.g. ``torch.bfloat16``).
        nesterov: use Nesterov momentum (NAdam).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_adam()
        >>> params = {"w": torch.zeros(2)}
        >>> u, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> u["w"]  # the first Adam step is the sign of the gradient (up to eps)
        tensor([ 1.0000, -1.0000])
    """
    for name, value in (("b1", b1), ("b2", b2), ("eps", eps), ("eps_root", eps_root)):
        _utils.check_finite_number(name, value, minimum=0.0)

    def init_fn(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=_utils.zero_count(params),
            mu=tree.zeros_like(params, dtype=mu_dtype),
            nu=tree.zeros_like(params),
        )

    def update_fn(
        updates: Any, state: ScaleByAdamState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdamState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        one_minus_b1 = 1 - b1
        mu = torch._foreach_lerp([m.to(x.dtype) for m, x in zip(s["state.mu"], g)], g, one_minus_b1)
        nu = torch._foreach_mul(s["state.nu"], b2)
        torch._foreach_addcmul_(nu, g, g, 1 - b2)
        bc1, bc2 = _bias_corrections(count, g, b1, b2)
        if nesterov:
            (bc1_next,) = _bias_corrections(_utils.safe_increment(count), g, b1)
            mu_hat = torch._foreach_add(
                torch._foreach_div(torch._foreach_mul(mu, b1), bc1_next),
                torch._foreach_div(torch._foreach_mul(g, one_minus_b1), bc1),
            )
        else:
            mu_hat = torch._foreach_div(mu, bc1)
        nu_hat = torch._foreach_div(nu, bc2)
        if not (isinstance(eps_root, (int, float)) and eps_root == 0):
            torch._foreach_add_(nu_hat, eps_root)
        denom = torch._foreach_sqrt(nu_hat)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(mu_hat, denom)
        if mu_dtype is not None:
            mu = [m.to(mu_dtype) for m in mu]
        new_state = ScaleByAdamState(count, tree.unflatten(spec, mu), tree.unflatten(spec, nu))
        return tree.unflatten(spec, out), new_state

    return GradientTransformation(init_fn, update_fn)
