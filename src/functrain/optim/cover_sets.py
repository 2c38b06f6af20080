"""SM3: memory-efficient adaptive step sizes from row and column accumulators (optax's ``scale_by_sm3``, ``sm3``)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops, _utils, scaling
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim.base import GradientTransformation, chain
from functrain.optim.resilient import _reject_complex

__all__ = ["ScaleBySM3State", "scale_by_sm3", "sm3"]


class ScaleBySM3State(NamedTuple):
    """State of :func:`scale_by_sm3`.

    ``mu`` holds, per leaf of ``ndim`` axes, a list of ``ndim`` accumulators (one vector per
    axis, of that axis's length; a 0-d leaf has none); ``nu`` is the momentum, like the
    parameters.

    Example:
        >>> import torch, functrain as ft
        >>> [m.shape for m in ft.scale_by_sm3().init([torch.zeros(2, 3)]).mu[0]]
        [torch.Size([2]), torch.Size([3])]
    """

    mu: Any
    nu: Any


def _expanded(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """The accumulator of ``axis`` shaped to broadcast against a leaf of ``ndim`` axes."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def scale_by_sm3(b1: Hyper = 0.9, b2: Hyper = 1.0, eps: Hyper = 1e-8) -> GradientTransformation:
    """Rescales updates by SM3 (Anil et al., 2019), the SM3-II cover of rows and columns.

    Update rule, for a leaf with ``d ≥ 2`` axes and one accumulator ``μᵢ`` per axis::

        ν = c · g² + b2 · minᵢ μᵢ       (μᵢ broadcast along the other axes; c = 1 − b2, or 1
                                        when b2 = 1: plain sums, the paper's SM3)
        r = g / √(ν + eps) where ν > 0, else 0
        u ← m ← b1 · m + (1 − b1) · r
        μᵢ ← max of ν over every axis but i

    A 1-d leaf keeps a full accumulator (its single ``μ₀`` is ``ν`` itself). A 0-d leaf has no
    accumulator in optax's state layout, so its ``ν = c · g²`` has no memory (optax fails on
    such a leaf). An empty leaf's accumulators stay 0 (optax fails on it: a max over nothing).
    Complex leaves are refused, as in optax. ``torch.optim`` has no SM3.

    Args:
        b1: decay of the momentum of the rescaled updates.
        b2: decay of the accumulators (``1``: sums, as the paper).
        eps: added to the accumulator under the square root.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_sm3(b1=0.0)
        >>> g = [torch.tensor([[3.0, 4.0], [0.0, 1.0]])]
        >>> tx.update(g, tx.init(g))[0]
        [tensor([[1., 1.],
                 [0., 1.]])]
    """
    _ops.check_decay("b1", b1, allow_one=True)
    _ops.check_decay("b2", b2, allow_one=True)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _ops.check_scalar_tensor("eps", eps)
    # optax tests ``b2 != 1.0`` in Python: a tensor b2 always takes the (1 − b2) weight.
    c = 1.0 if _utils.is_real_number(b2) and b2 == 1 else 1 - b2

    def init_fn(params: Any) -> ScaleBySM3State:
        _reject_complex(params, "scale_by_sm3", "params")

        def axes(p: torch.Tensor) -> list[torch.Tensor]:
            return [p.new_zeros(p.shape[i]) for i in range(p.dim())]

        return ScaleBySM3State(mu=tree.map(axes, params), nu=tree.zeros_like(params))

    def update_fn(
        updates: Any, state: ScaleBySM3State, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleBySM3State]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.nu": state.nu})
        if not g:
            return updates, state
        if any(x.is_complex() for x in g):
            _reject_complex(updates, "scale_by_sm3", "updates")
        accs = tree.flatten_up_to(spec, state.mu, ("updates", "state.mu"), updates)
        nu_old = s["state.nu"]
        x = _operands(g, nu_old)
        nu_new, new_accs = [], []
        for xi, acc, m in zip(x, accs, _ops.cast_like(nu_old, x)):
            acc32 = [a.to(xi.dtype) for a in acc]
            v = xi * xi * _ops.on_device(c, xi)
            if xi.dim() == 1:
                v = v + _ops.on_device(b2, xi) * acc32[0]
            elif xi.dim() >= 2:
                low = functools.reduce(
                    torch.minimum, [_expanded(a, xi.dim(), i) for i, a in enumerate(acc32)]
                )
                v = v + _ops.on_device(b2, xi) * low
            scale = torch.where(v > 0, torch.rsqrt(v + _ops.on_device(eps, xi)), 0.0)
            nu_new.append(torch.lerp(m, xi * scale, 1 - _ops.on_device(b1, xi)))
            if xi.dim() < 2:
                new_accs.append([v.to(a.dtype) for a in acc])
            elif xi.numel() == 0:
                # amax has no identity for an empty reduction; ν ≥ 0, so the max of nothing is 0.
                new_accs.append([torch.zeros_like(a) for a in acc])
            else:
                others = [tuple(j for j in range(xi.dim()) if j != i) for i in range(xi.dim())]
                new_accs.append([v.amax(dim=o).to(a.dtype) for o, a in zip(others, acc)])
        kept_nu = _ops.cast_like(nu_new, nu_old)
        new_state = ScaleBySM3State(
            mu=tree.unflatten(spec, new_accs), nu=tree.unflatten(spec, kept_nu)
        )
        # The update is nu itself: return a copy (see _ops.unshared).
        out = _ops.unshared(_ops.cast_like(nu_new, g), kept_nu)
        return tree.unflatten(spec, out), new_state

    return GradientTransformation(init_fn, update_fn)


def sm3(learning_rate: Hyper, momentum: Hyper = 0.9) -> GradientTransformation:
    """The SM3 optimizer: :func:`scale_by_sm3` (with ``b1=momentum``) then ``−learning_rate``.

    ``learning_rate`` is a number or a 0-d tensor (no schedule, as optax). ``torch.optim`` has
    no SM3.

    Args:
        learning_rate: the step size.
        momentum: decay of the momentum of the rescaled updates.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.sm3(0.1, momentum=0.0)
        >>> params = [torch.ones(2)]
        >>> u, _ = tx.update([torch.tensor([2.0, -0.5])], tx.init(params), params)
        >>> ft.apply_updates(params, u)
        [tensor([0.9000, 1.1000])]
    """
    _utils.check_finite_number("learning_rate", learning_rate, minimum=0.0)
    _ops.check_scalar_tensor("learning_rate", learning_rate)
    if callable(learning_rate) and not isinstance(learning_rate, torch.Tensor):
        raise TypeError("sm3's learning_rate must be a number or a 0-d tensor (no schedule)")
    return chain(scale_by_sm3(momentum), scaling.scale(-learning_rate))
