"""MoMo: momentum model-based adaptive step sizes read from the loss (optax.contrib's ``momo``,
``momo_adam``)."""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation
from functrain.optim.scaling import _NO_PARAMS

__all__ = ["MomoAdamState", "MomoState", "momo", "momo_adam"]

# optax compares with ``jnp.finfo(float).eps``, float64's machine epsilon, for every dtype.
_TINY = sys.float_info.epsilon


class MomoState(NamedTuple):
    """State of :func:`momo`: the momentum ``exp_avg``, the averaged loss ``barf``, the averaged
    ``⟨g, p⟩`` ``gamma``, the loss lower bound ``lb`` (0-d tensors in the parameters' lowest
    floating dtype) and the int32 step ``count``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.momo().init([torch.zeros(1)]).lb
        tensor(0.)
    """

    exp_avg: Any
    barf: torch.Tensor
    gamma: torch.Tensor
    lb: torch.Tensor
    count: torch.Tensor


class MomoAdamState(NamedTuple):
    """State of :func:`momo_adam`: :class:`MomoState`'s fields plus the second moment
    ``exp_avg_sq``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.momo_adam().init([torch.zeros(1)]).exp_avg_sq
        [tensor([0.])]
    """

    exp_avg: Any
    exp_avg_sq: Any
    barf: torch.Tensor
    gamma: torch.Tensor
    lb: torch.Tensor
    count: torch.Tensor


def _check(learning_rate: Any, lower_bound: Any, weight_decay: Any, **decays: Any) -> None:
    _utils.check_finite_number("learning_rate", learning_rate)
    _ops.check_scalar_tensor("learning_rate", learning_rate)
    for name, value in decays.items():
        # momo_adam's b1 = 1 zeroes its bias correction 1 − b1ᵗ (NaN bounds, no step); momo's
        # beta = 1 only freezes the first averages.
        _ops.check_decay(name, value, allow_one=name == "beta")
    for name, value in (("lower_bound", lower_bound), ("weight_decay", weight_decay)):
        _utils.check_finite_number(name, value)
        _ops.check_scalar_tensor(name, value)
        _ops.refuse_schedule(name, value)


def _lowest_dtype(params: Any) -> torch.dtype:
    """The narrowest floating dtype among the parameters (optax's ``tree.dtype(p, 'lowest')``)."""
    dtypes = [x.dtype for x in tree.leaves(params) if isinstance(x, torch.Tensor)]
    floating = [d for d in dtypes if d.is_floating_point]
    if not floating:
        return torch.get_default_dtype()
    return min(floating, key=lambda d: torch.finfo(d).bits)


def _init_scalars(params: Any, lower_bound: Any) -> tuple[torch.Tensor, ...]:
    dtype, device = _lowest_dtype(params), _utils.default_device(params)
    zero = torch.zeros((), dtype=dtype, device=device)
    if isinstance(lower_bound, torch.Tensor):
        lb = lower_bound.to(dtype=dtype, device=device).clone()  # differentiable, as optax
    else:  # straight to ``dtype``: through float32 a float64 bound 0.2 would be 3e-9 off
        lb = torch.tensor(lower_bound, dtype=dtype, device=device)
    return zero, zero.clone(), lb


def _vdot(xs: list[torch.Tensor], ys: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``Σ ⟨x, y⟩`` over the leaves, in ``dtype``."""
    prods = _foreach.mul(xs, ys)
    return torch.stack([p.sum(dtype=dtype) for p in prods]).sum()


def _leaves(name: str, updates: Any, state_trees: dict, params: Any, value: Any) -> tuple:
    """Flattens, and refuses a missing ``params`` or ``value`` and complex leaves by name."""
    if params is None:
        raise ValueError(_NO_PARAMS.format(name=name))
    if value is None:
        # TypeError, as optax's required keyword (and scale_by_polyak, reduce_on_plateau here).
        raise TypeError(
            f"{name} needs the loss: call tx.update(updates, state, params, value=loss) "
            "(ft.make_train_step passes the step's loss)"
        )
    if found := _utils.complex_leaf(updates, "updates"):
        raise TypeError(f"{name} takes real leaves; {found[0]} is {found[1]}")
    return _utils.flat(updates, {**state_trees, "params": params})


def _loss(value: Any, like: torch.Tensor, *tracked_by: Any) -> torch.Tensor:
    """The loss as a 0-d tensor like ``like``: when the update is differentiated (``tracked_by``,
    its gradients and params, tracked) not detached, so that the derivative follows the loss
    too (the model's step size depends on it), as optax's ``jax.grad``; else detached
    (:func:`functrain.optim._utils.loss_value`: the state's loss average would chain graphs)."""
    if isinstance(value, torch.Tensor):
        v = _utils.loss_value(value, *tracked_by)
    else:  # straight to ``like``'s dtype: a Python float through float32 is 1e-8 off
        v = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if v.numel() != 1 or v.is_complex():
        raise TypeError(f"value must be a single real number, got shape {tuple(v.shape)}")
    return v.reshape(()).to(device=like.device, dtype=like.dtype)


def _step_size(
    alpha: Any,
    weight_decay: Any,
    lower_bound: Any,
    adapt: bool,
    barf: torch.Tensor,
    gamma: torch.Tensor,
    lb: torch.Tensor,
    iprod: torch.Tensor,
    norm: torch.Tensor,
    bc1: Any,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """MoMo's ``tau``, the new lower bound and ``1 + alpha·weight_decay``; ``bc1`` is 1 for
    :func:`momo` and Adam's first bias correction for :func:`momo_adam`."""
    c = 1 + _ops.on_device(alpha, barf) * _ops.on_device(weight_decay, barf)
    floor = _ops.on_device(lower_bound, barf)
    if adapt:
        cap = c * (barf - gamma) + iprod
        lowered = torch.clamp_min(cap / (2 * bc1 * c), floor)
        lb_now = torch.where(cap < c * bc1 * lb, lowered, lb)
    else:
        lb_now = lb
    h = torch.clamp_min(c * (barf - bc1 * lb_now - gamma) + iprod, 0.0)
    t1 = torch.where(norm <= _TINY, torch.zeros_like(h), h / norm)  # no step without a direction
    tau = torch.clamp_max(t1, _ops.on_device(alpha, barf) / bc1)
    if adapt:
        # τ·‖d‖². Where ‖d‖² overflowed to inf (a huge gradient), τ is 0 and 0·inf would make
        # the bound NaN and every later step NaN; the product's limit there is h (τ = h/‖d‖²).
        tau_norm = torch.where(torch.isinf(norm), h, tau * norm)
        new_lb = torch.clamp_min(((barf + iprod - gamma) - 0.5 * tau_norm) / bc1, floor)
    else:
        new_lb = lb
    return tau, new_lb, c


def _direction(
    d: list[torch.Tensor], p: list[torch.Tensor], tau: torch.Tensor, alpha: Any, wd: Any, c: Any
) -> list[torch.Tensor]:
    """``−alpha·wd/(1 + alpha·wd) · p − tau · d`` on fresh leaves."""
    out = _ops.mul(d, -tau)
    if not _ops.is_zero(wd):
        shrink = _ops.on_device(alpha, tau) * _ops.on_device(wd, tau) / c
        out = _ops.add_scaled(out, -shrink, p)
    return out


def momo(
    learning_rate: ScalarOrSchedule = 1.0,
    beta: Hyper = 0.9,
    lower_bound: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    adapt_lower_bound: bool = False,
) -> GradientTransformation:
    """MoMo (Schaipp et al., 2023): SGD with momentum whose step size is the Polyak-like step
    of a model of the loss built from averaged losses, gradients and ``⟨g, p⟩``.

    Update rule, with ``k`` the step count before this update, ``f`` the loss, ``β = 0`` at
    ``k = 0`` and ``beta`` after, ``α = learning_rate(k)`` and ``c = 1 + α·weight_decay``::

        f̄ ← β·f̄ + (1 − β)·f,   d ← β·d + (1 − β)·g,   γ ← β·γ + (1 − β)·⟨g, p⟩
        h = c·(f̄ − lb − γ) + ⟨d, p⟩
        τ = min(α, max(h, 0) / ‖d‖²)   (0 where ‖d‖² ≤ 2.2e-16)
        u = −α·weight_decay/c · p − τ·d

    With ``adapt_lower_bound`` the lower bound ``lb`` is lowered (never below
    ``lower_bound``) when the model falls under it, and re-estimated after every step.
    ``update(updates, state, params, value=loss)`` takes the loss as the keyword ``value``
    (:func:`functrain.make_train_step` passes it); the update already includes the step size
    (no ``−learning_rate`` to chain). As in optax the scalar state is kept in the parameters'
    lowest floating dtype; float16 and bfloat16 leaves are computed in float32. Complex leaves
    raise a TypeError naming the leaf. ``torch.optim`` has no MoMo.

    Differences from optax: a missing loss is a TypeError naming the transform and the
    ``value=`` keyword, whether ``value`` is left out (optax: Python's TypeError for its
    required keyword) or passed as ``None`` (optax: ValueError); a missing ``params`` is a
    ValueError, as in optax. The same holds for :func:`momo_adam`.

    Args:
        learning_rate: the largest step size: a number, a 0-d tensor or a schedule.
        beta: momentum of the averages, in ``[0, 1]``.
        lower_bound: a lower bound of the loss (0 for non-negative losses).
        weight_decay: decoupled weight decay, applied as ``p/(1 + α·weight_decay)``.
        adapt_lower_bound: estimate the lower bound online.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.momo()
        >>> params = [torch.tensor([1.0, 2.0])]
        >>> loss = (params[0] ** 2).sum()  # 5, gradient 2·params; model step 5 / 20 = 0.25
        >>> u, _ = tx.update([2 * params[0]], tx.init(params), params, value=loss)
        >>> ft.apply_updates(params, u)
        [tensor([0.5000, 1.0000])]
    """
    _check(learning_rate, lower_bound, weight_decay, beta=beta)

    def init_fn(params: Any) -> MomoState:
        barf, gamma, lb = _init_scalars(params, lower_bound)
        return MomoState(tree.zeros_like(params), barf, gamma, lb, _utils.zero_count(params))

    def update_fn(
        updates: Any, state: MomoState, params: Any = None, *, value: Any = None, **extra: Any
    ) -> tuple[Any, MomoState]:
        del extra
        g, spec, s = _leaves("momo", updates, {"state.exp_avg": state.exp_avg}, params, value)
        count = _utils.safe_increment(state.count)
        ea_s, p = s["state.exp_avg"], s["params"]
        work = torch.promote_types(state.barf.dtype, torch.float32)
        barf_s = state.barf.to(work)
        f = _loss(value, barf_s, g, p)
        bt = _ops.on_device(beta, barf_s) * (state.count > 0).to(work)  # 0 at the first step
        barf = bt * barf_s + (1 - bt) * f
        if not g:
            new = MomoState(state.exp_avg, barf.to(state.barf.dtype), state.gamma, state.lb, count)
            return updates, new
        x, given = _operands(g, ea_s, p), g
        p_x = _ops.cast_like(p, x)
        ea = _ops.moment(x, ea_s, bt)
        gamma = bt * state.gamma.to(work) + (1 - bt) * _vdot(x, p_x, work)
        norm, iprod = _vdot(ea, ea, work), _vdot(ea, p_x, work)
        alpha = _utils.resolve(learning_rate, state.count)
        lb = state.lb.to(work)
        tau, new_lb, c = _step_size(
            alpha, weight_decay, lower_bound, adapt_lower_bound, barf, gamma, lb, iprod, norm, 1
        )
        out = _direction(ea, p_x, tau, alpha, weight_decay, c)
        dtype = state.barf.dtype
        new = MomoState(
            tree.unflatten(spec, _ops.cast_like(ea, ea_s)),
            barf.to(dtype),
            gamma.to(dtype),
            new_lb.to(dtype),
            count,
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new

    return GradientTransformation(init_fn, update_fn)


def momo_adam(
    learning_rate: ScalarOrSchedule = 1e-2,
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    lower_bound: Hyper = 0.0,
    weight_decay: Hyper = 0.0,
    adapt_lower_bound: bool = False,
) -> GradientTransformation:
    """MoMo-Adam (Schaipp et al., 2023): :func:`momo`'s model-based step size in Adam's
    geometry.

    Update rule, with ``t = k + 1`` the step count after this update, ``f`` the loss,
    ``α = learning_rate(k)``, ``c = 1 + α·weight_decay`` and bias corrections
    ``bc1 = 1 − b1ᵗ``, ``bc2 = 1 − b2ᵗ``::

        f̄ ← b1·f̄ + (1 − b1)·f,  d ← b1·d + (1 − b1)·g,  γ ← b1·γ + (1 − b1)·⟨g, p⟩
        v ← b2·v + (1 − b2)·g²,   D = eps + √(v / bc2)
        h = c·(f̄ − bc1·lb − γ) + ⟨d, p⟩
        τ = min(α / bc1, max(h, 0) / ⟨d, d/D⟩)   (0 where ⟨d, d/D⟩ ≤ 2.2e-16)
        u = −α·weight_decay/c · p − τ·d/D

    The averages are not zeroed at the first step (unlike :func:`momo`); ``bc1`` corrects
    them. Pass the loss as ``value=`` (see :func:`momo`); the update includes the step size.
    ``torch.optim`` has no MoMo-Adam.

    Args:
        learning_rate: the largest step size (times ``1/bc1``): a number, a 0-d tensor or a
            schedule.
        b1: decay of the first moment and of the loss averages, in ``[0, 1)``.
        b2: decay of the second moment, in ``[0, 1)``.
        eps: added to the preconditioner ``√(v / bc2)``.
        lower_bound: a lower bound of the loss (0 for non-negative losses).
        weight_decay: decoupled weight decay, applied as ``p/(1 + α·weight_decay)``.
        adapt_lower_bound: estimate the lower bound online.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.momo_adam(learning_rate=1.0)
        >>> params = [torch.tensor([1.0, -2.0])]
        >>> loss = (params[0] ** 2).sum()  # 5, gradient 2·params; d/D = ±0.1, τ = 0.5 / 0.06
        >>> u, _ = tx.update([2 * params[0]], tx.init(params), params, value=loss)
        >>> u
        [tensor([-0.8333,  0.8333])]
    """
    _check(learning_rate, lower_bound, weight_decay, b1=b1, b2=b2)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _ops.check_scalar_tensor("eps", eps)
    _ops.refuse_schedule("eps", eps)

    def init_fn(params: Any) -> MomoAdamState:
        barf, gamma, lb = _init_scalars(params, lower_bound)
        zeros = tree.zeros_like(params)
        return MomoAdamState(
            zeros, tree.zeros_like(params), barf, gamma, lb, _utils.zero_count(params)
        )

    def update_fn(
        updates: Any, state: MomoAdamState, params: Any = None, *, value: Any = None, **extra: Any
    ) -> tuple[Any, MomoAdamState]:
        del extra
        trees = {"state.exp_avg": state.exp_avg, "state.exp_avg_sq": state.exp_avg_sq}
        g, spec, s = _leaves("momo_adam", updates, trees, params, value)
        count = _utils.safe_increment(state.count)
        ea_s, eas_s, p = s["state.exp_avg"], s["state.exp_avg_sq"], s["params"]
        work = torch.promote_types(state.barf.dtype, torch.float32)
        barf_s = state.barf.to(work)
        b1_w = _ops.on_device(b1, barf_s)
        barf = b1_w * barf_s + (1 - b1_w) * _loss(value, barf_s, g, p)
        if not g:
            new = MomoAdamState(
                state.exp_avg,
                state.exp_avg_sq,
                barf.to(state.barf.dtype),
                state.gamma,
                state.lb,
                count,
            )
            return updates, new
        x, given = _operands(g, ea_s, eas_s, p), g
        p_x = _ops.cast_like(p, x)
        ea = _ops.moment(x, ea_s, b1)
        eas = _ops.moment_sq(x, eas_s, b2)
        scalar = _ops.scalar_dtype(x)
        bc1 = (1 - _utils.power(b1, count, scalar)).to(work)
        bc2 = (1 - _utils.power(b2, count, scalar)).to(work)
        precond = _ops.div(eas, bc2)
        w = _foreach.may_write(precond, eps)  # autograd refuses writes into sqrt's result
        precond = _foreach.maybe_in_place(w, _foreach.sqrt_, _foreach.sqrt, precond)
        precond = _foreach.maybe_in_place(w, _ops.add_, _ops.add, precond, eps)
        weighted = list(_foreach.div(ea, precond))
        norm, iprod = _vdot(ea, weighted, work), _vdot(ea, p_x, work)
        gamma = b1_w * state.gamma.to(work) + (1 - b1_w) * _vdot(x, p_x, work)
        alpha = _utils.resolve(learning_rate, state.count)
        lb = state.lb.to(work)
        tau, new_lb, c = _step_size(
            alpha, weight_decay, lower_bound, adapt_lower_bound, barf, gamma, lb, iprod, norm, bc1
        )
        out = _direction(weighted, p_x, tau, alpha, weight_decay, c)
        dtype = state.barf.dtype
        new = MomoAdamState(
            tree.unflatten(spec, _ops.cast_like(ea, ea_s)),
            tree.unflatten(spec, _ops.cast_like(eas, eas_s)),
            barf.to(dtype),
            gamma.to(dtype),
            new_lb.to(dtype),
            count,
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new

    return GradientTransformation(init_fn, update_fn)
