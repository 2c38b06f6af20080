"""Normalized and sign updates (``signum``, ``normalize_by_update_norm``, DoG) and the norm
and counter helpers optax exports (``global_norm``, ``safe_norm``, ``safe_increment``, …)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
from functrain.optim import _ops, _utils, accumulation, scaling
from functrain.optim._utils import Scalar, ScalarOrSchedule
from functrain.optim.base import EmptyState, GradientTransformation, chain

__all__ = [
    "ScaleByDistanceOverGradientsState",
    "global_norm",
    "normalize_by_update_norm",
    "safe_increment",
    "safe_int32_increment",
    "safe_norm",
    "safe_root_mean_squares",
    "scale_by_distance_over_gradients",
    "signum",
]


def signum(
    learning_rate: ScalarOrSchedule,
    beta: float | torch.Tensor = 0.9,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Signum (Bernstein et al., 2018): SGD on the sign of a gradient moving average.

    Update rule::

        m ← beta · m + (1 − beta) · g
        u = −lr · sign(m)

    No bias correction: it would not change the sign. The chain is optax's:
    ``ema(beta, debias=False)``, :func:`scale_by_sign`, :func:`scale_by_learning_rate`, so
    the state is ``(EmaState, EmptyState, …)``. ``torch.optim`` has no Signum.

    Args:
        learning_rate: the step size: a number, a 0-d tensor (read at every update) or a
            schedule of the step count.
        beta: decay of the moving average, in ``[0, 1]``.
        accumulator_dtype: optional floating dtype in which the average is stored.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.signum(0.1)
        >>> state = tx.init([torch.zeros(3)])
        >>> tx.update([torch.tensor([2.0, 0.0, -1e-3])], state)[0]
        [tensor([-0.1000,  0.0000,  0.1000])]
    """
    _ops.check_decay("beta", beta, allow_one=True)  # named here: ema's error says "decay"
    return chain(
        accumulation.ema(beta, debias=False, accumulator_dtype=accumulator_dtype),
        scaling.scale_by_sign(),
        scaling.scale_by_learning_rate(learning_rate),
    )


def normalize_by_update_norm(
    scale_factor: Scalar = 1.0, eps: Scalar = 1e-6
) -> GradientTransformation:
    """Divides the updates by their global L2 norm: ``u ← u · scale_factor / (‖u‖ + eps)``.

    Computed as optax does, ``u / ((‖u‖ + eps) / scale_factor)``; ``scale_factor=-1`` gives
    normalized gradient descent with step length about 1. The norm of float16/bfloat16
    updates is taken in float32 (as :func:`functrain.tree.norm`).

    Args:
        scale_factor: the norm of the result (up to ``eps``); a finite number or 0-d tensor.
        eps: added to the norm so that a zero update stays zero, ``≥ 0``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.normalize_by_update_norm(scale_factor=-1.0, eps=0.0)
        >>> tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(None))[0]
        {'w': tensor([-0.6000, -0.8000])}
    """
    _utils.check_finite_number("scale_factor", scale_factor)
    _utils.check_finite_number("eps", eps, minimum=0.0)

    def init_fn(params: Any) -> EmptyState:
        del params
        return EmptyState()

    def update_fn(
        updates: Any, state: EmptyState, params: Any = None, **extra: Any
    ) -> tuple[Any, EmptyState]:
        del params, extra
        g, spec, _ = _utils.flat(updates, {})
        if not g:
            return updates, state
        norm = tree.norm(g)  # float16/bfloat16 leaves: reduced in float32, rounded once
        denom = (norm.to(torch.promote_types(norm.dtype, torch.float32)) + eps) / scale_factor
        return tree.unflatten(spec, _ops.div(g, denom)), state

    return GradientTransformation(init_fn, update_fn)


class ScaleByDistanceOverGradientsState(NamedTuple):
    """State of :func:`scale_by_distance_over_gradients`, per leaf: the largest distance from
    the initial parameters so far (0-d), the gradients' running sum of squares (shape ``(1,)``,
    as optax) and the initial parameters.

    Example:
        >>> import torch, functrain as ft
        >>> s = ft.scale_by_distance_over_gradients(reps_rel=0.5).init([torch.tensor([3.0, 4.0])])
        >>> s.max_dist, s.grad_sum_of_squares
        ([tensor(3.)], [tensor([0.])])
    """

    max_dist: Any
    grad_sum_of_squares: Any
    init_params: Any


def _state_dtype(x: torch.Tensor, where: str) -> torch.dtype:
    """The dtype of a leaf's DoG scalars: at least float32 (half leaves' sums would round)."""
    if not x.is_floating_point():
        raise TypeError(
            f"scale_by_distance_over_gradients: {where} is {x.dtype}; it needs real "
            "floating-point leaves (optax's distances are not defined for complex ones)"
        )
    return torch.promote_types(x.dtype, torch.float32)


def scale_by_distance_over_gradients(
    reps_rel: Scalar = 1e-6,
    eps: Scalar = 1e-8,
    param_dtype: torch.dtype | None = torch.float32,
    global_scale: Scalar = 1.0,
) -> GradientTransformation:
    """Distance over Gradients, layer-wise (LDoG; Ivgi et al., 2023): a step size without tuning.

    Update rule, per leaf (each tensor is one "layer"), with ``x₀`` the initial parameters::

        d ← max(d, ‖x − x₀‖)          d₀ = reps_rel · (1 + ‖x₀‖)
        G ← G + ‖g‖²                  G₀ = 0
        u = global_scale · d / √(G + eps) · g

    Multiply by ``global_scale=-1`` (or chain ``scale(-1)``) for descent; the authors
    recommend averaging the iterates. ``update`` needs ``params``. ``torch.optim`` has no DoG.

    Differences from optax: the scalars ``d`` and ``G`` are stored in the leaf's dtype widened
    to at least float32 (optax: the leaf's dtype for ``d`` and the default float for ``G``);
    updates keep their dtype (optax's are promoted by a wider state); a 0-d leaf's update
    stays 0-d (optax's becomes shape ``(1,)``). Complex leaves are refused.

    Args:
        reps_rel: relative size of the first step, ``≥ 0`` (the paper: 1e-4 with batch norm,
            1e-6 otherwise).
        eps: added to ``G`` before the square root, ``≥ 0``.
        param_dtype: dtype in which the initial parameters are stored (``None``: the
            parameters' own). optax's default, float32, rounds float64 parameters.
        global_scale: multiplies the step, typically ``1`` or ``-1``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_distance_over_gradients(reps_rel=0.5, eps=0.0)
        >>> params = [torch.tensor([3.0, 4.0])]
        >>> tx.update([torch.tensor([0.0, 2.0])], tx.init(params), params)[0]
        [tensor([0., 3.])]
    """
    _utils.check_finite_number("reps_rel", reps_rel, minimum=0.0)
    _utils.check_finite_number("eps", eps, minimum=0.0)
    _utils.check_finite_number("global_scale", global_scale)
    _ops.check_dtype("param_dtype", param_dtype)
    if param_dtype is not None and param_dtype.is_complex:
        raise ValueError(f"param_dtype must be a real floating dtype, got {param_dtype}")

    def init_fn(params: Any) -> ScaleByDistanceOverGradientsState:
        paths, leaves, spec = tree.flatten_with_paths(params)
        wide = [_state_dtype(x, tree.path_str(p, "params")) for p, x in zip(paths, leaves)]
        # The initial point and its norm are constants unless differentiated (nn.Parameters
        # in a torch-style loop: no graph to the module's weights in the state).
        leaves = _foreach.constants([], leaves)
        norms = _foreach.norm([x.to(w) for x, w in zip(leaves, wide)]) if leaves else []
        dist = [reps_rel * (1 + n) for n in norms]
        sos = [torch.zeros(1, dtype=w, device=x.device) for x, w in zip(leaves, wide)]
        # A copy even when no cast is needed: the state must not alias the live parameters.
        init = [x.to(param_dtype or x.dtype, copy=True) for x in leaves]
        return ScaleByDistanceOverGradientsState(
            *(tree.unflatten(spec, v) for v in (dist, sos, init))
        )

    def update_fn(
        updates: Any, state: ScaleByDistanceOverGradientsState, params: Any = None, **extra: Any
    ) -> tuple[Any, ScaleByDistanceOverGradientsState]:
        del extra
        if params is None:
            raise ValueError(scaling._NO_PARAMS.format(name="scale_by_distance_over_gradients"))
        # The initial point is a function of the params only: a constant unless differentiated.
        constants = ("params", "state.init_params")
        g, spec, s = _utils.flat(
            updates, {"params": params, "state.init_params": state.init_params}, constants
        )
        if not g:
            return updates, state
        where = ("updates", "state")
        d = tree.flatten_up_to(spec, state.max_dist, where, updates)
        sos = tree.flatten_up_to(spec, state.grad_sum_of_squares, where, updates)
        diff = [
            p.to(x.dtype) - x0.to(x.dtype)
            for p, x0, x in zip(s["params"], s["state.init_params"], d)
        ]
        d = _foreach.maximum(d, _foreach.norm(diff))
        g_norm = _foreach.norm([x.to(w.dtype) for x, w in zip(g, d)])
        sos = _foreach.add(sos, _foreach.mul(g_norm, g_norm))
        eta = [global_scale * (dist / torch.sqrt(G + eps)).reshape(()) for dist, G in zip(d, sos)]
        out = [(x.to(e.dtype) * e).to(x.dtype) for x, e in zip(g, eta)]
        new = ScaleByDistanceOverGradientsState(
            tree.unflatten(spec, d),
            tree.unflatten(spec, sos),
            _utils.retree(state.init_params, spec, s["state.init_params"]),
        )
        return tree.unflatten(spec, out), new

    return GradientTransformation(init_fn, update_fn)


# ---- Numerics optax exports under these names ----


def global_norm(updates: Any) -> torch.Tensor:
    """The L2 norm of all leaves together: :func:`functrain.tree.norm` (optax's deprecated name).

    Unlike optax 0.2.8 it does not warn: the name stays for code ported from optax.

    Args:
        updates: a pytree of tensors.

    Returns:
        The norm, a 0-d tensor.

    Example:
        >>> import torch, functrain as ft
        >>> ft.global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])})
        tensor(5.)
    """
    return tree.norm(updates)


def _floating(name: str, x: Any) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{name} must be a floating-point (or complex) tensor, got {x.dtype}")
    return x


def safe_norm(
    x: torch.Tensor,
    min_norm: Scalar,
    ord: int | float | str | None = None,
    axis: int | tuple[int, ...] | None = None,
    keepdims: bool = False,
) -> torch.Tensor:
    """``max(torch.linalg.norm(x, ord, axis), min_norm)`` with a zero (not NaN) gradient where
    the norm is at most ``min_norm``, as optax's ``safe_norm``.

    The plain maximum's gradient is NaN at ``x = 0`` (the norm's derivative is 0/0 there, and
    autograd evaluates both branches); here the norm is recomputed on ones where it is small.

    Args:
        x: a floating-point tensor.
        min_norm: lower bound of the result.
        ord: the norm's order, as :func:`torch.linalg.norm` (``None``: the 2-norm of the
            flattened tensor when ``axis`` is ``None``).
        axis: a dimension, or two for a matrix norm (``None``: all).
        keepdims: keep the reduced dimensions with size one.

    Returns:
        The norm (a tensor with the reduced dimensions gone, or kept with ``keepdims``).

    Example:
        >>> import torch, functrain as ft
        >>> x = torch.zeros(3, requires_grad=True)
        >>> n = ft.safe_norm(x, 1e-3)
        >>> n, torch.autograd.grad(n, x)[0]
        (tensor(0.0010, grad_fn=<WhereBackward0>), tensor([0., 0., 0.]))
    """
    x = _floating("safe_norm: x", x)
    norm = torch.linalg.norm(x, ord=ord, dim=axis, keepdim=True)
    small = norm <= min_norm
    masked = torch.linalg.norm(torch.where(small, torch.ones_like(x), x), ord, axis, keepdims)
    return torch.where(small.reshape(masked.shape), min_norm, masked)


def safe_root_mean_squares(x: torch.Tensor, min_rms: Scalar) -> torch.Tensor:
    """``max(√mean(|x|²), min_rms)`` with a zero (not NaN) gradient where the RMS is at most
    ``min_rms``, as optax's ``safe_root_mean_squares``.

    Args:
        x: a floating-point or complex tensor (``|x|²`` for complex ones).
        min_rms: lower bound of the result.

    Returns:
        The bounded RMS, a 0-d tensor.

    Example:
        >>> import torch, functrain as ft
        >>> ft.safe_root_mean_squares(torch.tensor([3.0, -3.0]), 1.0)
        tensor(3.)
    """
    x = _floating("safe_root_mean_squares: x", x)
    small = torch.sqrt(torch.mean(_ops.abs_sq(x))) <= min_rms
    masked = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, min_rms, torch.sqrt(torch.mean(_ops.abs_sq(masked))))


def safe_increment(count: torch.Tensor | int | float) -> torch.Tensor:
    """``count + 1``, staying at the dtype's largest value instead of overflowing (optax's).

    Integer counts stop at ``torch.iinfo(dtype).max``, floating ones at
    ``torch.finfo(dtype).max``; optax's transforms keep int32 counts, which stop at
    ``2**31 - 1``. A Python int becomes an int64 tensor (jax: int32).

    Args:
        count: an integer or floating-point tensor (or number).

    Returns:
        ``count + 1`` in ``count``'s dtype, or ``count`` at that dtype's maximum.

    Raises:
        ValueError: a bool or complex ``count``.

    Example:
        >>> import torch, functrain as ft
        >>> ft.safe_increment(torch.tensor(2**31 - 1, dtype=torch.int32))
        tensor(2147483647, dtype=torch.int32)
    """
    count = torch.as_tensor(count)
    if count.dtype == torch.bool or count.is_complex():
        raise ValueError(
            f"safe_increment: cannot increment a count of dtype {count.dtype}; use an "
            "integer or floating-point count"
        )
    info = torch.finfo if count.is_floating_point() else torch.iinfo
    top = info(count.dtype).max
    return torch.where(count < top, count + 1, count)


safe_int32_increment = safe_increment
"""optax's older name of :func:`safe_increment` (the same function)."""
