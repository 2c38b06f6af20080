"""Line searches (backtracking Armijo, zoom strong-Wolfe) as gradient transformations.

Both follow optax 0.2.8: ``update(updates, state, params, *, value, grad, value_fn, **kw)``
scales the direction ``updates`` by a step size found by evaluating ``value_fn`` along it.

optax loops with ``jax.lax.while_loop`` (a data-dependent number of iterations). Here the loop
always runs its maximal number of iterations and freezes the search state with ``torch.where``
once optax's loop would have stopped: the same numbers, no host read, one graph under
``torch.compile(fullgraph=True)``, at the cost of evaluating ``value_fn`` (and its gradient for
the zoom search) on every iteration. ``early_exit=True`` stops as soon as the search is over, by
reading the "done" flag on the host once per iteration (eager only; ignored while compiling).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from functrain import _foreach, tree
from functrain.optim import _utils

__all__ = ["value_and_grad_from_state"]


def _scalar_dtype(leaves: list[torch.Tensor]) -> torch.dtype:
    """optax's value dtype (the real dtype of the first leaf), at least float32."""
    if not leaves:
        return torch.float32
    real = leaves[0].real.dtype if leaves[0].is_complex() else leaves[0].dtype
    return torch.promote_types(real, torch.float32) if real.is_floating_point else torch.float32


def _real_leaves(name: str, t: Any) -> tuple[list[torch.Tensor], Any]:
    leaves, spec = tree.flatten(t)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
            got = leaf.dtype if isinstance(leaf, torch.Tensor) else type(leaf).__name__
            raise TypeError(
                f"{name} leaf {i} must be a real floating-point tensor, got {got}: the line "
                "searches do not take complex parameters (PyTorch's complex gradient is the "
                "conjugate of JAX's, so optax's formulas do not carry over)"
            )
    return leaves, spec


def _dot(a: list[torch.Tensor], b: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = torch.zeros((), dtype=dtype, device=a[0].device) if a else torch.zeros((), dtype=dtype)
    for x, y in zip(a, b):
        out = out + torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))
    return out


def _axpy(p: list[torch.Tensor], t: torch.Tensor, u: list[torch.Tensor]) -> list[torch.Tensor]:
    """``p + t * u``, leaf by leaf, in each ``p`` leaf's dtype (optax's add_scale + cast)."""
    return [(x + t * y).to(x.dtype) for x, y in zip(p, u)]


def _kwargs_for(value_fn: Callable[..., Any], extra: dict[str, Any], who: str) -> dict[str, Any]:
    """The ``extra`` keywords ``value_fn`` takes; any other keyword is a TypeError, as optax."""
    code = getattr(getattr(value_fn, "__func__", value_fn), "__code__", None)
    if code is not None and not isinstance(value_fn, type):
        n = code.co_argcount + code.co_kwonlyargcount
        names = set(code.co_varnames[:n])
        if code.co_flags & inspect.CO_VARKEYWORDS:
            return dict(extra)
    else:
        params = inspect.signature(value_fn).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return dict(extra)
        names = {p.name for p in params}
    unused = sorted(k for k in extra if k not in names)
    if unused:
        raise TypeError(
            f"Unexpected keyword arguments passed to `{who}.update`: {unused} are not "
            "parameters of `value_fn`; pass only keywords that value_fn accepts"
        )
    return dict(extra)


def _check_args(params: Any, value: Any, grad: Any, value_fn: Any, who: str) -> None:
    missing = [
        n for n, v in (("params", params), ("value", value), ("value_fn", value_fn)) if v is None
    ]
    if grad is None:
        missing.append("grad")
    if missing:
        raise TypeError(
            f"{who}.update needs params and the keyword arguments value=, grad= and value_fn= "
            f"(missing: {', '.join(missing)}); make_train_step passes only value=, so drive "
            "the line search from a loop of your own (see the docstring's example)"
        )


def _check_trees(updates: Any, params: Any, grad: Any) -> None:
    """``params`` and ``grad`` must have the structure and shapes of ``updates`` (optax's tree
    maps refuse a mismatch); the leaf-wise zips would otherwise drop leaves silently, e.g. take
    the slope ``⟨u, ∇f⟩`` over part of a ``grad`` with a missing leaf."""
    _utils.flat(updates, {"params": params, "grad": grad})


def _constants(
    u: list[torch.Tensor], g: list[torch.Tensor], p: list[torch.Tensor], value: Any
) -> tuple[list[torch.Tensor], Any]:
    r"""The params ``p`` and the loss ``value`` a line search starts from, detached unless
    the update is :func:`functrain._foreach.differentiated` (a ``torch.func`` transform,
    tracked directions or gradients, tracked params that are not ``nn.Parameter``\ s): in a
    torch-style loop, ``value_fn`` evaluated at ``nn.Parameter``\ s and a ``value=`` loss
    with its forward graph kept graphs to the module's weights in the state (the value, the
    step size, the errors) and the updates. Under ``torch.func`` nothing changes (optax
    cannot differentiate its ``while_loop`` at all)."""
    if not torch.is_grad_enabled() or _foreach.differentiated([*u, *g], p):
        return p, value
    p = [x.detach() for x in p]
    return p, value.detach() if isinstance(value, torch.Tensor) else value


def _check_steps(name: str, n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(
            f"{name} must be a Python int (the loop runs that many iterations), got {n!r}"
        )
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")


def _check_nonneg(name: str, value: Any) -> None:
    _utils.check_finite_number(name, value, minimum=0.0)


def _stop(early_exit: bool, over: torch.Tensor) -> bool:
    # The documented host read of early_exit=True; never while compiling (fullgraph).
    return early_exit and not torch.compiler.is_compiling() and bool(over)


def _sel(c: torch.Tensor, a: Any, b: Any) -> Any:
    """``torch.where(c, a, b)`` on a scalar or leaf-wise on lists."""
    if isinstance(a, list):
        return [torch.where(c, x, y) for x, y in zip(a, b)]
    return torch.where(c, a, b)


# ----------------------------------------------------------------------------- backtracking


def _find(state: Any, key: str) -> list[Any]:
    """Every field named ``key`` in a nest of NamedTuples, tuples, lists and dicts."""
    found = []
    if hasattr(state, "_fields"):
        for name, v in zip(state._fields, state):
            if name == key:
                found.append(v)
            else:
                found.extend(_find(v, key))
    elif isinstance(state, (tuple, list)):
        for v in state:
            found.extend(_find(v, key))
    elif isinstance(state, dict):
        for k, v in state.items():
            found.extend([v] if k == key else _find(v, key))
    return found


def value_and_grad_from_state(value_fn: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """``value_and_grad`` of ``value_fn`` that reuses the ``value``/``grad`` a line search stored.

    The returned ``f(params, *args, state=opt_state, **kwargs)`` returns ``(value, grad)``:
    the ones found in ``opt_state`` (fields named ``value`` and ``grad``, e.g. in
    :class:`ScaleByZoomLinesearchState`) when that value is finite, else
    ``torch.func.grad_and_value(value_fn)(params, *args, **kwargs)`` (the first step, where the
    stored value is ``inf``). The stored pair is the objective at the params the last update
    led to, so the line search's final evaluation is not repeated.

    Difference from optax: in eager mode the choice reads the stored value's finiteness on the
    host (one device read per call, outside the optimizer's update); while compiling, both
    sides are computed and selected with ``torch.where`` (no read, no saving).

    Args:
        value_fn: the objective, ``value_fn(params, *args, **kwargs)`` → a 0-d tensor.

    Returns:
        ``f(params, *args, state, **kwargs) -> (value, grad)``.

    Example:
        >>> import torch, functrain as ft
        >>> f = lambda p: (p[0] ** 2).sum()
        >>> vg = ft.value_and_grad_from_state(f)
        >>> tx = ft.lbfgs()
        >>> params = [torch.tensor([1.0, 2.0])]
        >>> state = tx.init(params)
        >>> vg(params, state=state)
        (tensor(5.), [tensor([2., 4.])])
    """

    def value_and_grad(params: Any, *args: Any, state: Any, **kwargs: Any) -> tuple[Any, Any]:
        values, grads = _find(state, "value"), _find(state, "grad")
        values = [v for v in values if isinstance(v, torch.Tensor)]
        grads = [g for g in grads if g is not None]
        if not values or not grads:
            raise ValueError(
                "Value or gradient not found in the state: use an optimizer that stores them "
                "(e.g. scale_by_zoom_linesearch, or scale_by_backtracking_linesearch with "
                "store_grad=True)"
            )
        if len(values) > 1 or len(grads) > 1:
            raise ValueError("The state holds several fields named value/grad; keep one")
        value, grad = values[0], grads[0]
        ok = torch.isfinite(value)
        compute = torch.func.grad_and_value(lambda p: value_fn(p, *args, **kwargs), argnums=0)
        if not torch.compiler.is_compiling():
            if bool(ok):  # the documented host read
                return value, grad
            g, v = compute(params)
            return v, g
        g, v = compute(params)
        g_l, spec = tree.flatten(g)
        keep = tree.flatten(grad)[0]
        out = [torch.where(ok, a.to(b.dtype), b) for a, b in zip(keep, g_l)]
        return torch.where(ok, value.to(v.dtype), v), tree.unflatten(spec, out)

    return value_and_grad
