"""MADGRAD: momentumized, adaptive, dual-averaged gradients (optax.contrib's ``scale_by_madgrad``,
``madgrad``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.additive import add_decayed_weights
from functrain.optim.base import GradientTransformation, chain
from functrain.optim.scaling import _NO_PARAMS

__all__ = ["MadgradState", "madgrad", "scale_by_madgrad"]


class MadgradState(NamedTuple):
    """State of :func:`scale_by_madgrad`: the int32 step ``count``, the weighted sums of squared
    gradients ``grad_sum_sq`` and of gradients ``s``, and the initial parameters ``x0``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_madgrad(0.1).init([torch.ones(1)]).x0
        [tensor([1.])]
    """

    count: torch.Tensor
    grad_sum_sq: Any
    s: Any
    x0: Any


def _check(learning_rate: Any, momentum: Any, eps: Any) -> None:
    _utils.check_finite_number("learning_rate", learning_rate)
    _ops.check_scalar_tensor("learning_rate", learning_rate)
    _ops.check_decay("momentum", momentum, allow_one=True)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _ops.check_scalar_tensor("eps", eps)
    _ops.refuse_schedule("eps", eps)


def _cbrt(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Real cube roots (negative for negative ``x``, as ``jnp.cbrt``; torch has no cbrt)."""
    return [torch.sign(x) * x.abs().pow(1.0 / 3.0) for x in xs]


def scale_by_madgrad(
    learning_rate: ScalarOrSchedule,
    momentum: float | torch.Tensor = 0.9,
    eps: float | torch.Tensor = 1e-6,
) -> GradientTransformation:
    """Rescales updates by MADGRAD (Defazio & Jelassi, 2021), a momentumized dual averaging.

    Update rule, with ``k`` the step count before this update (from 0) and ``x₀`` the
    parameters at :meth:`init`::

        λ = (lr + eps) · √(k + 1)
        G ← G + λ · g²,   s ← s + λ · g
        z = x₀ − s / (∛G + eps)
        u = (1 − momentum) · z + momentum · p − p     (the step to the averaged iterate)

    The transform needs ``params``. As in optax and in facebookresearch's ``madgrad``
    package for PyTorch (whose defaults it shares), the learning rate is inside the transform
    (the returned update is already a step, not to be scaled by ``−lr`` again) and ``eps`` is
    added to it (the ``madgrad`` package skips that when ``lr = 0``). ``λ`` is computed in float64, as that package's Python doubles (optax computes
    it in float32 from its int32 count even with x64 enabled: a relative difference of about
    1e-8 in float64 runs). float16 and bfloat16 leaves are computed in float32 and each new sum rounded
    to the leaf's dtype once (optax rounds each increment). Complex leaves raise a TypeError
    naming the leaf (optax's cube root takes real numbers only). ``torch.optim`` has no
    MADGRAD.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        momentum: weight of the current iterate in the average, in ``[0, 1]``.
        eps: added to the cube root and to the learning rate.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_madgrad(0.1, momentum=0.0, eps=0.0)
        >>> params = [torch.zeros(2)]
        >>> tx.update([torch.tensor([8.0, -1.0])], tx.init(params), params)[0]  # −λg/∛(λg²)
        [tensor([-0.4309,  0.2154])]
    """
    _check(learning_rate, momentum, eps)

    def init_fn(params: Any) -> MadgradState:
        return MadgradState(
            count=_utils.zero_count(params),
            grad_sum_sq=tree.zeros_like(params),
            s=tree.zeros_like(params),
            # A copy (the caller may mutate params); derivatives w.r.t. initial parameters
            # go through it, as in optax, unless they are nn.Parameters (initial_copy).
            x0=tree.map(_utils.initial_copy, params),
        )

    def update_fn(
        updates: Any, state: MadgradState, params: Any = None, **extra: Any
    ) -> tuple[Any, MadgradState]:
        del extra
        if params is None:
            raise ValueError(_NO_PARAMS.format(name="scale_by_madgrad"))
        if found := _utils.complex_leaf(updates, "updates"):
            raise TypeError(f"scale_by_madgrad takes real leaves; {found[0]} is {found[1]}")
        trees = {"state.grad_sum_sq": state.grad_sum_sq, "state.s": state.s}
        g, spec, s = _utils.flat(
            updates, {**trees, "state.x0": state.x0, "params": params}, ("params", "state.x0")
        )
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, MadgradState(count, state.grad_sum_sq, state.s, state.x0)
        gs_s, s_s, x0_s, p = s["state.grad_sum_sq"], s["state.s"], s["state.x0"], s["params"]
        x = _operands(g, gs_s, s_s, x0_s)
        dtype = _ops.scalar_dtype(x)
        lr = _ops.on_device(_utils.resolve(learning_rate, state.count), state.count)
        steps = (state.count.to(dtype) + 1).sqrt()
        lamb = (lr + _ops.on_device(eps, state.count)) * steps
        gsq = _ops.add_scaled(_ops.cast_like(gs_s, x), lamb, list(_foreach.mul(x, x)))
        acc = _ops.add_scaled(_ops.cast_like(s_s, x), lamb, x)
        sigma = _cbrt(gsq)
        sigma = _ops.add_fresh(sigma, eps)
        z = list(_foreach.sub(_ops.cast_like(x0_s, x), _foreach.div(acc, sigma)))
        p_x = _ops.cast_like(p, x)
        # (1 − momentum)·z + momentum·p − p = (1 − momentum)·(z − p)
        out = _ops.mul(list(_foreach.sub(z, p_x)), 1 - _ops.on_device(momentum, x[0]))
        new = MadgradState(
            count,
            tree.unflatten(spec, _ops.cast_like(gsq, gs_s)),
            tree.unflatten(spec, _ops.cast_like(acc, s_s)),
            _utils.retree(state.x0, spec, x0_s),
        )
        return tree.unflatten(spec, _ops.cast_like(out, g)), new

    return GradientTransformation(init_fn, update_fn)


def madgrad(
    learning_rate: ScalarOrSchedule,
    momentum: float | torch.Tensor = 0.9,
    weight_decay: ScalarOrSchedule = 0.0,
    eps: float | torch.Tensor = 1e-6,
) -> GradientTransformation:
    """MADGRAD (Defazio & Jelassi, 2021): L2 weight decay added to the gradient, then
    :func:`scale_by_madgrad` (which applies the learning rate itself).

    Update rule: ``g ← g + weight_decay · p``, then the dual-averaged step of
    :func:`scale_by_madgrad`. ``torch.optim`` has no MADGRAD. facebookresearch's ``madgrad``
    package's ``MADGRAD(lr, momentum, weight_decay, eps)`` and ``torch_optimizer.MADGRAD`` are
    ``madgrad(lr, momentum, weight_decay, eps)``, with the same defaults (``momentum=0.9``,
    ``eps=1e-6``; their ``lr`` defaults to ``1e-2``, here it is required): float64
    trajectories agree to ``1e-10`` relative (measured with madgrad 1.3 and torch-optimizer
    0.3.0; with ``momentum=0`` the packages rebuild ``x₀`` from ``p`` each step, ``1e-12``
    apart). madgrad's ``decouple_decay=True`` (``p −= (lr + eps) · wd · p`` after the step) is
    ``chain(scale_by_madgrad(lr, momentum, eps), add_decayed_weights(-(lr + eps) * wd))``.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        momentum: weight of the current iterate in the average, in ``[0, 1]``.
        weight_decay: L2 penalty added to the gradient.
        eps: added to the cube root and to the learning rate.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.madgrad(0.1)
        >>> params = [torch.ones(2)]
        >>> tx.update([torch.ones(2)], tx.init(params), params)[0]
        [tensor([-0.0215, -0.0215])]
    """
    return chain(
        add_decayed_weights(weight_decay),
        scale_by_madgrad(learning_rate, momentum, eps),
    )
