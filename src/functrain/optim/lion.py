"""Lion (sign of an interpolated momentum) and its state; re-exported by :mod:`functrain.optim.adaptive`."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim.base import GradientTransformation

__all__ = ["ScaleByLionState", "scale_by_lion"]


class ScaleByLionState(NamedTuple):
    """State of :func:`scale_by_lion`: the int32 step ``count`` and the momentum ``mu``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_lion().init([torch.zeros(1)]).mu
        [tensor([0.])]
    """

    count: torch.Tensor
    mu: Any


def scale_by_lion(
    b1: Hyper = 0.9,
    b2: Hyper = 0.99,
    mu_dtype: torch.dtype | None = None,
    *,
    mode: Literal["hard", "smooth", "refined"] = "hard",
    smooth_beta: float = 1.0,
) -> GradientTransformation:
    """Rescales updates by Lion (Chen et al., 2023): the sign of an interpolated momentum.

    Update rule::

        c = (1 − b1) · g + b1 · mu
        u ← sign(c)   (mode "smooth": tanh(smooth_beta · c); "refined": c if |c| < 1 else sign(c))
        mu ← b2 · mu + (1 − b2) · g

    ``torch.optim`` has no Lion.

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; the moments keep the dtypes they were initialised with.

    Args:
        b1: interpolation weight of the momentum in the sign, in ``[0, 1]``.
        b2: decay of the momentum, in ``[0, 1]``.
        mu_dtype: optional dtype in which the first moment is stored.
        mode: ``"hard"`` (sign), ``"smooth"`` (tanh) or ``"refined"`` (linear below 1, sign
            above).
        smooth_beta: slope of the tanh in ``"smooth"`` mode.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_lion()
        >>> params = [torch.zeros(3)]
        >>> tx.update([torch.tensor([2.0, 0.0, -0.1])], tx.init(params))[0]
        [tensor([ 1.,  0., -1.])]
    """
    _ops.check_decay("b1", b1, allow_one=True)
    _ops.check_decay("b2", b2, allow_one=True)
    _ops.check_dtype("mu_dtype", mu_dtype)
    _utils.check_finite_number("smooth_beta", smooth_beta)
    if mode not in ("hard", "smooth", "refined"):
        raise ValueError(f'Unknown lion mode: {mode!r}; use "hard", "smooth" or "refined"')

    def init_fn(params: Any) -> ScaleByLionState:
        return ScaleByLionState(
            count=_utils.zero_count(params), mu=_ops.state_zeros(params, mu_dtype, "mu_dtype")
        )

    def update_fn(
        updates: Any, state: ScaleByLionState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByLionState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByLionState(count, state.mu)
        g, given = _operands(g, s["state.mu"]), g
        c = _ops.moment(g, s["state.mu"], b1)
        if mode == "hard":
            out = _ops.sign(c)  # a complex leaf's phase, as optax's jnp.sign
        elif mode == "smooth":
            out = [torch.tanh(smooth_beta * x) for x in c]
        else:
            out = [torch.where(x.abs() < 1.0, x, s) for x, s in zip(c, _ops.sign(c))]
        out = _ops.cast_like(out, given)
        mu = _ops.cast_like(_ops.moment(g, s["state.mu"], b2), s["state.mu"])
        return tree.unflatten(spec, out), ScaleByLionState(count, tree.unflatten(spec, mu))

    return GradientTransformation(init_fn, update_fn)
