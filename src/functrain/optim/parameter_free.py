"""Learning-rate-free AdamW: Prodigy and D-Adaptation (optax.contrib's ``prodigy``, ``dadapt_adamw``).

Both estimate the distance ``D`` from the initial point to a solution from global dot products
and norms, and step like AdamW with ``learning_rate · D``. Those statistics are 0-d tensors
that stay on the device: no update reads them on the host. The private helpers at the bottom
(state dtype, complex refusal, global dots and sums) are shared with
:mod:`functrain.optim.distance_adaptive` and :mod:`functrain.optim.mechanic`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, scaling
from functrain.optim._adam_ops import Hyper, _operands
from functrain.optim._global_stats import (
    _abs_sum,
    _copy,
    _dot,
    _moments_like,
    _on,
    _params_leaves,
    _refuse_complex,
    _scalar,
    _state_dtype,
)
from functrain.optim._utils import ScalarOrSchedule
from functrain.optim.base import GradientTransformation

__all__ = ["DAdaptAdamWState", "ProdigyState", "dadapt_adamw", "prodigy"]


class ProdigyState(NamedTuple):
    """State of :func:`prodigy`: Adam's moments, the weighted gradient sum, the initial point,
    the distance estimate ``estim_lr`` and its numerator (0-d), and the int32 step ``count``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.prodigy().init([torch.zeros(2)]).estim_lr
        tensor(1.0000e-06)
    """

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    params0: Any
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor
    count: torch.Tensor


class DAdaptAdamWState(NamedTuple):
    """State of :func:`dadapt_adamw`: Adam's moments (the first scaled by the step size), the
    weighted gradient sum, the distance estimate ``estim_lr`` and its numerator (0-d), and the
    int32 step ``count``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.dadapt_adamw().init([torch.zeros(2)]).numerator_weighted
        tensor(0.)
    """

    exp_avg: Any
    exp_avg_sq: Any
    grad_sum: Any
    estim_lr: torch.Tensor
    numerator_weighted: torch.Tensor
    count: torch.Tensor


def prodigy(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    beta3: Hyper | None = None,
    eps: Hyper = 1e-8,
    estim_lr0: Hyper = 1e-6,
    estim_lr_coef: Hyper = 1.0,
    weight_decay: Hyper = 0.0,
    safeguard_warmup: bool = False,
) -> GradientTransformation:
    """Prodigy (Mishchenko & Defazio, 2023): AdamW whose step size ``d`` adapts itself.

    Update rule, with ``x₀`` the initial parameters, ``t`` the step (from 1) and ``lr`` the
    schedule's value at ``t − 1``::

        dlr = d · lr · √(1 − b2ᵗ) / (1 − b1ᵗ)
        m ← b1 · m + (1 − b1) · d · g             v ← b2 · v + (1 − b2) · (d · g)²
        s ← b3 · s + (d / d₀) · c · g              c = dlr  (safeguard_warmup: d)
        n ← b3 · n + (d / d₀) · dlr · ⟨g, x₀ − x⟩
        d ← max(d, estim_lr_coef · n / ‖s‖₁)
        u = −weight_decay · dlr · x − dlr · m / (√v + d · eps)

    ``⟨·,·⟩`` and ``‖s‖₁`` run over the whole tree; ``b3`` defaults to ``√b2``. Use a schedule
    that treats 1 as its peak (the paper: linear decay to 0 after a 0–20% warmup). ``update``
    needs ``params``. ``d = estim_lr`` is ``0 / 0 = NaN`` after a first step whose gradient is
    zero everywhere, as in optax.

    Differences from PyTorch: ``torch.optim`` has no Prodigy. The ``prodigyopt`` package's
    ``Prodigy(lr, betas, beta3, eps, weight_decay, d0, d_coef, safeguard_warmup,
    use_bias_correction=True)`` is this with ``learning_rate``, ``estim_lr0`` and
    ``estim_lr_coef`` for ``lr``, ``d0`` and ``d_coef``: float64 trajectories agree to
    ``1e-10`` relative (measured with prodigyopt 1.1.2). Its default
    ``use_bias_correction=False`` leaves ``√(1 − b2ᵗ) / (1 − b1ᵗ)`` out of ``dlr``, which a
    schedule ``lr · (1 − b1ᵗ) / √(1 − b2ᵗ)`` (``t = count + 1``) restores; its
    ``decouple=False`` is ``chain(add_decayed_weights(wd), prodigy(...))``. With
    ``betas[0] = 0`` it steps with the updated ``d`` where optax uses the previous one (the
    steps on which ``d`` grows differ by ``d_new / d_old``). Not here: a finite ``growth_rate``
    (the default ``inf`` agrees), ``slice_p``, and skipping the step when every gradient is
    zero (here ``d`` becomes NaN, as in optax).

    Differences from optax: ``d`` and ``n`` are stored in the parameters' lowest float dtype
    widened to at least float32 (optax: the lowest dtype, bfloat16 for bfloat16 parameters);
    float16/bfloat16 leaves are computed in float32 and rounded once, and float16 leaves keep
    ``m``, ``v`` and ``s`` in float32 (``(d · g)²`` with ``d ≈ 1e-6`` is below float16's
    range: optax's float16 ``v`` stays 0 and its steps are ``m / (d · eps)``, far too long).
    Complex leaves are refused (optax's formulas do not define a complex Prodigy).

    Args:
        learning_rate: multiplies the adapted step: a number, a 0-d tensor or a schedule.
        betas: ``(b1, b2)``, Adam's moment decays, each in ``[0, 1)``.
        beta3: decay of ``s`` and ``n``, in ``[0, 1]``; ``None`` gives ``√b2``.
        eps: added to ``√v`` (scaled by ``d``), ``≥ 0``.
        estim_lr0: the initial (under-)estimate ``d₀``, ``> 0``.
        estim_lr_coef: multiplies each new estimate of ``d``, ``≥ 0``.
        weight_decay: decoupled weight decay (multiplied by ``dlr``), ``≥ 0``.
        safeguard_warmup: leave ``lr`` out of ``s`` (steadier during a warmup).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.prodigy()
        >>> params = [torch.tensor([1.0, -2.0])]
        >>> state = tx.init(params)
        >>> u, state = tx.update([torch.tensor([0.5, -1.0])], state, params)
        >>> u[0]
        tensor([-1.0000e-06,  1.0000e-06])
        >>> bool(state.estim_lr == 1e-6)
        True
    """
    b1, b2 = _check_betas(betas)
    if beta3 is None:
        beta3 = b2**0.5
    _ops.check_decay("beta3", beta3, allow_one=True)
    _check_common(learning_rate, eps, estim_lr0, weight_decay)
    _utils.check_finite_number("estim_lr_coef", estim_lr_coef, minimum=0.0)
    _ops.check_scalar_tensor("estim_lr_coef", estim_lr_coef)

    def init_fn(params: Any) -> ProdigyState:
        leaves = _params_leaves(params, "prodigy")
        sd = _state_dtype(leaves)
        device = _utils.default_device(params)
        return ProdigyState(
            exp_avg=_moments_like(params),
            exp_avg_sq=_moments_like(params),
            grad_sum=_moments_like(params),
            params0=_copy(params),
            estim_lr=_scalar(estim_lr0, sd, device),
            numerator_weighted=torch.zeros((), dtype=sd, device=device),
            count=_utils.zero_count(params),
        )

    def update_fn(
        updates: Any, state: ProdigyState, params: Any = None, **extra: Any
    ) -> tuple[Any, ProdigyState]:
        del extra
        if params is None:
            raise ValueError(scaling._NO_PARAMS.format(name="prodigy"))
        _refuse_complex(updates, "updates", "prodigy")
        names = ("params", "state.exp_avg", "state.exp_avg_sq", "state.grad_sum", "state.params0")
        trees = (params, state.exp_avg, state.exp_avg_sq, state.grad_sum, state.params0)
        constants = ("params", "state.params0")  # functions of the params only
        given, spec, s = _utils.flat(updates, dict(zip(names, trees)), constants)
        count = _utils.safe_increment(state.count)
        if not given:
            return updates, state._replace(count=count)
        ea, eas, sk = s["state.exp_avg"], s["state.exp_avg_sq"], s["state.grad_sum"]
        g = _operands(given, ea, eas, sk)
        x, x0 = _ops.cast_like(s["params"], g), _ops.cast_like(s["state.params0"], g)
        d, sd = state.estim_lr, state.estim_lr.dtype
        dlr = (d * _utils.resolve(learning_rate, state.count) * _bias(b1, b2, count, g)).to(sd)
        dg = _ops.mul(g, d)
        numerator_acum = _dot(g, _foreach.sub(x0, x), sd)
        new_ea = _ops.moment(dg, ea, b1)
        new_eas = _ops.moment_sq(dg, eas, b2)
        coef = (d if safeguard_warmup else dlr) / _on(estim_lr0, d)
        new_sk = _ops.add_scaled(_ops.mul(_ops.cast_like(sk, g), beta3), coef, dg)
        numerator = (
            beta3 * state.numerator_weighted + (d / _on(estim_lr0, d)) * dlr * numerator_acum
        )
        new_d = torch.maximum(d, estim_lr_coef * numerator / _abs_sum(new_sk, sd))
        denom = _ops.add_fresh(_ops.sqrt(new_eas), new_d * _on(eps, new_d))
        out = _ops.mul(list(_foreach.div(new_ea, denom)), -dlr)
        if not _ops.is_zero(weight_decay):
            out = _ops.add_scaled(out, -_on(weight_decay, dlr) * dlr, x)
        new = ProdigyState(
            *(
                tree.unflatten(spec, _ops.cast_like(t, like))
                for t, like in ((new_ea, ea), (new_eas, eas), (new_sk, sk))
            ),
            params0=_utils.retree(state.params0, spec, s["state.params0"]),
            estim_lr=new_d,
            numerator_weighted=numerator.to(sd),
            count=count,
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new

    return GradientTransformation(init_fn, update_fn)


def dadapt_adamw(
    learning_rate: ScalarOrSchedule = 1.0,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    estim_lr0: Hyper = 1e-6,
    weight_decay: Hyper = 0.0,
) -> GradientTransformation:
    """D-Adaptation AdamW (Defazio & Mishchenko, 2023): AdamW with a self-tuned step size.

    Update rule, with ``t`` the step (from 1), ``lr`` the schedule's value at ``t − 1``,
    ``β = √b2`` and ``v``, ``s`` the previous step's values in ``⟨g, s / (√v + eps)⟩``::

        dlr = d · lr · √(1 − b2ᵗ) / (1 − b1ᵗ)
        n ← β · n + (1 − β) · dlr · ⟨g, s / (√v + eps)⟩
        m ← b1 · m + (1 − b1) · dlr · g         v ← b2 · v + (1 − b2) · g²
        s ← β · s + (1 − β) · dlr · g
        d ← max(d, n / ((1 − β) · ‖s‖₁))
        u = −weight_decay · dlr · x − m / (√v + eps)

    ``⟨·,·⟩`` and ``‖s‖₁`` run over the whole tree. Use a schedule that treats 1 as its peak.
    ``update`` needs ``params``. A first step whose gradient is zero everywhere makes ``d``
    ``0 / 0 = NaN``, as in optax.

    Differences from PyTorch: ``torch.optim`` has no D-Adaptation. The ``dadaptation``
    package's ``DAdaptAdam(lr, betas, eps, weight_decay, d0, decouple=True,
    use_bias_correction=True)`` is this with ``learning_rate`` and ``estim_lr0`` for ``lr``
    and ``d0``: float64 trajectories agree to ``1e-10`` relative (measured with dadaptation
    3.2). Its defaults differ: ``use_bias_correction=False`` leaves ``√(1 − b2ᵗ) / (1 − b1ᵗ)``
    out of ``dlr`` (a schedule ``lr · (1 − b1ᵗ) / √(1 − b2ᵗ)``, ``t = count + 1``, restores
    it) and ``decouple=False`` is the coupled ``chain(add_decayed_weights(wd),
    dadapt_adamw(...))``. Not here: a finite ``growth_rate`` (the default ``inf`` agrees),
    ``layer_scale``, and skipping the step when every gradient is zero (here ``d`` becomes
    NaN, as in optax).

    Differences from optax: as :func:`prodigy` (float32-or-wider scalars, half-precision leaves
    computed in float32, float16 leaves' moments kept in float32, complex leaves refused).

    Args:
        learning_rate: multiplies the adapted step: a number, a 0-d tensor or a schedule.
        betas: ``(b1, b2)``, Adam's moment decays, each in ``[0, 1)``.
        eps: added to ``√v``, ``≥ 0``.
        estim_lr0: the initial (under-)estimate ``d₀``, ``> 0``.
        weight_decay: decoupled weight decay (multiplied by ``dlr``), ``≥ 0``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.dadapt_adamw()
        >>> params = [torch.tensor([1.0, -2.0])]
        >>> u, state = tx.update([torch.tensor([0.5, -1.0])], tx.init(params), params)
        >>> u[0]
        tensor([-1.0000e-06,  1.0000e-06])
    """
    b1, b2 = _check_betas(betas)
    _check_common(learning_rate, eps, estim_lr0, weight_decay)

    def init_fn(params: Any) -> DAdaptAdamWState:
        sd = _state_dtype(_params_leaves(params, "dadapt_adamw"))
        device = _utils.default_device(params)
        return DAdaptAdamWState(
            exp_avg=_moments_like(params),
            exp_avg_sq=_moments_like(params),
            grad_sum=_moments_like(params),
            estim_lr=_scalar(estim_lr0, sd, device),
            numerator_weighted=torch.zeros((), dtype=sd, device=device),
            count=_utils.zero_count(params),
        )

    def update_fn(
        updates: Any, state: DAdaptAdamWState, params: Any = None, **extra: Any
    ) -> tuple[Any, DAdaptAdamWState]:
        del extra
        if params is None:
            raise ValueError(scaling._NO_PARAMS.format(name="dadapt_adamw"))
        _refuse_complex(updates, "updates", "dadapt_adamw")
        names = ("params", "state.exp_avg", "state.exp_avg_sq", "state.grad_sum")
        trees = (params, state.exp_avg, state.exp_avg_sq, state.grad_sum)
        given, spec, s = _utils.flat(updates, dict(zip(names, trees)))
        count = _utils.safe_increment(state.count)
        if not given:
            return updates, state._replace(count=count)
        ea, eas, sk = s["state.exp_avg"], s["state.exp_avg_sq"], s["state.grad_sum"]
        g = _operands(given, ea, eas, sk)
        sd = state.numerator_weighted.dtype
        sb2 = b2**0.5
        lr = _utils.resolve(learning_rate, state.count)
        dlr = (state.estim_lr * lr * _bias(b1, b2, count, g)).to(sd)
        old_denom = _ops.add_fresh(_ops.sqrt(_ops.cast_like(eas, g)), eps)
        numerator_acum = _dot(g, _foreach.div(_ops.cast_like(sk, g), old_denom), sd)
        dlr_g = _ops.mul(g, dlr)
        new_ea = _ops.moment(dlr_g, ea, b1)
        new_eas = _ops.moment_sq(g, eas, b2)
        new_sk = _ops.moment(dlr_g, sk, sb2)
        numerator = sb2 * state.numerator_weighted + (1 - sb2) * dlr * numerator_acum
        new_d = torch.maximum(state.estim_lr, numerator / ((1 - sb2) * _abs_sum(new_sk, sd)))
        denom = _ops.add_fresh(_ops.sqrt(new_eas), eps)
        out = _ops.mul(list(_foreach.div(new_ea, denom)), -1.0)
        if not _ops.is_zero(weight_decay):
            x = _ops.cast_like(s["params"], g)
            out = _ops.add_scaled(out, -_on(weight_decay, dlr) * dlr, x)
        new = DAdaptAdamWState(
            *(
                tree.unflatten(spec, _ops.cast_like(t, like))
                for t, like in ((new_ea, ea), (new_eas, eas), (new_sk, sk))
            ),
            estim_lr=new_d.to(sd),
            numerator_weighted=numerator.to(sd),
            count=count,
        )
        return tree.unflatten(spec, _ops.cast_like(out, given)), new

    return GradientTransformation(init_fn, update_fn)


# ---- Shared private helpers ----


def _check_betas(betas: Any) -> tuple[Hyper, Hyper]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (b1, b2), got {betas!r}")
    _ops.check_decay("betas[0]", betas[0])
    _ops.check_decay("betas[1]", betas[1])
    return betas[0], betas[1]


def _check_common(learning_rate: Any, eps: Any, estim_lr0: Any, weight_decay: Any) -> None:
    _utils.check_finite_number("learning_rate", learning_rate, minimum=0.0)
    _ops.check_scalar_tensor("learning_rate", learning_rate)
    for name, value in (("eps", eps), ("weight_decay", weight_decay)):
        _ops.refuse_schedule(name, value)
        _utils.check_finite_number(name, value, minimum=0.0)
        _ops.check_scalar_tensor(name, value)
    _ops.refuse_schedule("estim_lr0", estim_lr0)
    _utils.check_finite_number("estim_lr0", estim_lr0)
    _ops.check_scalar_tensor("estim_lr0", estim_lr0)
    if _utils.is_real_number(estim_lr0) and not estim_lr0 > 0:
        raise ValueError(f"estim_lr0 must be > 0, got {estim_lr0!r}")


def _bias(b1: Hyper, b2: Hyper, count: torch.Tensor, g: list[torch.Tensor]) -> torch.Tensor:
    """Adam's ``√(1 − b2ᵗ) / (1 − b1ᵗ)`` in float64 (float32 on MPS), on the leaves' device."""
    dtype = _ops.scalar_dtype(g)
    count = count.to(g[0].device)
    return torch.sqrt(1 - _utils.power(b2, count, dtype)) / (1 - _utils.power(b1, count, dtype))
