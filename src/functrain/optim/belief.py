"""AdaBelief: Adam with the second moment of the gradient's deviation from its momentum (optax's ``scale_by_belief``, ``adabelief``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, scaling
from functrain.optim._adam_ops import Hyper, _bias, _check, _mu_hat, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain

__all__ = ["ScaleByBeliefState", "adabelief", "scale_by_belief"]


class ScaleByBeliefState(NamedTuple):
    """State of :func:`scale_by_belief`: the int32 step ``count``, the momentum ``mu`` and the
    belief ``nu`` (the moving average of ``(g − mu)²``, plus ``eps_root`` at every step).

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_belief().init([torch.zeros(1)]).nu
        [tensor([0.])]
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_belief(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-16,
    eps_root: Hyper = 1e-16,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rescales updates by AdaBelief (Zhuang et al., 2020).

    Update rule, with ``t`` the step count after increment::

        mu ← b1 · mu + (1 − b1) · g
        nu ← b2 · nu + (1 − b2) · |g − mu|² + eps_root
        û = mu / (1 − b1ᵗ),  v̂ = nu / (1 − b2ᵗ)
        u ← û / (√v̂ + eps)

    With ``nesterov=True``, ``û = b1·mu/(1 − b1ᵗ⁺¹) + (1 − b1)·g/(1 − b1ᵗ)``. As in optax,
    ``eps_root`` is added to the stored ``nu`` at every step (so it accumulates), and ``g − mu``
    uses the *new* momentum.

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; the moments keep the dtypes they were initialised with. Complex
    leaves use ``|g − mu|²`` in ``nu``, as optax. ``torch.optim`` has no AdaBelief.

    Args:
        b1: decay of the first moment, in ``[0, 1)``.
        b2: decay of the belief (second central) moment, in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added to ``nu`` at every step (inside the square root).
        nesterov: use Nesterov momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_belief()
        >>> params = [torch.zeros(2)]
        >>> u, state = tx.update([torch.tensor([0.5, -2.0])], tx.init(params))
        >>> u  # the first step is the sign of the gradient: |g − mu| = 0.9·|g|
        [tensor([ 1.1111, -1.1111])]
    """
    _check(b1, b2, eps, eps_root)

    def init_fn(params: Any) -> ScaleByBeliefState:
        return ScaleByBeliefState(
            count=_utils.zero_count(params), mu=tree.zeros_like(params), nu=tree.zeros_like(params)
        )

    def update_fn(
        updates: Any, state: ScaleByBeliefState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByBeliefState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByBeliefState(count, state.mu, state.nu)
        g, given = _operands(g, s["state.mu"], s["state.nu"]), g
        mu = _ops.moment(g, s["state.mu"], b1)
        nu = _ops.moment_sq(list(_foreach.sub(g, mu)), s["state.nu"], b2)
        if not _ops.is_zero(eps_root):
            nu = _ops.add(nu, eps_root)
        dtype = _ops.scalar_dtype(g)
        denom = _ops.div(nu, _bias(b2, count, dtype))
        w = _foreach.may_write(denom, eps)
        denom = _foreach.maybe_in_place(w, _foreach.sqrt_, _foreach.sqrt, denom)
        denom = _foreach.maybe_in_place(w, _ops.add_, _ops.add, denom, eps)
        out = _mu_hat(g, mu, b1, count, nesterov)
        out = list(_foreach.div(out, denom))
        new_state = ScaleByBeliefState(
            count,
            tree.unflatten(spec, _ops.cast_like(mu, s["state.mu"])),
            tree.unflatten(spec, _ops.cast_like(nu, s["state.nu"])),
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new_state

    return GradientTransformation(init_fn, update_fn)


def adabelief(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-16,
    eps_root: Hyper = 1e-16,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """AdaBelief (Zhuang et al., 2020): :func:`scale_by_belief` followed by ``−learning_rate``.

    Update rule: ``u = −lr · m̂ / (√ŝ + eps)`` where ``s`` averages ``(g − m)² + eps_root``
    instead of Adam's ``g²``. ``torch.optim`` has no AdaBelief; the authors' PyTorch package
    ``adabelief_pytorch`` also adds ``eps`` inside ``s`` but defaults differ (``eps=1e-16``
    there too, with weight decoupling on by default).

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        b1: decay of the first moment, in ``[0, 1)``.
        b2: decay of the belief moment, in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added to the belief moment at every step.
        nesterov: use Nesterov momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adabelief(0.1)
        >>> params = {"w": torch.zeros(2)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0, -1.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.1111,  0.1111])
    """
    return chain(
        scale_by_belief(b1, b2, eps, eps_root, nesterov=nesterov),
        scaling.scale_by_learning_rate(learning_rate),
    )
