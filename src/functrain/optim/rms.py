"""RMS-style transforms: RMSProp's second moment (plain and centred) and Adagrad's sum.

Complex leaves accumulate ``|g|²`` (and a centred moment subtracts ``|mu|²``), as optax's
``abs_sq``: the statistics keep the leaves' complex dtype with zero imaginary parts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain._precision import widen_all
from functrain.optim import _ops, _utils
from functrain.optim.base import GradientTransformation

__all__ = [
    "ScaleByRStdDevState",
    "ScaleByRStdDevWithCountState",
    "ScaleByRmsState",
    "ScaleByRmsWithCountState",
    "ScaleByRssState",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_stddev",
]

Hyper = float | torch.Tensor


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms` without bias correction: the second moment ``nu``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_rms(initial_scale=1.0).init([torch.zeros(2)])
        ScaleByRmsState(nu=[tensor([1., 1.])])
    """

    nu: Any


class ScaleByRmsWithCountState(NamedTuple):
    """State of :func:`scale_by_rms` with ``bias_correction=True``: ``count`` and ``nu``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_rms(bias_correction=True).init([torch.zeros(1)]).count
        tensor(0, dtype=torch.int32)
    """

    count: torch.Tensor
    nu: Any


class ScaleByRStdDevState(NamedTuple):
    """State of :func:`scale_by_stddev` without bias correction: moments ``mu`` and ``nu``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_stddev().init([torch.zeros(1)])
        ScaleByRStdDevState(mu=[tensor([0.])], nu=[tensor([0.])])
    """

    mu: Any
    nu: Any


class ScaleByRStdDevWithCountState(NamedTuple):
    """State of :func:`scale_by_stddev` with ``bias_correction=True``: ``count``, ``mu``, ``nu``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_stddev(bias_correction=True).init([torch.zeros(1)]).count
        tensor(0, dtype=torch.int32)
    """

    count: torch.Tensor
    mu: Any
    nu: Any


def _scaled(
    g: list[torch.Tensor], var: list[torch.Tensor], eps: Hyper, eps_in_sqrt: bool
) -> list[torch.Tensor]:
    """``g / √(var + eps)`` or ``g / (√var + eps)``."""
    if eps_in_sqrt:
        denom = list(_foreach.sqrt(_ops.add(var, eps)))
    else:
        denom = _ops.add_fresh(_ops.sqrt(var), eps)
    return list(_foreach.div(g, denom))


def _check(decay: Any, eps: Any, initial_scale: Any, bias_correction: bool) -> None:
    _ops.check_decay("decay", decay, allow_one=True)
    # decay = 1 keeps nu constant (allowed), but its bias correction 1 − 1ᵗ is 0: every update
    # was nu / 0, NaN or inf (a tensor decay is not read here: that would sync the device).
    if bias_correction and not isinstance(decay, torch.Tensor) and decay == 1:
        raise ValueError("decay must be < 1 with bias_correction=True (1 − decayᵗ would be 0)")
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _utils.check_finite_number("initial_scale", initial_scale, minimum=0.0)


def _full_like(params: Any, value: Hyper) -> Any:
    if isinstance(value, torch.Tensor):
        return tree.map(lambda p: torch.zeros_like(p) + value.to(p.device, p.dtype), params)
    return tree.full_like(params, value)


def scale_by_rms(
    decay: Hyper = 0.9,
    eps: Hyper = 1e-8,
    initial_scale: Hyper = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    """Rescales updates by the root of an exponential moving average of their squares.

    Update rule::

        nu ← decay · nu + (1 − decay) · g²     (nu starts at initial_scale)
        ν̂ = nu / (1 − decayᵗ) if bias_correction else nu
        u ← g / √(ν̂ + eps)    (eps_in_sqrt=True, optax's default)
        u ← g / (√ν̂ + eps)    (eps_in_sqrt=False, as torch.optim.RMSprop)

    float16 and bfloat16 leaves are computed in float32 and rounded once, as in
    :func:`scale_by_adam`; ``nu`` keeps the dtype it was initialised with (in float16,
    ``eps = 1e-8`` is 0 and ``(1 − decay) · g²`` of a gradient below about ``5e-4`` is 0, so
    such a gradient's update was ``g / 0``).

    Args:
        decay: the moving-average coefficient (PyTorch's ``alpha``).
        eps: numerical-stability term; see ``eps_in_sqrt``.
        initial_scale: initial value of ``nu`` (PyTorch uses 0, TF1 uses 1).
        eps_in_sqrt: put ``eps`` inside the square root (optax default) or outside (PyTorch).
        bias_correction: divide ``nu`` by ``1 − decayᵗ`` (the state then also counts steps).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_rms(decay=0.75, eps=0.0)
        >>> params = [torch.zeros(1)]
        >>> tx.update([torch.tensor([2.0])], tx.init(params))[0]  # 2 / sqrt(0.25 * 4)
        [tensor([2.])]
    """
    _check(decay, eps, initial_scale, bias_correction)

    def init_fn(params: Any) -> ScaleByRmsState | ScaleByRmsWithCountState:
        nu = _full_like(params, initial_scale)
        if bias_correction:
            return ScaleByRmsWithCountState(count=_utils.zero_count(params), nu=nu)
        return ScaleByRmsState(nu=nu)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.nu": state.nu})
        count = _utils.safe_increment(state.count) if bias_correction else None
        if g:
            x = widen_all(g)  # half precision in float32, rounded once (see the docstring)
            nu = _ops.moment_sq(x, s["state.nu"], decay)
            nu_hat = nu
            if bias_correction:
                nu_hat = _ops.div(nu, 1 - _utils.power(decay, count, _ops.scalar_dtype(x)))
            out = tree.unflatten(spec, _ops.cast_like(_scaled(x, nu_hat, eps, eps_in_sqrt), g))
            nu = tree.unflatten(spec, _ops.cast_like(nu, s["state.nu"]))
        else:
            out, nu = updates, state.nu
        if bias_correction:
            return out, ScaleByRmsWithCountState(count=count, nu=nu)
        return out, ScaleByRmsState(nu=nu)

    return GradientTransformation(init_fn, update_fn)


def scale_by_stddev(
    decay: Hyper = 0.9,
    eps: Hyper = 1e-8,
    initial_scale: Hyper = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> GradientTransformation:
    """Rescales updates by a centred RMS: the root of a moving estimate of their variance.

    Update rule::

        mu ← decay · mu + (1 − decay) · g
        nu ← decay · nu + (1 − decay) · g²     (nu starts at initial_scale)
        (optionally both divided by 1 − decayᵗ)
        u ← g / √(nu − mu² + eps)    or    g / (√(nu − mu²) + eps)   (eps_in_sqrt=False)

    ``eps_in_sqrt=False`` matches ``torch.optim.RMSprop(centered=True)``. float16 and bfloat16
    leaves are computed in float32 and rounded once, as in :func:`scale_by_rms`.

    Differences from optax: a variance ``nu − mu²`` that rounds below 0 is read as 0 (optax:
    NaN). At the first bias-corrected step it is ``g² − g²``, 0 up to rounding on either side,
    so optax's update there is NaN wherever the rounding fell below 0.

    Args:
        decay: the moving-average coefficient (PyTorch's ``alpha``).
        eps: numerical-stability term; see ``eps_in_sqrt``.
        initial_scale: initial value of the second moment (PyTorch uses 0, TF1 uses 1).
        eps_in_sqrt: ``eps`` inside the square root (optax default) or outside (``False``,
            PyTorch).
        bias_correction: divide the moment estimates by ``1 − decayᵗ``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_stddev(decay=0.5, eps=0.0)
        >>> params = [torch.zeros(1)]
        >>> tx.update([torch.tensor([2.0])], tx.init(params))[0]  # 2 / sqrt(2 - 1)
        [tensor([2.])]
    """
    _check(decay, eps, initial_scale, bias_correction)

    def init_fn(params: Any) -> ScaleByRStdDevState | ScaleByRStdDevWithCountState:
        mu, nu = tree.zeros_like(params), _full_like(params, initial_scale)
        if bias_correction:
            return ScaleByRStdDevWithCountState(count=_utils.zero_count(params), mu=mu, nu=nu)
        return ScaleByRStdDevState(mu=mu, nu=nu)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.mu": state.mu, "state.nu": state.nu})
        count = _utils.safe_increment(state.count) if bias_correction else None
        if g:
            x = widen_all(g)  # half precision in float32, rounded once (see the docstring)
            mu = _ops.moment(x, s["state.mu"], decay)
            nu = _ops.moment_sq(x, s["state.nu"], decay)
            mu_hat, nu_hat = mu, nu
            if bias_correction:
                bias = 1 - _utils.power(decay, count, _ops.scalar_dtype(x))
                mu_hat, nu_hat = _ops.div(mu, bias), _ops.div(nu, bias)
            var = _ops.sub_abs_sq(nu_hat, mu_hat)  # nu − |mu|², as optax's abs_sq
            # A variance is >= 0, but nu − mu² of (nearly) equal terms rounds to either side of
            # 0: at the first bias-corrected step (ν̂ = g², μ̂ = g) some entries came out a few
            # ulps below 0 and their updates NaN (or, above −eps, set by that rounding). Only
            # such negative entries change: to 0, the exact variance there.
            var = [v if v.is_complex() else torch.clamp_min(v, 0.0) for v in var]
            out = tree.unflatten(spec, _ops.cast_like(_scaled(x, var, eps, eps_in_sqrt), g))
            mu = tree.unflatten(spec, _ops.cast_like(mu, s["state.mu"]))
            nu = tree.unflatten(spec, _ops.cast_like(nu, s["state.nu"]))
        else:
            out, mu, nu = updates, state.mu, state.nu
        if bias_correction:
            return out, ScaleByRStdDevWithCountState(count=count, mu=mu, nu=nu)
        return out, ScaleByRStdDevState(mu=mu, nu=nu)

    return GradientTransformation(init_fn, update_fn)


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`: the running ``sum_of_squares`` of the updates.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_rss().init([torch.zeros(2)])
        ScaleByRssState(sum_of_squares=[tensor([0.1000, 0.1000])])
    """

    sum_of_squares: Any


def scale_by_rss(
    initial_accumulator_value: Hyper = 0.1, eps: Hyper = 1e-7
) -> GradientTransformation:
    """Rescales updates by the root of the sum of all squared updates so far (Adagrad).

    Update rule::

        s ← s + g²     (s starts at initial_accumulator_value)
        u ← g / √(s + eps)   where s > 0, else 0

    Differences from ``torch.optim.Adagrad``: PyTorch divides by ``√s + eps`` (eps outside the
    root) and starts ``s`` at 0 by default; with ``eps=0`` and the same initial value the two
    coincide.

    Args:
        initial_accumulator_value: initial value of the sum of squares.
        eps: added inside the square root.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
        >>> params = [torch.zeros(2)]
        >>> tx.update([torch.tensor([3.0, 0.0])], tx.init(params))[0]
        [tensor([1., 0.])]
    """
    _utils.check_finite_number("initial_accumulator_value", initial_accumulator_value, minimum=0.0)
    _utils.check_finite_number("eps", eps, minimum=0.0)

    def init_fn(params: Any) -> ScaleByRssState:
        return ScaleByRssState(sum_of_squares=_full_like(params, initial_accumulator_value))

    def update_fn(
        updates: Any, state: ScaleByRssState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByRssState]:
        del params, extra
        g, spec, s = _utils.flat(updates, {"state.sum_of_squares": state.sum_of_squares})
        if not g:
            return updates, state
        total = _ops.add_abs_sq(_ops.cast_like(s["state.sum_of_squares"], g), g)
        scaled = _scaled(g, total, eps, eps_in_sqrt=True)
        # ``.real``: a complex leaf's sum holds |g|² with a zero imaginary part.
        out = [torch.where(t.real > 0, x, torch.zeros_like(x)) for t, x in zip(total, scaled)]
        new = ScaleByRssState(
            tree.unflatten(spec, _ops.cast_like(total, s["state.sum_of_squares"]))
        )
        return tree.unflatten(spec, out), new

    return GradientTransformation(init_fn, update_fn)
