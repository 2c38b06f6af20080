"""NovoGrad: layer-wise normalised second moments (optax's ``scale_by_novograd``, ``novograd``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, scaling
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation, chain

__all__ = ["ScaleByNovogradState", "novograd", "scale_by_novograd"]


class ScaleByNovogradState(NamedTuple):
    """State of :func:`scale_by_novograd`: the int32 ``count``, the first moment ``mu`` (like the
    parameters) and ``nu``, one 0-d second moment per leaf (in the leaf's dtype; float32 for a
    float16 leaf, whose squared norm overflows float16 above a norm of 256).

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_novograd().init([torch.zeros(3)]).nu
        [tensor(0.)]
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_novograd(
    b1: Hyper = 0.9,
    b2: Hyper = 0.25,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    mu_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Rescales updates by NovoGrad (Ginsburg et al., 2019): Adam with one second moment per leaf.

    Update rule, per leaf (each tensor is one "layer"), with ``t`` the step count::

        n = ‖g‖²                                   (the leaf's squared L2 norm)
        nu ← n                   if t = 1, else b2 · nu + (1 − b2) · n
        a = g / (√(nu + eps_root) + eps) + weight_decay · p
        mu ← a                   if t = 1, else b1 · mu + a
        u ← mu

    The first moment has no ``(1 − b1)`` factor and no bias correction, as in optax and the
    paper. ``torch.optim`` has no NovoGrad.

    Differences from optax: the updates keep their own dtype (optax returns them in
    ``mu_dtype`` when one is given); float16 and bfloat16 leaves are computed in float32 and
    rounded once, and a float16 leaf keeps its ``nu`` in float32 (optax: float16, where
    ``‖g‖²`` overflows to ``inf`` once ``‖g‖ > 256``, and every later update is 0 or NaN).

    Args:
        b1: decay of the first moment.
        b2: decay of the per-leaf second moment, in ``[0, 1]``.
        eps: added to the denominator outside the square root.
        eps_root: added to the second moment inside the square root.
        weight_decay: coefficient of the ``weight_decay · params`` added before the momentum
            (needs ``params`` in ``update`` unless it is the number 0).
        mu_dtype: optional dtype in which the first moment is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_novograd()
        >>> u, _ = tx.update([torch.tensor([3.0, 4.0])], tx.init([torch.zeros(2)]))
        >>> u  # g / ‖g‖ at the first step
        [tensor([0.6000, 0.8000])]
    """
    _ops.check_decay("b1", b1, allow_one=True)
    _ops.check_decay("b2", b2, allow_one=True)
    for name, value in (("eps", eps), ("eps_root", eps_root)):
        _utils.check_finite_number(name, value, minimum=0.0)
        _ops.check_scalar_tensor(name, value)
    _utils.check_finite_number("weight_decay", weight_decay)
    _ops.check_scalar_tensor("weight_decay", weight_decay)
    if callable(weight_decay) and not isinstance(weight_decay, torch.Tensor):
        raise TypeError("weight_decay must be a number or a 0-d tensor (optax takes no schedule)")
    _ops.check_dtype("mu_dtype", mu_dtype)
    decays = not _ops.is_zero(weight_decay)

    def init_fn(params: Any) -> ScaleByNovogradState:
        return ScaleByNovogradState(
            count=_utils.zero_count(params),
            mu=_ops.state_zeros(params, mu_dtype, "mu_dtype"),
            nu=tree.map(_nu_zero, params),
        )

    def update_fn(
        updates: Any, state: ScaleByNovogradState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByNovogradState]:
        del extra
        if decays and params is None:
            raise ValueError("scale_by_novograd with weight_decay needs params in update")
        trees = {"state.mu": state.mu, **({"params": params} if decays else {})}
        g, spec, s = _utils.flat(updates, trees)
        nu_old = tree.flatten_up_to(spec, state.nu, ("updates", "state.nu"), updates)
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByNovogradState(count, state.mu, state.nu)
        mu_old = s["state.mu"]
        x = _operands(g, mu_old, nu_old)
        first = count == 1
        sq = [n.square() for n in _foreach.norm(x)]  # real, also for complex leaves
        nu = [
            torch.where(first, n, b2 * v + (1 - b2) * n)
            # A complex leaf's nu is complex with a zero imaginary part (optax's dtype).
            for n, v in zip(sq, _ops.cast_like([v.real for v in nu_old], sq))
        ]
        denom = _ops.sqrt(_ops.add(nu, eps_root) if not _ops.is_zero(eps_root) else nu)
        denom = _ops.add_fresh(denom, eps)
        a = [y / d.to(y.dtype) for y, d in zip(x, denom)]
        if decays:
            a = _ops.add_scaled(a, weight_decay, _ops.cast_like(s["params"], a))
        b1_ = _ops.on_device(b1, a[0])
        mu = [torch.where(first, ai, b1_ * m + ai) for ai, m in zip(a, _ops.cast_like(mu_old, a))]
        # A copy where the new state would hold the same tensor: an in-place op on the
        # updates must not change the state's mu.
        out = [
            m.clone() if m.dtype == y.dtype == o.dtype else m.to(y.dtype)
            for m, y, o in zip(mu, g, mu_old)
        ]
        new_state = ScaleByNovogradState(
            count=count,
            mu=tree.unflatten(spec, _ops.cast_like(mu, mu_old)),
            nu=tree.unflatten(spec, _ops.cast_like(nu, nu_old)),
        )
        return tree.unflatten(spec, out), new_state

    return GradientTransformation(init_fn, update_fn)


def _nu_zero(p: torch.Tensor) -> torch.Tensor:
    """A leaf's initial ``nu``: float32 for float16 (a squared norm above 65504 would be inf;
    bfloat16 has float32's range, and float32/float64 keep their dtype)."""
    return p.new_zeros((), dtype=torch.float32 if p.dtype == torch.float16 else None)


def novograd(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.25,
    eps: Hyper = 1e-6,
    eps_root: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
) -> GradientTransformation:
    """The NovoGrad optimizer: :func:`scale_by_novograd` then the learning rate.

    Note the alias's default ``eps=1e-6`` (the transform's is ``1e-8``), as in optax.
    ``torch.optim`` has no NovoGrad.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        b1: decay of the first moment.
        b2: decay of the per-leaf second moment.
        eps: added to the denominator outside the square root.
        eps_root: added to the second moment inside the square root.
        weight_decay: coefficient of the weight decay added before the momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.novograd(0.1)
        >>> params = [torch.ones(2)]
        >>> u, _ = tx.update([torch.tensor([3.0, 4.0])], tx.init(params), params)
        >>> ft.apply_updates(params, u)
        [tensor([0.9400, 0.9200])]
    """
    return chain(
        scale_by_novograd(b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay),
        scaling.scale_by_learning_rate(learning_rate),
    )
