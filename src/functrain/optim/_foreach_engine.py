"""The ``"foreach"`` engine of :mod:`functrain.optim.fused`: in-place foreach arithmetic.

Each primitive repeats its pure update's arithmetic (same ops, same order: same bits) on ``u``,
the current updates; ``owned[i]`` says ``u[i]`` is a temporary of ours that may be overwritten
(not a gradient, not a tensor the new state keeps). The engine applies where the fused kernels
do not (other dtypes, masks, tensor hyperparameters, ...) but cannot honour ``found_inf``.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any

import torch

from functrain import tree
from functrain._precision import HALF as _HALF
from functrain.optim import _ops
from functrain.optim._utils import safe_increment
from functrain.optim.fused import (
    AddDecayedWeights,
    ClipByGlobalNorm,
    Context,
    Op,
    Scale,
    ScaleByAdam,
    ScaleBySchedule,
    SetToZero,
    Trace,
)

__all__ = ["run"]  # internal: ENGINES["foreach"] of _fused_engines


class _Updates:
    def __init__(self, ctx: Context) -> None:
        self.u: list[torch.Tensor] = list(ctx.g)
        self.owned = [False] * ctx.n

    def take(self, idx: list[int]) -> list[torch.Tensor]:
        return [self.u[i] for i in idx]

    def put(self, idx: list[int], values: list[torch.Tensor], owned: bool | list[bool]) -> None:
        flags = owned if isinstance(owned, list) else [owned] * len(idx)
        for i, v, o in zip(idx, values, flags):
            self.u[i], self.owned[i] = v, o

    def split(self, idx: list[int]) -> tuple[list[int], list[int]]:
        mine = [i for i in idx if self.owned[i]]
        return mine, [i for i in idx if not self.owned[i]]


_DTYPE = attrgetter("dtype")


def _mul_into(up: _Updates, idx: list[int], factor: Any) -> None:
    mine, theirs = up.split(idx)
    # ``torch._foreach_mul_`` (in place, CPU) rounds a Python scalar to a float16 or bfloat16
    # leaf's dtype before multiplying, where the pure path's out-of-place multiply keeps it in
    # float32: ``x · bf16(0.1)`` is not ``x · 0.1``. Such leaves take the pure path's own op
    # (one dtype check per leaf, in C, in the common case of none).
    if (
        mine
        and not isinstance(factor, torch.Tensor)
        and not _HALF.isdisjoint(map(_DTYPE, up.take(mine)))
    ):
        theirs += [i for i in mine if up.u[i].dtype in _HALF]
        mine = [i for i in mine if up.u[i].dtype not in _HALF]
    if mine:
        torch._foreach_mul_(up.take(mine), _ops.on_device(factor, up.u[mine[0]]))
    if theirs:
        up.put(theirs, _ops.mul(up.take(theirs), factor), True)


def _clip_b(op: Op, ctx: Context, up: _Updates, grad_norm: torch.Tensor | None) -> None:
    op.new_state = op.state
    if not op.idx:
        return
    from functrain.optim import clipping

    max_norm = op.spec.max_norm  # type: ignore[attr-defined]
    leaves = up.take(op.idx)
    full = len(op.idx) == ctx.n and all(up.u[i] is ctx.g[i] for i in op.idx)
    if grad_norm is not None and full and not any(x.dtype in _HALF for x in leaves):
        factor = clipping._clip_factor(grad_norm, max_norm)
    else:  # the pure path's factor, which survives a float16 norm above 65504
        factor = clipping._global_clip_factor(leaves, max_norm)
    _mul_into(up, op.idx, factor)


def _scale_b(op: Op, ctx: Context, up: _Updates, grad_norm: torch.Tensor | None) -> None:
    spec = op.spec
    if isinstance(spec, Scale):
        factor = spec.value if spec.sign == 1 else spec.sign * spec.value
        op.new_state = op.state
    else:
        factor = spec.fn(op.state.count)  # type: ignore[attr-defined]
        op.new_state = op.state._replace(count=safe_increment(op.state.count))
    if op.idx:
        _mul_into(up, op.idx, factor)


def _decay_b(op: Op, ctx: Context, up: _Updates, grad_norm: torch.Tensor | None) -> None:
    rate = op.spec.weight_decay  # type: ignore[attr-defined]
    op.new_state = op.state
    if callable(rate):
        rate = rate(op.state.count)
        op.new_state = op.state._replace(count=safe_increment(op.state.count))
    mine, theirs = up.split(op.idx)
    for part, in_place in ((mine, True), (theirs, False)):
        if not part:
            continue
        g = up.take(part)
        p = _ops.cast_like([ctx.p[i] for i in part], g)
        if not in_place:
            up.put(part, _ops.add_scaled(g, rate, p), True)
        elif isinstance(rate, torch.Tensor):
            torch._foreach_add_(g, torch._foreach_mul(p, _ops.on_device(rate, g[0])))
        else:
            torch._foreach_add_(g, p, alpha=rate)


def _trace_b(op: Op, ctx: Context, up: _Updates, grad_norm: torch.Tensor | None) -> None:
    from functrain.optim.accumulation import _trace_step

    spec = op.spec
    assert isinstance(spec, Trace)
    if not op.idx:
        op.new_state = op.state
        return
    t_leaves, t_spec = tree.flatten(op.state.trace)
    # The pure update's own step: the arithmetic in the wider of each update's and trace's
    # dtypes, the trace kept in its init dtype (a float32 trace of bfloat16 gradients).
    out, kept = _trace_step(up.take(op.idx), t_leaves, spec.decay, spec.nesterov)
    op.new_state = op.state._replace(trace=tree.unflatten(t_spec, kept))
    up.put(op.idx, out, [o is not k for o, k in zip(out, kept)])


def _adam_b(op: Op, ctx: Context, up: _Updates, grad_norm: torch.Tensor | None) -> None:
    from functrain.optim.adaptive import _direction, _operands

    spec = op.spec
    assert isinstance(spec, ScaleByAdam)
    count = safe_increment(op.state.count)
    g = up.take(op.idx)
    if not g:
        op.new_state = op.state._replace(count=count)
        return
    mu_l, mu_spec = tree.flatten(op.state.mu)
    nu_l, nu_spec = tree.flatten(op.state.nu)
    # The pure path's operands: float32 for half-precision leaves, at least each state's dtype.
    g_mu, g_nu = _operands(g, mu_l), _operands(g, nu_l)
    same = all(m.dtype == x.dtype and v.dtype == x.dtype for m, v, x in zip(mu_l, nu_l, g))
    if same and g_mu is g and g_nu is g:
        _ops.lerp_(mu_l, g, 1 - _ops.on_device(spec.b1, g[0]))
        decay = _ops.on_device(spec.b2, g[0])
        torch._foreach_mul_(nu_l, decay)
        if isinstance(decay, torch.Tensor):
            torch._foreach_add_(nu_l, _ops.scaled_square(g, decay))
        else:
            torch._foreach_addcmul_(nu_l, g, g, 1 - decay)
        mu, nu = mu_l, nu_l
        op.new_state = op.state._replace(count=count)
    else:  # the pure path's out-of-place moments
        mu, nu = _ops.moment(g_mu, mu_l, spec.b1), _ops.moment_sq(g_nu, nu_l, spec.b2)
        if same:  # rounded into the state tensors, as the pure path's casts round
            torch._foreach_copy_(mu_l, mu)
            torch._foreach_copy_(nu_l, nu)
            op.new_state = op.state._replace(count=count)
        else:  # mixed dtypes (mu_dtype, or gradients of another dtype than the params)
            op.new_state = op.state._replace(
                count=count,
                mu=tree.unflatten(mu_spec, _ops.cast_like(mu, mu_l)),
                nu=tree.unflatten(nu_spec, _ops.cast_like(nu, nu_l)),
            )
    out = _direction(g_mu, mu, nu, count, spec.b1, spec.b2, spec.eps, spec.eps_root, spec.nesterov)
    up.put(op.idx, _ops.cast_like(out, g), True)


def _zero_b(op: Op, ctx: Context, up: _Updates, grad_norm: torch.Tensor | None) -> None:
    op.new_state = op.state
    if op.idx:  # the pure path's zeros, of the updates' dtypes
        up.put(op.idx, [torch.zeros_like(x) for x in up.take(op.idx)], True)


_PRIMITIVES: dict[type, Callable[..., None]] = {
    SetToZero: _zero_b,
    ClipByGlobalNorm: _clip_b,
    Scale: _scale_b,
    ScaleBySchedule: _scale_b,
    AddDecayedWeights: _decay_b,
    Trace: _trace_b,
    ScaleByAdam: _adam_b,
}


def run(
    ops: list[Op], ctx: Context, grad_norm: torch.Tensor | None, want_norm: bool, writable: bool
) -> Any:
    del writable  # gradients are never written: the pure path's numbers need them intact
    if ctx.found_inf is not None or any(type(op.spec) not in _PRIMITIVES for op in ops):
        return False
    if any(x.is_complex() for x in ctx.g):  # Adam's |g|² is the pure path's per-leaf branch
        return False
    # Outside autograd, as the kernels are: parameters that require grad (the caller owns
    # them) raised at the final in-place add, after the moments had been written.
    with torch.no_grad():
        up = _Updates(ctx)
        for op in ops:
            _PRIMITIVES[type(op.spec)](op, ctx, up, grad_norm)
        norm = tree.norm(up.u) if want_norm else None
        same = [i for i in range(ctx.n) if ctx.p[i].dtype == up.u[i].dtype]
        if same:
            torch._foreach_add_([ctx.p[i] for i in same], up.take(same))
        for i in range(ctx.n):
            if ctx.p[i].dtype != up.u[i].dtype:
                ctx.p[i].copy_(ctx.p[i] + up.u[i])  # apply_updates' rounding: add, then cast
    return norm
