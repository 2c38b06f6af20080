"""Adan: adaptive Nesterov momentum with gradient differences (optax's ``scale_by_adan``, ``adan``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, additive, scaling
from functrain.optim._adam_ops import Hyper, _bias, _denominator, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain

__all__ = ["ScaleByAdanState", "adan", "scale_by_adan"]


class ScaleByAdanState(NamedTuple):
    """State of :func:`scale_by_adan`, in optax's field order: the moments ``m`` (gradients),
    ``v`` (gradient differences) and ``n`` (squared corrected gradients), the previous gradient
    ``g`` and the int32 step count ``t``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_adan().init([torch.zeros(1)]).t
        tensor(0, dtype=torch.int32)
    """

    m: Any
    v: Any
    n: Any
    g: Any
    t: torch.Tensor


def scale_by_adan(
    b1: Hyper = 0.98,
    b2: Hyper = 0.92,
    b3: Hyper = 0.99,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
) -> GradientTransformation:
    """Rescales updates by Adan (Xie et al., 2022, Algorithm 1).

    Update rule, with ``d = g − g_prev`` (0 at the first step) and ``t`` the count after
    increment::

        m ← b1 · m + (1 − b1) · g
        v ← b2 · v + (1 − b2) · d
        n ← b3 · n + (1 − b3) · |g + (1 − b2) · d|²
        u ← (m̂ + (1 − b2) · v̂) / (√(n̂ + eps_root) + eps)

    with ``m̂ = m / (1 − b1ᵗ)`` and likewise ``v̂``, ``n̂``. The ``b`` coefficients are optax's
    (the paper's ``β``'s are ``1 − b``).

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; the state keeps its initial dtypes. Complex leaves use ``|·|²`` in
    ``n``, as optax. ``torch.optim`` has no Adan.

    Args:
        b1: decay of the gradient average, in ``[0, 1)``.
        b2: decay of the gradient-difference average, in ``[0, 1)``.
        b3: decay of the squared-term average, in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_adan(eps=0.0)
        >>> params = [torch.zeros(2)]
        >>> u, state = tx.update([torch.tensor([0.5, -2.0])], tx.init(params))
        >>> u  # the first step is the sign of the gradient
        [tensor([ 1., -1.])]
    """
    for name, value in (("b1", b1), ("b2", b2), ("b3", b3)):
        _ops.check_decay(name, value)
    for name, value in (("eps", eps), ("eps_root", eps_root)):
        _utils.check_finite_number(name, value, minimum=0.0)
        _ops.check_scalar_tensor(name, value)

    def init_fn(params: Any) -> ScaleByAdanState:
        zeros = [tree.zeros_like(params) for _ in range(4)]
        return ScaleByAdanState(*zeros, t=_utils.zero_count(params))

    def update_fn(
        updates: Any, state: ScaleByAdanState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdanState]:
        del params, extra
        names = ("m", "v", "n", "g")
        g, spec, s = _utils.flat(updates, {f"state.{k}": getattr(state, k) for k in names})
        t = _utils.safe_increment(state.t)
        if not g:
            return updates, state._replace(t=t)
        m0, v0, n0, g0 = (s[f"state.{k}"] for k in names)
        g, given = _operands(g, m0, v0, n0, g0), g
        first = state.t == 0
        # torch.where, not a multiply by a 0/1 mask: an infinite first gradient would give NaN.
        diff = [
            torch.where(first, torch.zeros_like(d), d)
            for d in _foreach.sub(g, _ops.cast_like(g0, g))
        ]
        m = _ops.moment(g, m0, b1)
        v = _ops.moment(diff, v0, b2)
        rate = 1 - _ops.on_device(b2, g[0])
        n = _ops.moment_sq(_ops.add_scaled(g, rate, diff), n0, b3)
        dtype = _ops.scalar_dtype(g)
        out = _ops.add_scaled(
            _ops.div(m, _bias(b1, t, dtype)), rate, _ops.div(v, _bias(b2, t, dtype))
        )
        denom = _denominator(_ops.div(n, _bias(b3, t, dtype)), eps, eps_root)
        w = _foreach.may_write(out, denom)
        out = _foreach.maybe_in_place(w, _foreach.div_, _foreach.div, out, denom)
        kept = [_ops.cast_like(x, like) for x, like in ((m, m0), (v, v0), (n, n0))]
        prev = _ops.cast_like(list(_foreach.clone(given)), g0)  # not an alias of the input
        new_state = ScaleByAdanState(*(tree.unflatten(spec, x) for x in (*kept, prev)), t=t)
        return tree.unflatten(spec, _ops.cast_like(out, given)), new_state

    return GradientTransformation(init_fn, update_fn)


def adan(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.98,
    b2: Hyper = 0.92,
    b3: Hyper = 0.99,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 1e-8,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """Adan (Xie et al., 2022): :func:`scale_by_adan`, decoupled weight decay, ``−lr``.

    Update rule: ``u = −lr · (adan_direction + weight_decay · p)``.

    Differences from the paper (and its reference PyTorch code): as optax, the weight decay is
    the AdamW-style ``−lr·wd·p``, not the proximal ``p ← (p − lr·u) / (1 + lr·wd)``; the two
    agree to first order in ``lr·wd``. ``torch.optim`` has no Adan. Note ``eps_root=1e-8`` here
    but ``0`` in :func:`scale_by_adan`, as in optax.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the gradient average, in ``[0, 1)``.
        b2: decay of the gradient-difference average, in ``[0, 1)``.
        b3: decay of the squared-term average, in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root.
        weight_decay: decoupled weight decay coefficient (multiplied by the learning rate); a
            number, tensor or schedule.
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adan(0.1, eps_root=0.0, eps=0.0)
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0, -1.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1000,  0.1000])
    """
    return chain(
        scale_by_adan(b1, b2, b3, eps, eps_root),
        additive.add_decayed_weights(weight_decay, mask),
        scaling.scale_by_learning_rate(learning_rate),
    )
