"""Adafactor's factored second-moment estimate (Shazeer & Stern, 2018)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _ops, _utils
from functrain.optim.base import GradientTransformation

__all__ = [
    "FactoredState",
    "scale_by_factored_rms",
]


def _decay_rate_pow(i: torch.Tensor, exponent: float = 0.8) -> torch.Tensor:
    """Adafactor's second-moment decay schedule ``1 − (i + 1)^(−exponent)``."""
    t = i.to(torch.float32) + 1.0
    return 1.0 - t ** (-exponent)


def _factored_dims(
    shape: tuple[int, ...], factored: bool, min_dim_size_to_factor: int
) -> tuple[int, int] | None:
    """The two largest axes ``(second largest, largest)`` to factor over, or ``None``."""
    if not factored or len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: shape[d])  # stable, as numpy's argsort here
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return order[-2], order[-1]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least float32 (optax keeps the params' dtype: bfloat16 statistics of bfloat16
    # params would round (1 − β̂)·g² away against β̂·v after a few steps). Complex params keep
    # their complex dtype (complex64 at least), as optax's.
    return torch.promote_types(dtype, torch.float32)


class FactoredState(NamedTuple):
    """State of :func:`scale_by_factored_rms`.

    ``v_row``/``v_col`` hold the factored statistics of factored leaves (``(1,)`` placeholders
    elsewhere) and ``v`` the full statistics of the other leaves (``(1,)`` placeholders for
    factored ones), as in optax.

    Example:
        >>> import torch, functrain as ft
        >>> state = ft.scale_by_factored_rms().init({"b": torch.zeros(3)})
        >>> state.v["b"], state.v_row["b"]
        (tensor([0., 0., 0.]), tensor([0.]))
    """

    count: torch.Tensor
    v_row: Any
    v_col: Any
    v: Any


def scale_by_factored_rms(
    factored: bool = True,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30,
    decay_rate_fn: Callable[[torch.Tensor, float], Any] = _decay_rate_pow,
) -> GradientTransformation:
    """Scales updates by a factored estimate of their RMS, as in Adafactor.

    Update rule, with ``β̂ = decay_rate_fn(count − step_offset, decay_rate)`` (count before
    increment; by default ``1 − (count + 1)^(−decay_rate)``) and ``G = g² + epsilon``:

    - a leaf whose two largest dimensions ``d1 ≤ d0`` both have at least
      ``min_dim_size_to_factor`` elements keeps row and column statistics::

          v_row ← β̂ v_row + (1 − β̂) mean(G, axis=d0)
          v_col ← β̂ v_col + (1 − β̂) mean(G, axis=d1)
          u ← g · (v_row / mean(v_row))^(−½) · v_col^(−½)    (broadcast back)

    - any other leaf keeps full statistics: ``v ← β̂ v + (1 − β̂) G``, ``u ← g · v^(−½)``.

    The statistics are float32 (float64 for float64 params) and keep those dtypes whatever
    the gradients' dtype; the update has the gradients' dtype. Complex leaves use ``|g|²``
    (optax's ``abs_sq``), the statistics stored in the params' complex dtype with zero
    imaginary parts.

    Differences from optax: optax stores the statistics in the params' dtype, so bfloat16 or
    float16 params get bfloat16 or float16 statistics there and float32 ones here.

    Differences from ``torch.optim.Adafactor``: PyTorch's variant factors over the last two
    dimensions, uses a relative step size and a different ``eps`` placement; this is optax's
    (and the paper's) algorithm.

    Args:
        factored: whether to factor the statistics of large matrices at all.
        decay_rate: exponent of the default decay schedule.
        step_offset: subtracted from the count (for fine-tuning restarts).
        min_dim_size_to_factor: minimum size of both factored dimensions.
        epsilon: added to the squared gradient.
        decay_rate_fn: ``(step, decay_rate) -> β̂``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_factored_rms(min_dim_size_to_factor=2)
        >>> params = {"w": torch.zeros(2, 3)}
        >>> state = tx.init(params)
        >>> tuple(state.v_row["w"].shape), tuple(state.v_col["w"].shape)
        ((2,), (3,))
        >>> u, state = tx.update({"w": torch.ones(2, 3)}, state, params)
        >>> u["w"]
        tensor([[1., 1., 1.],
                [1., 1., 1.]])
    """
    _utils.check_finite_number("decay_rate", decay_rate)
    _utils.check_finite_number("epsilon", epsilon, minimum=0.0)
    if not callable(decay_rate_fn):
        raise TypeError(f"decay_rate_fn must be callable, got {decay_rate_fn!r}")

    def _placeholder(like: torch.Tensor) -> torch.Tensor:
        """A ``(1,)`` zero; ``like`` is a parameter at init, the old placeholder afterwards."""
        return torch.zeros((1,), dtype=_stat_dtype(like.dtype), device=like.device)

    def _init_leaf(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = _factored_dims(tuple(p.shape), factored, min_dim_size_to_factor)
        dtype = _stat_dtype(p.dtype)
        if dims is None:
            return (
                _placeholder(p),
                _placeholder(p),
                torch.zeros(p.shape, dtype=dtype, device=p.device),
            )
        d1, d0 = dims
        row = [s for i, s in enumerate(p.shape) if i != d0]
        col = [s for i, s in enumerate(p.shape) if i != d1]
        return (
            torch.zeros(row, dtype=dtype, device=p.device),
            torch.zeros(col, dtype=dtype, device=p.device),
            _placeholder(p),
        )

    def init_fn(params: Any) -> FactoredState:
        leaves, spec = tree.flatten(params)
        stats = [_init_leaf(p) for p in leaves]
        return FactoredState(
            count=_utils.zero_count(params),
            v_row=tree.unflatten(spec, [s[0] for s in stats]),
            v_col=tree.unflatten(spec, [s[1] for s in stats]),
            v=tree.unflatten(spec, [s[2] for s in stats]),
        )

    def _update_leaf(
        g: torch.Tensor, v_row: torch.Tensor, v_col: torch.Tensor, v: torch.Tensor, beta: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = _factored_dims(tuple(g.shape), factored, min_dim_size_to_factor)
        # The statistics keep their init dtypes (from the params): gradients of another dtype
        # (bfloat16 gradients of float64 params) must neither narrow nor widen the state. The
        # arithmetic is in the wider of the two; the update uses the statistics as stored and
        # is rounded once to the gradients' dtype, as optax (which casts to the params' dtype).
        stat = v if dims is None else v_row
        dtype = torch.promote_types(_stat_dtype(g.dtype), stat.dtype)
        # Complex leaves (optax's abs_sq): the statistics are |g|², real numbers stored in the
        # params' complex dtype with zero imaginary parts; the arithmetic is in the real dtype.
        real = _ops.real_dtype(dtype)
        beta = beta.to(device=g.device, dtype=real) if isinstance(beta, torch.Tensor) else beta
        wide = g.to(dtype)
        grad_sqr = _ops.abs_sq(wide) + epsilon
        if dims is None:
            _check_shape(v, g.shape, "state.v")
            new_v = (beta * _real(v, real) + (1.0 - beta) * grad_sqr).to(v.dtype)
            u = wide * _real(new_v, real).rsqrt()
            return u.to(g.dtype), _placeholder(v_row), _placeholder(v_col), new_v
        d1, d0 = dims
        _check_shape(v_row, tuple(s for i, s in enumerate(g.shape) if i != d0), "state.v_row")
        _check_shape(v_col, tuple(s for i, s in enumerate(g.shape) if i != d1), "state.v_col")
        new_row = beta * _real(v_row, real) + (1.0 - beta) * grad_sqr.mean(dim=d0)
        new_col = beta * _real(v_col, real) + (1.0 - beta) * grad_sqr.mean(dim=d1)
        new_row, new_col = new_row.to(v_row.dtype), new_col.to(v_col.dtype)
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row = _real(new_row, real)
        row_factor = (row / row.mean(dim=reduced_d1, keepdim=True)).rsqrt()
        col_factor = _real(new_col, real).rsqrt()
        u = wide * row_factor.unsqueeze(d0) * col_factor.unsqueeze(d1)
        return u.to(g.dtype), new_row, new_col, _placeholder(v)

    def update_fn(
        updates: Any, state: FactoredState, params: Any = None, **extra: Any
    ) -> tuple[Any, FactoredState]:
        del params, extra
        paths, g, spec = tree.flatten_with_paths(updates)
        rows = tree.flatten_up_to(spec, state.v_row, ("updates", "state.v_row"), updates)
        cols = tree.flatten_up_to(spec, state.v_col, ("updates", "state.v_col"), updates)
        vs = tree.flatten_up_to(spec, state.v, ("updates", "state.v"), updates)
        beta = decay_rate_fn(state.count - step_offset, decay_rate)
        results = []
        for path, leaf, r, c, v in zip(paths, g, rows, cols, vs):
            if not (leaf.is_floating_point() or leaf.is_complex()):
                raise TypeError(
                    f"{tree.path_str(path, 'updates')} must be a floating-point or complex "
                    f"tensor, got {leaf.dtype}"
                )
            try:
                results.append(_update_leaf(leaf, r, c, v, beta))
            except _ShapeError as err:
                raise tree.TreeMismatchError(
                    f"{tree.path_str(path, 'updates')} shape {tuple(leaf.shape)}: "
                    f"{tree.path_str(path, err.args[0])} has shape {err.args[1]}, "
                    f"expected {err.args[2]}"
                ) from None
        new_state = FactoredState(
            count=_utils.safe_increment(state.count),
            v_row=tree.unflatten(spec, [x[1] for x in results]),
            v_col=tree.unflatten(spec, [x[2] for x in results]),
            v=tree.unflatten(spec, [x[3] for x in results]),
        )
        return tree.unflatten(spec, [x[0] for x in results]), new_state

    return GradientTransformation(init_fn, update_fn)


class _ShapeError(Exception):
    pass


def _real(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a real ``dtype`` tensor (the real part of a complex statistic, which has no
    imaginary part)."""
    return (x.real if x.is_complex() else x).to(dtype)


def _check_shape(t: torch.Tensor, expected: tuple[int, ...], name: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise _ShapeError(name, tuple(t.shape), tuple(expected))
