"""Backtracking (Armijo) line search as a gradient transformation (optax's
``scale_by_backtracking_linesearch``); the shared machinery is in :mod:`functrain.optim.linesearch`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.optim import _utils
from functrain.optim.base import GradientTransformation
from functrain.optim.linesearch import (
    _axpy,
    _check_args,
    _check_nonneg,
    _check_steps,
    _check_trees,
    _constants,
    _dot,
    _kwargs_for,
    _real_leaves,
    _scalar_dtype,
    _sel,
    _stop,
)

__all__ = ["ScaleByBacktrackingLinesearchState", "scale_by_backtracking_linesearch"]


class BacktrackingLinesearchInfo(NamedTuple):
    """Diagnostics of :func:`scale_by_backtracking_linesearch` (as optax's, not exported there).

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.scale_by_backtracking_linesearch(10)
        >>> tx.init([torch.zeros(1)]).info.num_linesearch_steps
        tensor(0, dtype=torch.int32)
    """

    num_linesearch_steps: torch.Tensor
    decrease_error: torch.Tensor


class ScaleByBacktrackingLinesearchState(NamedTuple):
    """State of :func:`scale_by_backtracking_linesearch`.

    ``learning_rate`` is the last accepted step size, ``value`` the objective there, ``grad``
    its gradient (only with ``store_grad=True``, else ``None``), ``info`` diagnostics.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_backtracking_linesearch(10).init([torch.zeros(1)]).value
        tensor(inf)
    """

    learning_rate: torch.Tensor
    value: torch.Tensor
    grad: Any
    info: BacktrackingLinesearchInfo


def scale_by_backtracking_linesearch(
    max_backtracking_steps: int,
    slope_rtol: float = 1e-4,
    decrease_factor: float = 0.8,
    increase_factor: float = 1.5,
    max_learning_rate: float = 1.0,
    atol: float = 0.0,
    rtol: float = 0.0,
    store_grad: bool = False,
    verbose: bool = False,
    *,
    early_exit: bool = False,
) -> GradientTransformation:
    """Backtracking line search for the Armijo sufficient-decrease condition (optax's).

    Starting from ``min(increase_factor · previous_lr, max_learning_rate)``, the step size ``η``
    is multiplied by ``decrease_factor`` until::

        f(w + η u) ≤ (1 + rtol) f(w) + η · slope_rtol · ⟨u, ∇f(w)⟩ + atol

    or ``max_backtracking_steps`` reductions were made; the update is ``η u`` (``0`` when every
    tried point gave a NaN/inf value). ``update`` needs ``params`` and the keywords ``value``
    (``f(w)``), ``grad`` (``∇f(w)``) and ``value_fn`` (``w ↦ f(w)``); further keywords are
    handed to ``value_fn`` when it takes them, else a TypeError.

    Differences from optax: the loop runs ``max_backtracking_steps + 1`` evaluations of
    ``value_fn`` every time and masks those after the search ended (same numbers, no host
    read); ``early_exit=True`` stops early by reading a flag on the host once per iteration.
    ``verbose`` prints nothing (optax prints failures from the device). The state's scalars
    (step size, value, ``decrease_error``) are at least float32 (optax: the first leaf's
    dtype, bfloat16 for bfloat16 params). Real parameters only.
    Not usable in :func:`functrain.train.make_train_step`, which passes only ``value=``.
    ``torch.optim`` has no stand-alone line search.

    Args:
        max_backtracking_steps: maximal number of step-size reductions (a Python int).
        slope_rtol: weight of the slope in the sufficient-decrease condition.
        decrease_factor: factor applied to the step size after a failed try, in ``(0, 1]``.
        increase_factor: factor applied to the previous step size to start a search.
        max_learning_rate: largest step size tried.
        atol: absolute tolerance of the sufficient-decrease condition.
        rtol: relative tolerance (of ``|f(w)|``) of the sufficient-decrease condition.
        store_grad: also compute and store ``∇f`` at the accepted point (for
            :func:`value_and_grad_from_state`); costs a gradient evaluation per iteration here.
        verbose: accepted for optax compatibility; prints nothing.
        early_exit: stop the loop as soon as the search is over (a host read per iteration).

    Example:
        >>> import torch, functrain as ft
        >>> f = lambda p: (p[0] ** 2).sum()
        >>> tx = ft.chain(ft.sgd(1.0), ft.scale_by_backtracking_linesearch(15))
        >>> params = [torch.tensor([1.0, -2.0])]
        >>> state = tx.init(params)
        >>> for _ in range(3):
        ...     grad, value = torch.func.grad_and_value(f)(params)
        ...     u, state = tx.update(grad, state, params, value=value, grad=grad, value_fn=f)
        ...     params = ft.apply_updates(params, u)
        >>> params, state[1].learning_rate
        ([tensor([-0.2160,  0.4320])], tensor(0.8000))
    """
    _check_steps("max_backtracking_steps", max_backtracking_steps)
    for name, v in (("slope_rtol", slope_rtol), ("atol", atol), ("rtol", rtol)):
        _check_nonneg(name, v)
    for name, v in (("increase_factor", increase_factor), ("max_learning_rate", max_learning_rate)):
        _check_nonneg(name, v)
    _utils.check_finite_number("decrease_factor", decrease_factor)
    if not isinstance(decrease_factor, torch.Tensor) and not 0 < decrease_factor <= 1:
        raise ValueError(f"decrease_factor must be in (0, 1], got {decrease_factor!r}")
    who = "scale_by_backtracking_linesearch"

    def init_fn(params: Any) -> ScaleByBacktrackingLinesearchState:
        leaves, spec = tree.flatten(params)
        dtype, dev = _scalar_dtype(leaves), _utils.default_device(params)
        grad = tree.unflatten(spec, [torch.zeros_like(x) for x in leaves]) if store_grad else None
        inf = torch.full((), float("inf"), dtype=dtype, device=dev)
        return ScaleByBacktrackingLinesearchState(
            learning_rate=torch.ones((), dtype=dtype, device=dev),
            value=inf,
            grad=grad,
            info=BacktrackingLinesearchInfo(_utils.zero_count(params), inf),
        )

    def update_fn(
        updates: Any,
        state: ScaleByBacktrackingLinesearchState,
        params: Any = None,
        *,
        value: Any = None,
        grad: Any = None,
        value_fn: Callable[..., Any] | None = None,
        **extra: Any,
    ) -> tuple[Any, ScaleByBacktrackingLinesearchState]:
        _check_args(params, value, grad, value_fn, who)
        kw = _kwargs_for(value_fn, extra, who)
        u, spec = _real_leaves("updates", updates)
        p, pspec = _real_leaves("params", params)
        _check_trees(updates, params, grad)
        g = tree.flatten(grad)[0]
        p, value = _constants(u, g, p, value)
        dtype = state.learning_rate.dtype
        value = torch.as_tensor(value, dtype=dtype, device=state.learning_rate.device)
        slope = _dot(u, g, dtype)
        lr = (increase_factor * state.learning_rate).clamp_max(max_learning_rate).to(dtype)
        new_value, err = value, torch.full_like(value, float("inf"))
        steps = torch.zeros_like(state.info.num_linesearch_steps)
        new_grad = [torch.zeros_like(x) for x in p] if store_grad else None
        for i in range(max_backtracking_steps + 1):
            active = ~(err <= atol)
            cand_lr = lr * decrease_factor if i > 0 else lr
            trial = tree.unflatten(pspec, _axpy(p, cand_lr, u))
            if store_grad:
                tg, tv = torch.func.grad_and_value(lambda q: value_fn(q, **kw))(trial)
                tg = [x.to(y.dtype) for x, y in zip(tree.flatten(tg)[0], p)]
            else:
                tv = value_fn(trial, **kw)
            tv = torch.as_tensor(tv).to(dtype)
            terr = tv - (1.0 + rtol) * value - cand_lr * slope_rtol * slope
            terr = torch.where(torch.isnan(terr), torch.inf, terr).clamp_min(0.0)
            if store_grad:
                final = active & ((terr <= atol) | (i == max_backtracking_steps))
                new_grad = _sel(final, tg, new_grad)
            lr, new_value, err = (
                _sel(active, cand_lr, lr),
                _sel(active, tv, new_value),
                _sel(active, terr, err),
            )
            steps = torch.where(active, steps + 1, steps)
            if _stop(early_exit, err <= atol):
                break
        lr = torch.where(torch.isinf(err), torch.zeros_like(lr), lr)
        out = tree.unflatten(spec, [(lr * x).to(x.dtype) for x in u])
        return out, ScaleByBacktrackingLinesearchState(
            learning_rate=lr,
            value=new_value,
            grad=tree.unflatten(pspec, new_grad) if store_grad else None,
            info=BacktrackingLinesearchInfo(steps, err),
        )

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- zoom
