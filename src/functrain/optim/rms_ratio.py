"""Adadelta: step sizes from running averages of squared gradients and squared updates (optax's ``scale_by_adadelta``, ``adadelta``)."""

from __future__ import annotations

from typing import Any, NamedTuple

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, additive, scaling
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain

__all__ = ["ScaleByAdaDeltaState", "adadelta", "scale_by_adadelta"]


class ScaleByAdaDeltaState(NamedTuple):
    """State of :func:`scale_by_adadelta`: the running averages ``e_g`` of the squared gradients
    and ``e_x`` of the squared updates (optax's field names; there is no step count).

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_adadelta().init([torch.zeros(1)]).e_x
        [tensor([0.])]
    """

    e_g: Any
    e_x: Any


def scale_by_adadelta(rho: Hyper = 0.9, eps: Hyper = 1e-6) -> GradientTransformation:
    """Rescales updates by Adadelta (Zeiler, 2012).

    Update rule::

        e_g ← rho · e_g + (1 − rho) · g²
        u   ← √(e_x + eps) / √(e_g + eps) · g        (e_x from the previous step)
        e_x ← rho · e_x + (1 − rho) · u²

    The same numbers as ``torch.optim.Adadelta`` before its learning rate (which optax and
    functrain apply in :func:`adadelta`). float16 and bfloat16 leaves are computed in float32 and
    rounded once; the state keeps its initial dtypes.

    Complex leaves are refused with an error naming the leaf: optax squares them as ``g²`` (not
    ``|g|²``), which gives complex "variances" without meaning, and ``torch.optim.Adadelta``
    treats the real and imaginary parts as separate parameters instead.

    Args:
        rho: decay of both running averages, in ``[0, 1]``.
        eps: added inside both square roots, ``>= 0``; it also sets the size of the first steps
            (``√eps / √((1 − rho)·g² + eps) · g``).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_adadelta(rho=0.0, eps=1.0)
        >>> params = [torch.zeros(1)]
        >>> tx.update([torch.tensor([3.0])], tx.init(params))[0]  # √1 / √(9 + 1) · 3
        [tensor([0.9487])]
    """
    _ops.check_decay("rho", rho, allow_one=True)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _ops.check_scalar_tensor("eps", eps)

    def init_fn(params: Any) -> ScaleByAdaDeltaState:
        _refuse_complex(params, "params")
        return ScaleByAdaDeltaState(e_g=tree.zeros_like(params), e_x=tree.zeros_like(params))

    def update_fn(
        updates: Any, state: ScaleByAdaDeltaState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdaDeltaState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.e_g": state.e_g, "state.e_x": state.e_x})
        if not g:
            return updates, state
        if any(x.is_complex() for x in g):
            _refuse_complex(updates, "updates")
        g, given = _operands(g, s["state.e_g"], s["state.e_x"]), g
        e_g = _ops.moment_sq(g, s["state.e_g"], rho)
        e_x = _ops.cast_like(s["state.e_x"], g)
        u = _ops.add(e_x, eps)
        den = _ops.add(e_g, eps)
        # In place unless differentiated (autograd refuses writes into ``sqrt``'s result).
        w = _foreach.may_write(u, den, g)
        u = _foreach.maybe_in_place(w, _foreach.sqrt_, _foreach.sqrt, u)
        den = _foreach.maybe_in_place(w, _foreach.sqrt_, _foreach.sqrt, den)
        u = _foreach.maybe_in_place(w, _foreach.div_, _foreach.div, u, den)
        u = _foreach.maybe_in_place(w, _foreach.mul_, _foreach.mul, u, g)
        e_x = _ops.moment_sq(u, e_x, rho)
        new_state = ScaleByAdaDeltaState(
            tree.unflatten(spec, _ops.cast_like(e_g, s["state.e_g"])),
            tree.unflatten(spec, _ops.cast_like(e_x, s["state.e_x"])),
        )
        return tree.unflatten(spec, _ops.cast_like(u, given)), new_state

    return GradientTransformation(init_fn, update_fn)


def _refuse_complex(values: Any, name: str) -> None:
    """Raises naming the first complex leaf of ``values`` (Adadelta has no complex form)."""
    found = _utils.complex_leaf(values, name)
    if found is not None:
        raise TypeError(
            f"scale_by_adadelta does not support complex leaves: {found[0]} is {found[1]}; "
            "optimise its real and imaginary parts as separate real tensors (torch.view_as_real)"
        )


def adadelta(
    learning_rate: ScalarOrSchedule | None = None,
    rho: Hyper = 0.9,
    eps: Hyper = 1e-6,
    weight_decay: ScalarOrSchedule = 0.0,
    weight_decay_mask: Any = None,
) -> GradientTransformation:
    """Adadelta (Zeiler, 2012): ``add_decayed_weights``, :func:`scale_by_adadelta`, ``−lr``.

    Update rule: ``g ← g + weight_decay · p`` (coupled, before the scaling), then
    :func:`scale_by_adadelta`, then ``u = −lr · u``.

    With ``learning_rate=1.0`` this is ``torch.optim.Adadelta(lr=1.0, rho, eps, weight_decay)``
    step for step (the same coupled weight decay, ``eps`` inside both square roots).

    Differences from ``torch.optim.Adadelta``: the default ``learning_rate=None`` is optax's,
    and, as in optax, it means *no scaling at all*: the updates then keep the gradient's sign,
    so ``apply_updates`` climbs the loss. Pass ``learning_rate=1.0`` for PyTorch's default.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update), a schedule
            of the step count, or ``None`` (no scaling and no minus sign, as optax).
        rho: decay of both running averages, in ``[0, 1]``.
        eps: added inside both square roots.
        weight_decay: coupled weight decay coefficient (added to the gradient); a number,
            tensor or schedule.
        weight_decay_mask: pytree of booleans like the params, or a callable returning one:
            where weight decay applies.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adadelta(1.0, rho=0.0, eps=1.0)
        >>> params = {"w": torch.zeros(1)}
        >>> u, _ = tx.update({"w": torch.tensor([3.0])}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.9487])
    """
    return chain(
        additive.add_decayed_weights(weight_decay, weight_decay_mask),
        scale_by_adadelta(rho, eps),
        scaling.scale_by_learning_rate(learning_rate),
    )
