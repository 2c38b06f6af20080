"""ACProp: asynchronous centering of the second moment (optax.contrib's ``scale_by_acprop``,
``acprop``)."""

from __future__ import annotations

from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import Hyper, _bias, _check, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.additive import add_decayed_weights
from functrain.optim.base import GradientTransformation, chain
from functrain.optim.belief import ScaleByBeliefState
from functrain.optim.scaling import scale_by_learning_rate

__all__ = ["acprop", "scale_by_acprop"]


def scale_by_acprop(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-16,
    eps_root: Hyper = 1e-16,
) -> GradientTransformation:
    """Rescales updates by ACProp (Zhuang et al., 2021): the gradient divided by the centred
    second moment of the *previous* steps.

    Update rule, with ``k`` the step count before this update (from 0)::

        v̂ = nu / (1 − b2ᵏ)           (at k = 0: v̂ = 1)
        u = g / (√v̂ + eps)
        mu ← b1 · mu + (1 − b1) · g
        nu ← b2 · nu + (1 − b2) · |g − mu_old|² + eps_root

    The denominator uses only past gradients ("asynchronous"), and the numerator is the raw
    gradient: ``mu`` is tracked only to centre the second moment (it uses the momentum from
    *before* this step, unlike :func:`scale_by_belief`). As in optax, ``eps_root`` accumulates
    in ``nu``. The state is a :class:`ScaleByBeliefState`. float16 and bfloat16 leaves are
    computed in float32 and rounded once, as in :func:`scale_by_adam`; complex leaves use
    ``|g − mu|²``. ``torch.optim`` has no ACProp.

    Differences from optax: a float16 leaf keeps its ``nu`` in float32 (optax: float16, where
    it underflows to 0 for gradients below about ``5e-3``, and the next update, ``g / eps``,
    is inf).

    Args:
        b1: decay of the first moment, in ``[0, 1)``.
        b2: decay of the centred second moment, in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added to ``nu`` at every step.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_acprop()
        >>> params = [torch.zeros(2)]
        >>> u, state = tx.update([torch.tensor([0.5, -2.0])], tx.init(params))
        >>> u  # the first step divides by 1
        [tensor([ 0.5000, -2.0000])]
        >>> tx.update([torch.tensor([0.5, -2.0])], state)[0]  # then by |g| (1 + 1e-16 inside)
        [tensor([ 1., -1.])]
    """
    _check(b1, b2, eps, eps_root)

    def init_fn(params: Any) -> ScaleByBeliefState:
        return ScaleByBeliefState(
            count=_utils.zero_count(params),
            mu=tree.zeros_like(params),
            nu=tree.map(_nu_zeros, params),
        )

    def update_fn(
        updates: Any, state: ScaleByBeliefState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByBeliefState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByBeliefState(count, state.mu, state.nu)
        mu_s, nu_s = s["state.mu"], s["state.nu"]
        x, given = _operands(g, mu_s, nu_s), g
        mu = _ops.moment(x, mu_s, b1)
        nu = _ops.moment_sq(list(_foreach.sub(x, _ops.cast_like(mu_s, x))), nu_s, b2)
        if not _ops.is_zero(eps_root):
            nu = _ops.add(nu, eps_root)
        # The previous steps' v̂, and 1 at the first step (whose nu is empty).
        initial = state.count == 0
        t = torch.where(initial, count, state.count)
        v_hat = _ops.div(_ops.cast_like(nu_s, x), _bias(b2, t, _ops.scalar_dtype(x)))
        v_hat = [torch.where(initial, torch.ones_like(v), v) for v in v_hat]
        denom = _ops.sqrt(v_hat)
        denom = _ops.add_fresh(denom, eps)
        out = list(_foreach.div(x, denom))
        new = ScaleByBeliefState(
            count,
            tree.unflatten(spec, _ops.cast_like(mu, mu_s)),
            tree.unflatten(spec, _ops.cast_like(nu, nu_s)),
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new

    return GradientTransformation(init_fn, update_fn)


def _nu_zeros(p: torch.Tensor) -> torch.Tensor:
    """A leaf's initial ``nu``: float32 for a float16 leaf, whose centred second moment of
    gradients below about ``5e-3`` underflows to 0; the next step divides by that stored ``nu``
    (plus ``eps = 1e-16``), so its update was inf. bfloat16 has float32's range."""
    return torch.zeros_like(p, dtype=torch.float32 if p.dtype == torch.float16 else None)


def acprop(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-16,
    eps_root: Hyper = 1e-16,
    weight_decay: ScalarOrSchedule = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """ACProp (Zhuang et al., 2021): :func:`scale_by_acprop`, decoupled weight decay, then
    ``−learning_rate``.

    Update rule: ``u = −lr · (g / (√v̂ + eps) + weight_decay · p)`` with ``v̂`` the centred
    second moment of the previous steps (see :func:`scale_by_acprop`); as in optax, the
    numerator is the raw gradient, not its momentum. ``torch.optim`` has no ACProp.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        b1: decay of the first moment, in ``[0, 1)``.
        b2: decay of the centred second moment, in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added to the second moment at every step.
        weight_decay: decoupled weight decay (multiplied by the learning rate).
        mask: pytree of booleans like the params, or a callable returning one: where weight
            decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.acprop(0.1)
        >>> params = [torch.zeros(2)]
        >>> tx.update([torch.tensor([3.0, -1.0])], tx.init(params), params)[0]
        [tensor([-0.3000,  0.1000])]
    """
    return chain(
        scale_by_acprop(b1, b2, eps, eps_root),
        add_decayed_weights(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
