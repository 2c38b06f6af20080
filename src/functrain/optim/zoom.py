"""Zoom (strong Wolfe) line search as a gradient transformation (optax's
``scale_by_zoom_linesearch``); the shared machinery is in :mod:`functrain.optim.linesearch`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from functrain import _foreach, tree
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

__all__ = ["ScaleByZoomLinesearchState", "ZoomLinesearchInfo", "scale_by_zoom_linesearch"]


class ZoomLinesearchInfo(NamedTuple):
    """Diagnostics of :func:`scale_by_zoom_linesearch`: iterations used and final errors.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_zoom_linesearch(5).init([torch.zeros(1)]).info.curvature_error
        tensor(inf)
    """

    num_linesearch_steps: torch.Tensor
    decrease_error: torch.Tensor
    curvature_error: torch.Tensor


class ScaleByZoomLinesearchState(NamedTuple):
    """State of :func:`scale_by_zoom_linesearch`: the accepted step size, the objective and its
    gradient at the new parameters (reused by :func:`value_and_grad_from_state`), diagnostics.

    Example:
        >>> import torch, functrain as ft
        >>> ft.scale_by_zoom_linesearch(5).init([torch.zeros(2)]).grad
        [tensor([0., 0.])]
    """

    learning_rate: torch.Tensor
    value: torch.Tensor
    grad: Any
    info: ZoomLinesearchInfo


# ----------------------------------------------------------------------------- helpers


def _cubicmin(a, fa, fpa, b, fb, c, fc):
    """Minimiser of the cubic through (a, fa) with slope fpa, (b, fb) and (c, fc); NaN if none."""
    if not _foreach.may_write(a, fa, fpa, b, fb, c, fc):
        return _cubicmin_tracked(a, fa, fpa, b, fb, c, fc)
    db, dc = b - a, c - a
    denom = (db * dc) ** 2 * (db - dc)
    v0, v1 = fb - fa - fpa * db, fc - fa - fpa * dc
    big_a = (dc**2 * v0 + (-(db**2)) * v1) / denom
    big_b = ((-(dc**3)) * v0 + db**3 * v1) / denom
    radical = big_b * big_b - 3.0 * big_a * fpa
    return a + (-big_b + torch.sqrt(radical)) / (3.0 * big_a)


def _safe(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    return torch.where(bad, torch.ones_like(x), x)


def _cubicmin_tracked(a, fa, fpa, b, fb, c, fc):
    """:func:`_cubicmin` under autograd: NaN where there is no minimiser, computed from safe
    operands there. A ``torch.where`` that drops the NaN candidate still multiplies its zero
    cotangent by the NaN derivative (0·∞), which made every derivative of the search NaN."""
    db, dc = b - a, c - a
    denom = (db * dc) ** 2 * (db - dc)
    bad = denom == 0
    denom = _safe(denom, bad)
    v0, v1 = fb - fa - fpa * db, fc - fa - fpa * dc
    big_a = (dc**2 * v0 + (-(db**2)) * v1) / denom
    big_b = ((-(dc**3)) * v0 + db**3 * v1) / denom
    radical = big_b * big_b - 3.0 * big_a * fpa
    bad = bad | (radical < 0) | (big_a == 0)
    out = a + (-big_b + torch.sqrt(_safe(radical, bad))) / (3.0 * _safe(big_a, bad))
    return torch.where(bad, torch.nan, out)


def _quadmin(a, fa, fpa, b, fb):
    """Minimiser of the quadratic through (a, fa) with slope fpa and (b, fb)."""
    db = b - a
    if not _foreach.may_write(a, fa, fpa, b, fb):  # safe operands, as _cubicmin_tracked
        bad = db == 0
        big_b = (fb - fa - fpa * db) / _safe(db**2, bad)
        bad = bad | (big_b == 0)
        return torch.where(bad, torch.nan, a - fpa / (2.0 * _safe(big_b, bad)))
    big_b = (fb - fa - fpa * db) / (db**2)
    return a - fpa / (2.0 * big_b)


_GRADS = ("grad", "safe_grad")


def scale_by_zoom_linesearch(
    max_linesearch_steps: int,
    max_learning_rate: float | None = None,
    tol: float = 0.0,
    increase_factor: float = 2.0,
    slope_rtol: float = 1e-4,
    curv_rtol: float = 0.9,
    approx_dec_rtol: float | None = 1e-6,
    stepsize_precision: float = 1e-5,
    initial_guess_strategy: str = "keep",
    verbose: bool = False,
    *,
    early_exit: bool = False,
) -> GradientTransformation:
    """Zoom line search for the strong Wolfe conditions (Nocedal & Wright, Alg. 3.5/3.6; optax's).

    Finds ``η`` along the direction ``u`` with sufficient decrease and small curvature::

        f(w + η u) ≤ f(w) + slope_rtol · η · ⟨u, ∇f(w)⟩
        |⟨u, ∇f(w + η u)⟩| ≤ curv_rtol · |⟨u, ∇f(w)⟩|

    (with Hager–Zhang's approximate decrease test when ``approx_dec_rtol`` is not ``None``):
    first growing the step by ``increase_factor`` until an interval holding such a step is
    found, then shrinking it with cubic, quadratic or bisection steps. After
    ``max_linesearch_steps`` tries it takes the best step with sufficient decrease seen, if any.
    The update is ``η u``; the state keeps ``f`` and ``∇f`` at the new parameters, which
    :func:`value_and_grad_from_state` hands to the next step.

    ``update`` needs ``params`` and the keywords ``value`` (``f(w)``), ``grad`` (``∇f(w)``)
    and ``value_fn`` (``w ↦ f(w)``, differentiated with ``torch.func.grad_and_value``);
    further keywords go to ``value_fn`` when it takes them, else a TypeError.

    Differences from optax: the loop runs all ``max_linesearch_steps`` iterations (one value
    and gradient evaluation each) and masks those after the search ended, so no host read;
    ``early_exit=True`` stops early by reading a flag on the host once per iteration (eager
    mode only). ``verbose`` prints nothing. The state's scalars (step size, value, the
    ``info`` errors) are at least float32 (optax keeps bfloat16 ones for bfloat16 params).
    Real parameters only. Not usable in
    :func:`functrain.train.make_train_step`, which passes only ``value=``. ``torch.optim.LBFGS``
    has its own strong-Wolfe search (``line_search_fn="strong_wolfe"``), not a transform.

    Args:
        max_linesearch_steps: maximal number of evaluations (a Python int).
        max_learning_rate: largest step size tried (``None``: unbounded).
        tol: tolerance on the decrease and curvature errors.
        increase_factor: growth of the step while no interval is found.
        slope_rtol: weight of the slope in the sufficient-decrease condition.
        curv_rtol: curvature condition's ratio, in ``[0, 1]``.
        approx_dec_rtol: relative tolerance of the approximate decrease test (``None``: off).
        stepsize_precision: interval length under which the search gives up.
        initial_guess_strategy: ``"keep"`` (start from the previous step size) or ``"one"``.
        verbose: accepted for optax compatibility; prints nothing.
        early_exit: stop the loop as soon as the search is over (a host read per iteration).

    Example:
        >>> import torch, functrain as ft
        >>> f = lambda p: ((p[0] - 3.0) ** 2).sum()
        >>> tx = ft.chain(ft.sgd(1.0), ft.scale_by_zoom_linesearch(10))
        >>> params = [torch.tensor([0.0, 1.0])]
        >>> grad, value = torch.func.grad_and_value(f)(params)
        >>> u, state = tx.update(grad, tx.init(params), params, value=value, grad=grad, value_fn=f)
        >>> ft.apply_updates(params, u)
        [tensor([3., 3.])]
    """
    _check_steps("max_linesearch_steps", max_linesearch_steps)
    if max_learning_rate is not None:
        _check_nonneg("max_learning_rate", max_learning_rate)
    if approx_dec_rtol is not None:
        _check_nonneg("approx_dec_rtol", approx_dec_rtol)
    for name, v in (
        ("tol", tol),
        ("slope_rtol", slope_rtol),
        ("stepsize_precision", stepsize_precision),
    ):
        _check_nonneg(name, v)
    _utils.check_finite_number("increase_factor", increase_factor, minimum=1.0)
    _utils.check_finite_number("curv_rtol", curv_rtol, minimum=0.0)
    if initial_guess_strategy not in ("keep", "one"):
        raise ValueError(
            f"Unknown initial_guess_strategy: {initial_guess_strategy!r}; use 'keep' or 'one'"
        )
    who = "scale_by_zoom_linesearch"

    def decrease_error(t, v, s, v0, s0):
        err = v - v0 - slope_rtol * t * s0
        if approx_dec_rtol is not None:
            approx = torch.maximum(
                s - (2 * slope_rtol - 1.0) * s0, v - v0 - approx_dec_rtol * v0.abs()
            )
            err = torch.minimum(approx, err)
        err = err.clamp_min(0.0)
        return torch.where(torch.isnan(err), torch.inf, err)

    def curvature_error(s, s0):
        err = (s.abs() - curv_rtol * s0.abs()).clamp_min(0.0)
        return torch.where(torch.isnan(err), torch.inf, err)

    def step(st: dict[str, Any], p: list, u: list, pspec: Any, vg: Callable) -> dict[str, Any]:
        """One iteration of optax's loop body: a search or a zoom step, then the safe step."""
        n, found = st["count"], st["interval_found"]
        # The step size each branch would try.
        grow = torch.where(n == 0, st["stepsize_guess"], increase_factor * st["stepsize"])
        max_reached = torch.zeros_like(found)
        if max_learning_rate is not None:
            max_reached = grow >= max_learning_rate
            grow = grow.clamp_max(max_learning_rate)
        low, high, cref = st["low"], st["high"], st["cubic_ref"]
        delta = (high - low).abs()
        left, right = torch.minimum(high, low), torch.maximum(high, low)
        too_small = delta <= stepsize_precision
        cub = _cubicmin(
            low,
            st["value_low"],
            st["slope_low"],
            high,
            st["value_high"],
            cref,
            st["value_cubic_ref"],
        )
        use_cub = (cub > left + 0.2 * delta) & (cub < right - 0.2 * delta)
        quad = _quadmin(low, st["value_low"], st["slope_low"], high, st["value_high"])
        use_quad = ~use_cub & (quad > left + 0.1 * delta) & (quad < right - 0.1 * delta)
        middle = torch.where(use_cub, cub, cref)
        middle = torch.where(use_quad, quad, middle)
        middle = torch.where(~use_cub & ~use_quad, (low + high) / 2.0, middle)
        t = torch.where(found, middle, grow)
        # One evaluation, shared by both branches.
        gl, v = vg(tree.unflatten(pspec, _axpy(p, t, u)))
        gl = [x.to(y.dtype) for x, y in zip(tree.flatten(gl)[0], p)]
        v = torch.as_tensor(v).to(t.dtype)
        s = _dot(gl, u, t.dtype)
        dec = decrease_error(t, v, s, st["value_init"], st["slope_init"])
        curv = curvature_error(s, st["slope_init"])
        err = torch.maximum(dec, curv)
        last = n + 1 >= max_linesearch_steps
        new = dict(st, count=_utils.safe_increment(n), stepsize=t, value=v, grad=gl, slope=s)
        new.update(decrease_error=dec, curvature_error=curv, error=err)
        # Search branch: grow the step until an interval is bracketed.
        pt, pv, ps = st["stepsize"], st["value"], st["slope"]
        high_new = (dec > 0.0) | ((v >= pv) & (n > 0))
        low_new = (s >= 0.0) & ~high_new
        sl = [
            _sel(low_new, a, b) for a, b in ((t, pt), (v, pv), (s, ps), (pt, t), (pv, v), (ps, s))
        ]
        s_found = high_new | low_new | (err <= tol)
        s_done = (err <= tol) | (max_reached & ~s_found)
        s_safe = dec <= tol
        search = dict(
            low=sl[0],
            value_low=sl[1],
            slope_low=sl[2],
            high=sl[3],
            value_high=sl[4],
            slope_high=sl[5],
            cubic_ref=sl[0],
            value_cubic_ref=sl[1],
            interval_found=s_found,
            done=s_done,
            failed=last & ~s_done,
        )
        # Zoom branch: shrink the bracket around the middle point.
        z_safe = (dec <= tol) & (v < st["safe_value"])
        z_done = err <= tol
        high_mid = (dec > 0.0) | (v >= st["value_low"])
        high_low = (s * (high - low) >= 0.0) & ~high_mid
        trio = (st["high"], st["value_high"], st["slope_high"])
        h = [
            _sel(high_low, lo, _sel(high_mid, m, hi))
            for hi, m, lo in zip(trio, (t, v, s), (low, st["value_low"], st["slope_low"]))
        ]
        lo3 = [
            _sel(~high_mid, m, lo)
            for m, lo in zip((t, v, s), (low, st["value_low"], st["slope_low"]))
        ]
        moved_high = high_mid | high_low
        z_safe_t = torch.where(z_safe, t, st["safe_stepsize"])
        z_failed = (last | (too_small & (z_safe_t > 0.0))) & ~z_done
        zoom = dict(
            low=lo3[0],
            value_low=lo3[1],
            slope_low=lo3[2],
            high=h[0],
            value_high=h[1],
            slope_high=h[2],
            cubic_ref=torch.where(moved_high, high, low),
            value_cubic_ref=torch.where(moved_high, st["value_high"], st["value_low"]),
            interval_found=found,
            done=z_done,
            failed=z_failed,
        )
        for k in search:
            new[k] = _sel(found, zoom[k], search[k])
        take_safe = torch.where(found, z_safe, s_safe)
        new["safe_stepsize"] = torch.where(take_safe, t, st["safe_stepsize"])
        new["safe_value"] = torch.where(take_safe, v, st["safe_value"])
        new["safe_grad"] = _sel(take_safe, gl, st["safe_grad"])
        # A failed search falls back on the best safe step (optax's _try_safe_step).
        fallback = new["failed"] & ((new["safe_stepsize"] > 0.0) | torch.isinf(dec))
        new["stepsize"] = torch.where(fallback, new["safe_stepsize"], t)
        new["value"] = torch.where(fallback, new["safe_value"], v)
        new["grad"] = _sel(fallback, new["safe_grad"], gl)
        return new

    def init_fn(params: Any) -> ScaleByZoomLinesearchState:
        leaves, spec = tree.flatten(params)
        dtype, dev = _scalar_dtype(leaves), _utils.default_device(params)
        inf = torch.full((), float("inf"), dtype=dtype, device=dev)
        return ScaleByZoomLinesearchState(
            learning_rate=torch.ones((), dtype=dtype, device=dev),
            value=inf,
            grad=tree.unflatten(spec, [torch.zeros_like(x) for x in leaves]),
            info=ZoomLinesearchInfo(_utils.zero_count(params), inf, inf),
        )

    def update_fn(
        updates: Any,
        state: ScaleByZoomLinesearchState,
        params: Any = None,
        *,
        value: Any = None,
        grad: Any = None,
        value_fn: Callable[..., Any] | None = None,
        **extra: Any,
    ) -> tuple[Any, ScaleByZoomLinesearchState]:
        _check_args(params, value, grad, value_fn, who)
        kw = _kwargs_for(value_fn, extra, who)
        u, spec = _real_leaves("updates", updates)
        p, pspec = _real_leaves("params", params)
        _check_trees(updates, params, grad)
        g = [x.to(y.dtype) for x, y in zip(tree.flatten(grad)[0], p)]
        p, value = _constants(u, g, p, value)
        lr0 = state.learning_rate
        dtype = lr0.dtype
        value = torch.as_tensor(value, device=lr0.device).to(dtype)
        slope = _dot(u, g, dtype)
        zero, inf = torch.zeros_like(lr0), torch.full_like(lr0, float("inf"))
        false = torch.zeros((), dtype=torch.bool, device=lr0.device)
        st = dict(
            count=torch.zeros_like(state.info.num_linesearch_steps),
            stepsize_guess=lr0 if initial_guess_strategy == "keep" else torch.ones_like(lr0),
            stepsize=zero,
            value=value,
            grad=g,
            slope=slope,
            value_init=value,
            slope_init=slope,
            decrease_error=inf,
            curvature_error=inf,
            error=inf,
            interval_found=false,
            done=false,
            failed=false,
            low=zero,
            value_low=value,
            slope_low=slope,
            high=zero,
            value_high=value,
            slope_high=slope,
            cubic_ref=zero,
            value_cubic_ref=value,
            safe_stepsize=zero,
            safe_value=value,
            safe_grad=g,
        )
        vg = torch.func.grad_and_value(lambda q: value_fn(q, **kw))
        for _ in range(max(max_linesearch_steps, 1)):
            active = ~(st["done"] | st["failed"])
            new = step(st, p, u, pspec, vg)
            st = {k: _sel(active, new[k], st[k]) for k in st}
            if _stop(early_exit, st["done"] | st["failed"]):
                break
        lr = st["stepsize"]
        out = tree.unflatten(spec, [(lr * x).to(x.dtype) for x in u])
        return out, ScaleByZoomLinesearchState(
            learning_rate=lr,
            value=st["value"],
            grad=tree.unflatten(pspec, st["grad"]),
            info=ZoomLinesearchInfo(st["count"], st["decrease_error"], st["curvature_error"]),
        )

    return GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- reuse
