"""Adam and its family: transforms that rescale by moment estimates of the gradient.

Holds Adam (and NAdam), AMSGrad, Adamax and RAdam. Lion lives in :mod:`functrain.optim.lion` and
the shared arithmetic (bias corrections, operand dtypes, Adam's direction) in
``functrain.optim._adam_ops``; both are re-exported here, so existing imports keep working.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, fused
from functrain.optim._adam_ops import (
    Hyper,
    _bias,
    _check,
    _denominator,
    _direction,
    _mu_hat,
    _operands,
)
from functrain.optim.base import GradientTransformation
from functrain.optim.lion import ScaleByLionState, scale_by_lion

__all__ = [
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByLionState",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_lion",
    "scale_by_radam",
]


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam` (and adamax, radam): ``count``, moments ``mu``, ``nu``.

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.scale_by_adam().init({"w": torch.zeros(2)})
        >>> state.count, state.mu
        (tensor(0, dtype=torch.int32), {'w': tensor([0., 0.])})
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def scale_by_adam(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    mu_dtype: torch.dtype | None = None,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rescales updates by Adam's bias-corrected moment estimates (Kingma & Ba, 2014).

    Update rule, with ``t`` the step count after increment::

        mu ← b1 · mu + (1 − b1) · g
        nu ← b2 · nu + (1 − b2) · g²
        û = mu / (1 − b1ᵗ),  v̂ = nu / (1 − b2ᵗ)
        u ← û / (√(v̂ + eps_root) + eps)

    With ``nesterov=True`` (NAdam), ``û = b1·mu/(1 − b1ᵗ⁺¹) + (1 − b1)·g/(1 − b1ᵗ)``.

    As in ``torch.optim.Adam``, ``√v̂`` is formed as ``√nu / √(1 − b2ᵗ)`` (with ``eps_root``,
    ``√(nu + eps_root·(1 − b2ᵗ)) / √(1 − b2ᵗ)``, the same number), which does not overflow
    for huge gradients; float16 and bfloat16 leaves are computed in float32 and each result
    rounded once, as the fused kernels do (in float16, ``eps = 1e-8`` itself is 0).

    Differences from optax: the result keeps the updates' dtype; with a ``mu_dtype`` wider than
    the updates optax returns the wider dtype. The moments keep the dtypes they were initialised
    with (optax promotes them with the updates' dtype).

    Complex leaves use ``|g|² = g·conj(g)`` in ``nu``, as optax (``torch.optim.Adam`` instead
    treats the real and imaginary parts as separate parameters).

    Args:
        b1: decay of the first moment, in ``[0, 1)``.
        b2: decay of the second moment, in ``[0, 1)``.
        eps: added to the denominator outside the square root (as ``torch.optim.Adam``).
        eps_root: added inside the square root (useful when differentiating through Adam).
        mu_dtype: optional dtype of the first moment (e.g. ``torch.bfloat16``).
        nesterov: use Nesterov momentum (NAdam).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_adam()
        >>> params = {"w": torch.zeros(2)}
        >>> u, state = tx.update({"w": torch.tensor([0.5, -2.0])}, tx.init(params))
        >>> u["w"]  # the first Adam step is the sign of the gradient (up to eps)
        tensor([ 1.0000, -1.0000])
    """
    _check(b1, b2, eps, eps_root, mu_dtype)

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
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        # Each moment in at least its state's precision (a float64 mu_dtype of float32
        # gradients stays float64, as optax's promotion gives), half precision in float32.
        g_mu, g_nu = _operands(g, s["state.mu"]), _operands(g, s["state.nu"])
        mu = _ops.moment(g_mu, s["state.mu"], b1)
        nu = _ops.moment_sq(g_nu, s["state.nu"], b2)
        out = _direction(g_mu, mu, nu, count, b1, b2, eps, eps_root, nesterov)
        if g_mu is not g or g_nu is not g:  # one rounding of each wider result, as the kernels
            out = _ops.cast_like(out, g)
        # The moments keep their dtypes from init (the params' or mu_dtype): updates of another
        # dtype (bfloat16 gradients of float32 params) must not narrow the state.
        mu = _ops.cast_like(mu, s["state.mu"])
        nu = _ops.cast_like(nu, s["state.nu"])
        new_state = ScaleByAdamState(count, tree.unflatten(spec, mu), tree.unflatten(spec, nu))
        return tree.unflatten(spec, out), new_state

    fusion = fused.ScaleByAdam(b1, b2, eps, eps_root, mu_dtype, nesterov)
    return fused.register(GradientTransformation(init_fn, update_fn), fusion)


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`: ``count``, ``mu``, ``nu`` and the running ``nu_max``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_amsgrad().init([torch.zeros(1)]).nu_max
        [tensor([0.])]
    """

    count: torch.Tensor
    mu: Any
    nu: Any
    nu_max: Any


def scale_by_amsgrad(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    mu_dtype: torch.dtype | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
) -> GradientTransformation:
    """Rescales updates by AMSGrad (Reddi et al., 2018): Adam with a running max of ``v̂``.

    Update rule (``t`` the step count after increment)::

        mu, nu as in Adam;  û = mu / (1 − b1ᵗ);  v̂ = nu / (1 − b2ᵗ)
        nu_max ← max(nu_max, v̂);  u ← û / (√(nu_max + eps_root) + eps)

    ``bias_correction_mu`` / ``bias_correction_nu`` turn off the corrections (the paper's form).

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; the moments keep the dtypes they were initialised with.

    Differences from ``torch.optim.Adam(amsgrad=True)``: PyTorch keeps the maximum of the
    *uncorrected* ``nu`` and divides it by the *current* ``1 − b2ᵗ``; optax and functrain keep
    the maximum of the corrected ``v̂``. The two agree only while ``nu`` grows monotonically.

    Args:
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        mu_dtype: optional dtype in which the first moment is stored.
        bias_correction_mu: divide the first moment by ``1 − b1ᵗ``.
        bias_correction_nu: divide the second moment by ``1 − b2ᵗ`` before taking the maximum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_amsgrad()
        >>> params = [torch.zeros(2)]
        >>> u, state = tx.update([torch.tensor([2.0, -0.5])], tx.init(params))
        >>> u
        [tensor([ 1.0000, -1.0000])]
    """
    _check(b1, b2, eps, eps_root, mu_dtype)

    def init_fn(params: Any) -> ScaleByAmsgradState:
        return ScaleByAmsgradState(
            count=_utils.zero_count(params),
            mu=_ops.state_zeros(params, mu_dtype, "mu_dtype"),
            nu=tree.zeros_like(params),
            nu_max=tree.zeros_like(params),
        )

    def update_fn(
        updates: Any, state: ScaleByAmsgradState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAmsgradState]:
        del params, extra
        g, spec, s = _utils.flat(
            updates, {"state.mu": state.mu, "state.nu": state.nu, "state.nu_max": state.nu_max}
        )
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByAmsgradState(count, state.mu, state.nu, state.nu_max)
        dtype = _ops.scalar_dtype(g)
        wide = _operands(g, s["state.mu"], s["state.nu"], s["state.nu_max"])
        mu = _ops.moment(wide, s["state.mu"], b1)
        nu = _ops.moment_sq(wide, s["state.nu"], b2)
        mu_hat = _ops.div(mu, _bias(b1, count, dtype)) if bias_correction_mu else mu
        nu_eff = _ops.div(nu, _bias(b2, count, dtype)) if bias_correction_nu else nu
        nu_max = _ops.maximum(_ops.cast_like(s["state.nu_max"], wide), nu_eff)
        out = _ops.cast_like(_foreach.div(mu_hat, _denominator(nu_max, eps, eps_root)), g)
        unflat = lambda xs, like: tree.unflatten(spec, _ops.cast_like(xs, like))  # noqa: E731
        new_state = ScaleByAmsgradState(
            count,
            unflat(mu, s["state.mu"]),
            unflat(nu, s["state.nu"]),
            unflat(nu_max, s["state.nu_max"]),
        )
        return tree.unflatten(spec, out), new_state

    return GradientTransformation(init_fn, update_fn)


def scale_by_adamax(
    b1: Hyper = 0.9, b2: Hyper = 0.999, eps: Hyper = 1e-8
) -> GradientTransformation:
    """Rescales updates by Adamax, Adam's infinity-norm variant (Kingma & Ba, 2014, §7.1).

    Update rule (``t`` the step count after increment)::

        mu ← b1 · mu + (1 − b1) · g;  nu ← max(|g| + eps, b2 · nu)
        u ← (mu / (1 − b1ᵗ)) / nu

    Same maths as ``torch.optim.Adamax``. The state is a :class:`ScaleByAdamState`.

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; the moments keep the dtypes they were initialised with.

    Args:
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the infinity-norm estimate, in ``[0, 1)``.
        eps: added to ``|g|`` before the maximum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_adamax()
        >>> params = [torch.zeros(2)]
        >>> u, _ = tx.update([torch.tensor([2.0, -0.5])], tx.init(params))
        >>> u
        [tensor([ 1.0000, -1.0000])]
    """
    _check(b1, b2, eps)

    def init_fn(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=_utils.zero_count(params), mu=tree.zeros_like(params), nu=tree.zeros_like(params)
        )

    def update_fn(
        updates: Any, state: ScaleByAdamState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdamState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        wide = _operands(g, s["state.mu"], s["state.nu"])
        mu = _ops.moment(wide, s["state.mu"], b1)
        abs_g = list(_foreach.abs(wide))
        abs_g = _ops.add_fresh(abs_g, eps)
        nu = _ops.maximum(abs_g, _ops.mul(_ops.cast_like(s["state.nu"], wide), b2))
        mu_hat = _ops.div(mu, _bias(b1, count, _ops.scalar_dtype(g)))
        out = _ops.cast_like(_foreach.div(mu_hat, nu), g)
        mu, nu = _ops.cast_like(mu, s["state.mu"]), _ops.cast_like(nu, s["state.nu"])
        new_state = ScaleByAdamState(count, tree.unflatten(spec, mu), tree.unflatten(spec, nu))
        return tree.unflatten(spec, out), new_state

    return GradientTransformation(init_fn, update_fn)


def scale_by_radam(
    b1: Hyper = 0.9,
    b2: Hyper = 0.999,
    eps: Hyper = 1e-8,
    eps_root: Hyper = 0.0,
    threshold: Hyper = 5.0,
    *,
    nesterov: bool = False,
) -> GradientTransformation:
    """Rescales updates by Rectified Adam (Liu et al., 2020).

    Update rule (``t`` the step count after increment, ``ρ∞ = 2 / (1 − b2) − 1``)::

        mu, nu, û, v̂ as in Adam
        ρₜ = ρ∞ − 2 t b2ᵗ / (1 − b2ᵗ)
        r = √((ρₜ − 4)(ρₜ − 2) ρ∞ / ((ρ∞ − 4)(ρ∞ − 2) ρₜ))
        u ← r · û / (√(v̂ + eps_root) + eps)   if ρₜ ≥ threshold,   else u ← û

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; the moments keep the dtypes they were initialised with.

    Differences from ``torch.optim.RAdam``: PyTorch rectifies when ``ρₜ > 5`` (strictly; the two
    differ only if ``ρₜ`` is exactly 5) and adds ``eps`` to ``√nu`` *before* the bias
    correction, i.e. divides by ``√v̂ + eps / √(1 − b2ᵗ)``. With ``eps=0`` the trajectories
    coincide; with the default ``eps`` they differ by about ``eps / √v̂`` relatively.

    Differentiated through (``torch.func.grad``, meta-learning), an unrectified step has the
    derivative of ``û``; optax's is NaN there (the negative radicand of the branch not taken).

    Args:
        b1: decay of the first moment (the gradient average), in ``[0, 1)``.
        b2: decay of the second moment (the squared-gradient average), in ``[0, 1)``.
        eps: added to the denominator outside the square root.
        eps_root: added inside the square root (needed when differentiating through the update).
        threshold: rectify only when ``ρₜ ≥ threshold``.
        nesterov: use Nesterov momentum.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_radam()
        >>> params = [torch.zeros(1)]
        >>> u, _ = tx.update([torch.tensor([0.5])], tx.init(params))
        >>> u  # early steps are un-rectified momentum SGD
        [tensor([0.5000])]
    """
    _check(b1, b2, eps, eps_root)
    _utils.check_finite_number("threshold", threshold)
    _ops.check_scalar_tensor("threshold", threshold)

    def init_fn(params: Any) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=_utils.zero_count(params), mu=tree.zeros_like(params), nu=tree.zeros_like(params)
        )

    def update_fn(
        updates: Any, state: ScaleByAdamState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByAdamState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count)
        if not g:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        dtype = _ops.scalar_dtype(g)
        g, given = _operands(g, s["state.mu"], s["state.nu"]), g
        mu = _ops.moment(g, s["state.mu"], b1)
        nu = _ops.moment_sq(g, s["state.nu"], b2)
        t = count.to(dtype)
        b2_t = _utils.power(b2, count, dtype)
        # A Python b2 keeps ρ∞ in double precision, as optax (and torch) compute it.
        b2_ = b2.to(device=t.device, dtype=dtype) if isinstance(b2, torch.Tensor) else b2
        ro_inf = 2.0 / (1.0 - b2_) - 1.0
        ro = ro_inf - 2 * t * b2_t / (1 - b2_t)
        rectify = ro >= _ops.scalar(threshold, t)
        # Unrectified early steps have a negative radicand; its NaN root is discarded by the
        # ``where`` below, but 0·NaN made every derivative NaN (optax's too). A root of 1 there
        # (a 0-d double ``where``) keeps the values and gives the derivative of the branch taken.
        rad = (ro - 4) * (ro - 2) * ro_inf / ((ro_inf - 4) * (ro_inf - 2) * ro)
        r = torch.sqrt(torch.where(rectify, rad, torch.ones_like(rad)))
        rectify = rectify.to(g[0].device)
        mu_hat = _mu_hat(g, mu, b1, count, nesterov)
        nu_hat = _ops.div(nu, 1 - b2_t)
        adapted = _foreach.div(_ops.mul(mu_hat, r), _denominator(nu_hat, eps, eps_root))
        out = _ops.cast_like([torch.where(rectify, a, m) for a, m in zip(adapted, mu_hat)], given)
        mu, nu = _ops.cast_like(mu, s["state.mu"]), _ops.cast_like(nu, s["state.nu"])
        new_state = ScaleByAdamState(count, tree.unflatten(spec, mu), tree.unflatten(spec, nu))
        return tree.unflatten(spec, out), new_state

    return GradientTransformation(init_fn, update_fn)
