"""Mechanic (Cutkosky, Defazio & Mehta, 2023): learns the scale of any optimizer's updates.

optax.contrib's ``mechanize``. Its per-step statistics (a global dot product and two norms)
and its ``num_betas`` scalars are device tensors: no update reads them on the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import widen_all
from functrain.optim import _ops, _utils, scaling
from functrain.optim._global_stats import (
    _copy,
    _dot,
    _on,
    _params_leaves,
    _refuse_complex,
    _root,
    _sq_norm,
    _state_dtype,
)
from functrain.optim.base import GradientTransformation

__all__ = ["MechanicState", "mechanize"]


class MechanicState(NamedTuple):
    """State of :func:`mechanize`: the base optimizer's state, the int32 step ``count``, the
    ``num_betas``-vectors ``r``, ``m``, ``v``, ``s`` and the reference point ``x0``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.mechanize(ft.sgd(1.0), num_betas=2).init([torch.zeros(1)]).s
        tensor([1.0000e-06, 1.0000e-06])
    """

    base_optimizer_state: Any
    count: torch.Tensor
    r: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    s: torch.Tensor
    x0: Any


def mechanize(
    base_optimizer: GradientTransformation,
    weight_decay: Any = 1e-2,
    eps: Any = 1e-8,
    s_init: Any = 1e-6,
    num_betas: int = 6,
) -> GradientTransformation:
    """Wraps ``base_optimizer`` so that Mechanic learns the scale of its updates.

    With ``Δₜ`` the base optimizer's updates summed so far (rebuilt from ``x0``, the parameters
    at the first update, as ``(x0 − x) / (Σs + eps)``), ``g`` the gradient and the betas
    ``βᵢ = 1 − 0.1ⁱ`` (``i = 1 … num_betas``)::

        g̃ = g + weight_decay · Σs · ‖g‖ / (‖x‖ + eps) · x
        h = ⟨g̃, Δₜ⟩                 (global, one number)
        m ← max(β · m, |h| + eps)     v ← β² · v + h²
        r ← β · r + clip(h, −m_old, m_old) · s
        s ← (s_init / num_betas · m + max(r, 0)) / (√v + eps)
        x_new = x0 − Σs · (Δₜ + base update)

    and the update is ``x_new − x``. Give the base optimizer a learning rate (or schedule)
    whose peak is 1; Mechanic learns the multiplier. ``update`` needs ``params``; keyword
    arguments reach the base optimizer. ``torch.optim`` has no Mechanic.

    Differences from optax: ``r``, ``m``, ``v``, ``s`` use the parameters' lowest float dtype
    widened to at least float32 (optax: the lowest dtype); half-precision leaves are computed
    in float32 and rounded once; complex leaves are refused.

    Args:
        base_optimizer: the transformation whose updates are scaled (it gets the raw
            gradients, without Mechanic's weight decay).
        weight_decay: Mechanic's own weight decay on the gradients it reads, ``≥ 0``.
        eps: for numerical stability, ``≥ 0``.
        s_init: the initial scale of each beta, ``> 0``.
        num_betas: how many betas (``0.9, 0.99, …``), ``≥ 1``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.mechanize(ft.sgd(1.0))
        >>> params = [torch.tensor([1.0, -1.0], dtype=torch.float64)]
        >>> grads = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
        >>> u, state = tx.update(grads, tx.init(params), params)
        >>> u[0]  # the first step: s_init per unit of the base update
        tensor([-1.0000e-06, -1.0000e-06], dtype=torch.float64)
    """
    for name, value in (("weight_decay", weight_decay), ("eps", eps)):
        _ops.refuse_schedule(name, value)
        _utils.check_finite_number(name, value, minimum=0.0)
        _ops.check_scalar_tensor(name, value)
    _ops.refuse_schedule("s_init", s_init)
    _utils.check_finite_number("s_init", s_init)
    _ops.check_scalar_tensor("s_init", s_init)
    if _utils.is_real_number(s_init) and not s_init > 0:
        raise ValueError(f"s_init must be > 0, got {s_init!r}")
    if isinstance(num_betas, bool) or not isinstance(num_betas, int) or num_betas < 1:
        raise ValueError(f"num_betas must be an int >= 1, got {num_betas!r}")

    def init_fn(params: Any) -> MechanicState:
        sd = _state_dtype(_params_leaves(params, "mechanize"))
        device = _utils.default_device(params)
        zeros = torch.zeros(num_betas, dtype=sd, device=device)
        return MechanicState(
            base_optimizer_state=base_optimizer.init(params),
            count=_utils.zero_count(params),
            r=zeros,
            m=zeros.clone(),
            v=zeros.clone(),
            s=torch.ones(num_betas, dtype=sd, device=device) * _on(s_init, zeros),
            x0=_copy(params),
        )

    def update_fn(
        updates: Any, state: MechanicState, params: Any = None, **extra: Any
    ) -> tuple[Any, MechanicState]:
        if params is None:
            raise ValueError(scaling._NO_PARAMS.format(name="mechanize"))
        _refuse_complex(updates, "updates", "mechanize")
        count = _utils.safe_increment(state.count)
        base_updates, base_state = base_optimizer.update(
            updates, state.base_optimizer_state, params, **extra
        )
        given, spec, s = _utils.flat(
            updates,
            {"params": params, "state.x0": state.x0, "base updates": base_updates},
            ("params", "state.x0"),  # functions of the params only
        )
        if not given:
            return base_updates, state._replace(base_optimizer_state=base_state, count=count)
        g, x = widen_all(given), widen_all(s["params"])
        sd = state.s.dtype
        # Training loops often load pretrained weights after init: start from the parameters
        # of the first update (a device-side select, not a host branch).
        first = state.count == 0
        x0 = [torch.where(first, p, old) for p, old in zip(s["params"], s["state.x0"])]
        s_sum = state.s.sum()
        grad_norm = torch.sqrt(_sq_norm(g, sd))
        param_norm = torch.sqrt(_sq_norm(x, sd))
        decay = _on(weight_decay, s_sum) * s_sum * grad_norm / (param_norm + _on(eps, s_sum))
        g = _ops.add_scaled(g, decay, x)
        delta_prev = _ops.div(list(_foreach.sub(widen_all(x0), x)), s_sum + _on(eps, s_sum))
        delta = list(_foreach.sub(delta_prev, widen_all(s["base updates"])))
        h = _dot(g, delta_prev, sd).to(sd)
        betas = torch.tensor(
            [1.0 - 0.1**i for i in range(1, num_betas + 1)], dtype=sd, device=state.s.device
        )
        clipped_h = torch.minimum(torch.maximum(h, -state.m), state.m)  # lax.clamp's order
        m = torch.maximum(betas * state.m, h.abs() + _on(eps, h))
        v = betas**2 * state.v + h**2
        r = betas * state.r + clipped_h * state.s
        wealth = (_on(s_init, m) / num_betas) * m + torch.clamp(r, min=0.0)
        # _root: v is 0 at the first step (h = 0), where √'s slope would make derivatives NaN.
        new_s = wealth / (_root(v) + _on(eps, v))
        x0w = widen_all(x0)
        new_x = _ops.add_scaled(x0w, -new_s.sum(), delta)
        out = _ops.cast_like(list(_foreach.sub(new_x, x)), given)
        new = MechanicState(base_state, count, r, m, v, new_s, tree.unflatten(spec, x0))
        return tree.unflatten(spec, out), new

    return GradientTransformation(init_fn, update_fn)
