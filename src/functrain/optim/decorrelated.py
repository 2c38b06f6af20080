"""ADOPT: Adam whose momentum averages gradients already scaled by the *previous* second moment
(optax.contrib's ``scale_by_adopt``, ``adopt``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.adaptive import ScaleByAdamState
from functrain.optim.base import GradientTransformation, chain
from functrain.optim.scaling import scale_by_learning_rate

__all__ = ["adopt", "scale_by_adopt"]


def _quarter_root(count: torch.Tensor) -> torch.Tensor:
    """``count ** 0.25``, the default clip value, in float64 (float32 on MPS, which has none):
    the int32 count's float32 power would be 1e-8 off the float64 run's."""
    dtype = torch.float32 if count.device.type == "mps" else torch.float64
    return count.to(dtype) ** 0.25


def _check(b1: Any, b2: Any, eps: Any, mu_dtype: Any) -> None:
    _ops.check_decay("b1", b1, allow_one=True)
    _ops.check_decay("b2", b2, allow_one=True)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _ops.check_scalar_tensor("eps", eps)
    _ops.refuse_schedule("eps", eps)
    _ops.check_dtype("mu_dtype", mu_dtype)


def scale_by_adopt(
    b1: Hyper = 0.9,
    b2: Hyper = 0.9999,
    eps: Hyper = 1e-6,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[torch.Tensor], Any] = _quarter_root,
) -> GradientTransformation:
    """Rescales updates by ADOPT (Taniguchi et al., 2024): the gradient is normalised by the
    second moment of the *previous* steps before it enters the momentum.

    Update rule, with ``t`` the step count before this update (from 0)::

        x  = clip(g / max(√nu, eps), ±clip_value_fn(t))   (nu of the previous step)
        nu ← b2 · nu + (1 − b2) · |g|²                    (at t = 0: nu ← |g|²)
        mu ← b1 · mu + (1 − b1) · x                       (at t = 0: mu unchanged)
        u  = mu                (nesterov: b1 · mu + (1 − b1) · x, again at t = 0: mu)

    The first step only fills ``nu``, so its update is ``mu`` of the initial state (zero).
    Without bias corrections, as in the paper. The default ``clip_value_fn`` is ``t ** 0.25``
    (computed in float64); it receives the int32 count, as optax's. float16 and bfloat16 leaves
    are computed in float32 and rounded once, as in :func:`scale_by_adam`. The state is a
    :class:`ScaleByAdamState` with ``mu`` in ``mu_dtype`` and ``nu`` in the parameters' dtype.
    Complex leaves are supported only with ``use_clipping=False`` (a clip of a complex number
    is undefined). ``torch.optim`` has no ADOPT (the authors publish a PyTorch one).

    Args:
        b1: decay of the momentum, in ``[0, 1]``.
        b2: decay of the second moment, in ``[0, 1]``.
        eps: lower bound of the denominator ``√nu``.
        mu_dtype: optional dtype in which the momentum is stored.
        nesterov: use Nesterov momentum.
        use_clipping: clip the normalised gradient to ``±clip_value_fn(t)``.
        clip_value_fn: a function of the int32 step count giving the clip value.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_adopt(b1=0.5)
        >>> params = [torch.zeros(2)]
        >>> state = tx.init(params)
        >>> u, state = tx.update([torch.tensor([2.0, -1.0])], state)  # fills nu only
        >>> tx.update([torch.tensor([2.0, 0.5])], state)[0]  # 0.5 · clip(g / |g₀|, ±1)
        [tensor([0.5000, 0.2500])]
    """
    _check(b1, b2, eps, mu_dtype)
    if not callable(clip_value_fn):
        raise TypeError(f"clip_value_fn must be callable, got {clip_value_fn!r}")

    def init_fn(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=_utils.zero_count(params),
            mu=_ops.state_zeros(params, mu_dtype, "mu_dtype"),
            nu=tree.zeros_like(params),
        )

    def update_fn(
        updates: Any, state: ScaleByAdamState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdamState]:
        del params, extra
        if use_clipping and (found := _utils.complex_leaf(updates, "updates")):
            raise TypeError(
                f"scale_by_adopt clips real numbers; {found[0]} is {found[1]} "
                "(use_clipping=False supports complex leaves)"
            )
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        mu_s, nu_s = s["state.mu"], s["state.nu"]
        x, given = _operands(g, mu_s, nu_s), g
        # The first step only fills nu: b2 acts as 0 there, and b1 as 1.
        started = (state.count > 0).to(_ops.scalar_dtype(x))
        b1_t = 1 - (1 - _ops.on_device(b1, started)) * started
        b2_t = _ops.on_device(b2, started) * started
        nu_x = _ops.cast_like(nu_s, x)
        if any(v.is_complex() for v in nu_x):  # nu's imaginary parts are zero
            denom = [torch.sqrt(v.real if v.is_complex() else v) for v in nu_x]
        else:
            denom = _ops.sqrt(nu_x)
        denom = _floor(denom, eps)
        normed = list(_foreach.div(x, denom))
        if use_clipping:
            c = clip_value_fn(state.count)
            normed = [_clip(n, c) for n in normed]
        mu = _ops.moment(normed, mu_s, b1_t)
        nu = _ops.moment_sq(x, nu_s, b2_t)
        out = _ops.moment(normed, mu, b1_t) if nesterov else mu
        kept_mu = _ops.cast_like(mu, mu_s)
        new = ScaleByAdamState(
            count, tree.unflatten(spec, kept_mu), tree.unflatten(spec, _ops.cast_like(nu, nu_s))
        )
        # Without Nesterov the update is mu itself: return a copy (see _ops.unshared).
        out = _ops.unshared(_ops.cast_like(out, given), kept_mu)
        return tree.unflatten(spec, out), new

    return GradientTransformation(init_fn, update_fn)


def _floor(xs: list[torch.Tensor], eps: Hyper) -> list[torch.Tensor]:
    """``[max(x, eps)]`` without reading a tensor ``eps`` on the host."""
    if isinstance(eps, torch.Tensor):
        return [torch.clamp_min(x, eps.to(device=x.device, dtype=x.dtype)) for x in xs]
    return [torch.clamp_min(x, eps) for x in xs]


def _clip(x: torch.Tensor, c: Any) -> torch.Tensor:
    """``clip(x, −c, c)`` in ``x``'s dtype, ``c`` a number or a 0-d tensor."""
    if isinstance(c, torch.Tensor):
        c = c.to(device=x.device, dtype=x.dtype)
        return torch.clamp(x, -c, c)
    return torch.clamp(x, -c, c)


def adopt(
    learning_rate: ScalarOrSchedule,
    b1: Hyper = 0.9,
    b2: Hyper = 0.9999,
    eps: Hyper = 1e-6,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[torch.Tensor], Any] = _quarter_root,
) -> GradientTransformation:
    """ADOPT (Taniguchi et al., 2024): :func:`scale_by_adopt` followed by ``−learning_rate``.

    Adam with the gradient normalised by the previous steps' second moment before it enters the
    momentum, which converges for any ``b2``; the normalised gradient is clipped to
    ``±t^0.25`` by default. The first update is zero (it only fills the second moment).
    ``torch.optim`` has no ADOPT; the authors' PyTorch ``ADOPT`` adds a decoupled weight decay,
    which here is ``chain(scale_by_adopt(...), add_decayed_weights(wd), scale_by_learning_rate(lr))``.

    With :func:`functrain.inject_hyperparams`, name ``clip_value_fn`` in ``static_args`` (a
    callable is otherwise taken for a schedule, as in optax):
    ``ft.inject_hyperparams(ft.adopt, static_args="clip_value_fn")(learning_rate=1e-3)``.

    Args:
        learning_rate: the step size: a number, a 0-d tensor or a schedule of the step count.
        b1: decay of the momentum, in ``[0, 1]``.
        b2: decay of the second moment, in ``[0, 1]``.
        eps: lower bound of the denominator.
        mu_dtype: optional dtype in which the momentum is stored.
        nesterov: use Nesterov momentum.
        use_clipping: clip the normalised gradient (recommended when training from scratch).
        clip_value_fn: a function of the int32 step count giving the clip value.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.adopt(0.1)
        >>> params = [torch.ones(2)]
        >>> state = tx.init(params)
        >>> u, state = tx.update([torch.ones(2)], state, params)
        >>> u  # the first step fills the second moment only
        [tensor([-0., -0.])]
        >>> tx.update([torch.ones(2)], state, params)[0]
        [tensor([-0.0100, -0.0100])]
    """
    return chain(
        scale_by_adopt(
            b1,
            b2,
            eps,
            mu_dtype,
            nesterov=nesterov,
            use_clipping=use_clipping,
            clip_value_fn=clip_value_fn,
        ),
        scale_by_learning_rate(learning_rate),
    )
