"""MADGRAD against the paper's rule (as facebookresearch's PyTorch ``madgrad`` package writes it)
per element in float64, plus the shared checks, vmap, bad arguments and a train step."""

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


def _reference(grads, lr, momentum, wd, eps, p0):
    """The madgrad package's loop: lamb = (lr + eps)·√(k + 1), then the averaged iterate."""
    n = len(p0)
    gsq, s, p, out = [0.0] * n, [0.0] * n, list(p0), []
    for k, g in enumerate(grads):
        rate = lr(k) if callable(lr) else lr
        lamb = (rate + eps) * math.sqrt(k + 1)
        new = []
        for i, gi in enumerate(g.tolist()):
            gi = gi + wd * p[i]
            gsq[i] += lamb * gi * gi
            s[i] += lamb * gi
            root = math.copysign(abs(gsq[i]) ** (1 / 3), gsq[i])
            z = p0[i] - s[i] / (root + eps)
            new.append((1 - momentum) * z + momentum * p[i])
        p = new
        out.append(list(p))
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"momentum": 0.0, "eps": 1e-3},
        {"momentum": 0.5, "weight_decay": 0.1},
        {"learning_rate": lambda c: 0.1 / (1.0 + (c.double() if torch.is_tensor(c) else c))},
    ],
)
def test_matches_rule(kw: dict) -> None:
    full = {"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 0.0, "eps": 1e-6}
    full.update(kw)
    tx = ft.madgrad(**full)
    p0 = torch.linspace(-1, 1, 5, dtype=F64)
    grads = _grads(12)
    params, state = [p0], tx.init([p0])
    want = _reference(grads, *full.values(), p0.tolist())
    for g, w in zip(grads, want):
        u, state = tx.update([g], state, params)
        params = ft.apply_updates(params, u)
        torch.testing.assert_close(params[0].tolist(), w, rtol=0, atol=1e-12)


def test_x0_is_a_copy() -> None:
    """The state keeps the initial parameters even if the caller mutates its tensors."""
    params = [torch.ones(2, dtype=F64)]
    tx = ft.scale_by_madgrad(0.1)
    state = tx.init(params)
    params[0].add_(5.0)
    assert torch.equal(state.x0[0], torch.ones(2, dtype=F64))


@settings(max_examples=25, deadline=None)
@given(st.floats(1e-2, 1e2))
def test_update_sign_and_scale(c: float) -> None:
    """With momentum 0 and no eps, the first step is −λg/∛(λg²): it scales as c^(1/3)."""
    g = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    params = [torch.zeros(3, dtype=F64)]
    tx = ft.scale_by_madgrad(0.1, momentum=0.0, eps=0.0)
    a = tx.update([g], tx.init(params), params)[0][0]
    b = tx.update([c * g], tx.init(params), params)[0][0]
    torch.testing.assert_close(b, a * c ** (1 / 3), rtol=1e-12, atol=0)
    assert torch.equal(torch.sign(a), -torch.sign(g))


def test_shared_properties() -> None:
    check_pure(ft.madgrad(1e-2))
    check_bfloat16(ft.madgrad(1e-2))
    check_masked(ft.madgrad(1e-2, weight_decay=0.1))
    check_compiles(ft.madgrad(ft.linear_schedule(0.1, 0.01, 6)))
    check_train_step(ft.madgrad(0.05))


def test_inject_hyperparams_and_vmap() -> None:
    tx = ft.inject_hyperparams(ft.madgrad)(learning_rate=0.1)
    params = [torch.ones(2, dtype=F64)]
    state = tx.init(params)
    state.hyperparams["learning_rate"].fill_(0.0)
    u, _ = tx.update([torch.ones(2, dtype=F64)], state, params)
    # lr 0: λ = eps, so z − p = −eps/(∛eps + eps); the update is (1 − 0.9)·(z − p).
    want = torch.full((2,), -0.1 * 1e-6 / (1e-2 + 1e-6), dtype=F64)
    torch.testing.assert_close(u[0], want, rtol=1e-12, atol=0)
    # Three independent problems in one vmapped update.
    plain = ft.scale_by_madgrad(0.1)
    batch_p = torch.randn(3, 4, dtype=F64)
    batch_g = torch.randn(3, 4, dtype=F64)
    states = torch.func.vmap(plain.init)(batch_p)
    out, _ = torch.func.vmap(plain.update)(batch_g, states, batch_p)
    for i in range(3):
        one, _ = plain.update(batch_g[i], plain.init(batch_p[i]), batch_p[i])
        torch.testing.assert_close(out[i], one, rtol=1e-12, atol=0)


def test_errors_and_empty_tree() -> None:
    tx = ft.scale_by_madgrad(0.1)
    with pytest.raises(ValueError, match="needs params"):
        tx.update([torch.ones(2)], tx.init([torch.ones(2)]))
    g = [torch.ones(2, dtype=torch.complex64)]
    with pytest.raises(TypeError, match=r"updates\[0\].*complex64"):
        tx.update(g, tx.init(g), g)
    u, state = tx.update({}, tx.init({}), {})
    assert u == {} and int(state.count) == 1
    with pytest.raises(ValueError, match="momentum"):
        ft.madgrad(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        ft.madgrad(0.1, eps=-1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        ft.madgrad(float("inf"))
    with pytest.raises(TypeError, match="eps"):
        ft.madgrad(0.1, eps=lambda c: 0.1)
