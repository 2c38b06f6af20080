"""Simplified AdEMAMix against its rule written per element in float64, plus the shared checks,
bad arguments and a train step."""

from __future__ import annotations

import math

import pytest
import torch
from _alias_contract import (
    check_bfloat16,
    check_compiles,
    check_masked,
    check_pure,
    check_train_step,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

F64 = torch.float64


def _grads(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(5, generator=gen, dtype=F64) for _ in range(n)]
    out[2] = torch.zeros(5, dtype=F64)
    out[3] = -out[1]
    out[6][1] = 0.0
    return out


def _reference(grads, lr, b1, b2, alpha, eps, eps_root, wd, p0):
    n = len(p0)
    m, v, p, out = [0.0] * n, [0.0] * n, list(p0), []
    for k, g in enumerate(grads):
        a = alpha(k) if callable(alpha) else alpha
        t = k + 1
        u = []
        for i, gi in enumerate(g.tolist()):
            m[i] = b1 * m[i] + gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            d = (m[i] + a * gi) / (math.sqrt(v[i] / (1 - b2**t) + eps_root) + eps)
            u.append(-lr * (d + wd * p[i]))
        p = [x + y for x, y in zip(p, u)]
        out.append(p)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"b1": 0.9, "b2": 0.8, "alpha": 2.0, "eps": 1e-3, "eps_root": 1e-4},
        {"alpha": lambda c: 0.5 * (c.double() if torch.is_tensor(c) else c), "weight_decay": 0.1},
        {"b1": 1.0, "b2": 0.0},
    ],
)
def test_matches_rule(kw: dict) -> None:
    full = {"b1": 0.99, "b2": 0.95, "alpha": 0.0, "eps": 1e-8, "eps_root": 0.0}
    full["weight_decay"] = 0.0
    full.update(kw)
    tx = ft.simplified_ademamix(0.01, **kw)
    grads, p0 = _grads(12), torch.linspace(-1, 1, 5, dtype=F64)
    params, state = [p0], tx.init([p0])
    want = _reference(grads, 0.01, *full.values(), p0.tolist())
    for g, w in zip(grads, want):
        u, state = tx.update([g], state, params)
        params = ft.apply_updates(params, u)
        torch.testing.assert_close(params[0].tolist(), w, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-3, 1e3))
def test_scale_invariant(c: float) -> None:
    """Scaling every gradient by c leaves the update unchanged (with eps = 0)."""
    grads = [g + 0.1 for g in _grads(8)]
    tx = ft.scale_by_simplified_ademamix(alpha=1.5, eps=0.0)
    for scale in (1.0, c):
        state, outs = tx.init([grads[0]]), []
        for g in grads:
            u, state = tx.update([scale * g], state)
            outs.append(u[0])
        if scale == 1.0:
            base = outs
    for a, b in zip(base, outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_shared_properties() -> None:
    check_pure(ft.simplified_ademamix(1e-3, alpha=1.0))
    check_bfloat16(ft.simplified_ademamix(1e-3, alpha=1.0))
    check_masked(ft.simplified_ademamix(1e-3, weight_decay=0.1))
    sched = ft.linear_schedule(0.0, 3.0, 6)
    check_compiles(ft.simplified_ademamix(ft.linear_schedule(1e-2, 1e-3, 6), alpha=sched))
    check_train_step(ft.simplified_ademamix(1e-2, b1=0.5))


def test_inject_hyperparams() -> None:
    tx = ft.inject_hyperparams(ft.simplified_ademamix)(learning_rate=0.1, alpha=1.0)
    params = [torch.ones(2, dtype=F64)]
    state = tx.init(params)
    state.hyperparams["alpha"].fill_(3.0)
    u, _ = tx.update([torch.ones(2, dtype=F64)], state, params)
    torch.testing.assert_close(u[0], torch.full((2,), -0.4, dtype=F64), rtol=1e-7, atol=0)


def test_errors_and_empty_tree() -> None:
    tx = ft.scale_by_simplified_ademamix()
    u, state = tx.update({}, tx.init({}))
    assert u == {} and int(state.t) == 1
    c = [torch.ones(2, dtype=torch.complex64)]
    with pytest.raises(TypeError, match=r"updates\[0\].*complex64"):
        tx.update(c, tx.init(c))
    with pytest.raises(ValueError, match="b1"):
        ft.simplified_ademamix(0.1, b1=1.5)
    with pytest.raises(ValueError, match="b2"):
        ft.simplified_ademamix(0.1, b2=1.0)
    with pytest.raises(ValueError, match="alpha"):
        ft.simplified_ademamix(0.1, alpha=float("nan"))
    with pytest.raises(ValueError, match="eps_root"):
        ft.simplified_ademamix(0.1, eps_root=-1.0)
