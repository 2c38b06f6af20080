"""Optimistic gradient descent, optimistic Adam and Fromage against float64 references."""

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

import functrain as ft


def _grads(n=8):
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(n)]
    out[2] = torch.zeros(4, dtype=torch.float64)
    out[5] = -out[4]
    return out


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
def test_optimistic_gradient_matches_formula(alpha, beta):
    tx = ft.scale_by_optimistic_gradient(alpha, beta)
    grads = _grads()
    state = tx.init(grads[0])
    prev = grads[0]  # g₀ = g₁ (optax issue 1082)
    for g in grads:
        u, state = tx.update(g, state)
        want = [(alpha + beta) * x - beta * p for x, p in zip(g.tolist(), prev.tolist())]
        torch.testing.assert_close(u, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
        prev = g


def test_optimistic_adam_matches_formula():
    """u = −(lr + o)·rₜ + o·rₜ₋₁ with r Adam's (non-Nesterov) direction, in Python floats."""
    lr, o, b1, b2, eps = 0.1, 0.3, 0.8, 0.9, 1e-8
    tx = ft.optimistic_adam(lr, o, b1, b2, eps, nesterov=False)
    grads = _grads()
    state = tx.init(grads[0])
    m, v, r_prev = [0.0] * 4, [0.0] * 4, None
    for t, g in enumerate(grads, 1):
        u, state = tx.update(g, state)
        m = [b1 * a + (1 - b1) * x for a, x in zip(m, g.tolist())]
        v = [b2 * a + (1 - b2) * x * x for a, x in zip(v, g.tolist())]
        r = [(a / (1 - b1**t)) / (math.sqrt(c / (1 - b2**t)) + eps) for a, c in zip(m, v)]
        r_prev = r if r_prev is None else r_prev
        want = [-(lr + o) * a + o * b for a, b in zip(r, r_prev)]
        torch.testing.assert_close(
            u, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-15
        )
        r_prev = r


def test_fromage_matches_formula():
    lr, min_norm = 0.3, 1e-6
    tx = ft.fromage(lr, min_norm)
    p = torch.tensor([3.0, -4.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.2, 0.1, -1.0], dtype=torch.float64)
    u, _ = tx.update(g, tx.init(p), p)
    mult = 1 / math.sqrt(1 + lr * lr)
    ratio = math.sqrt(sum(x * x for x in p.tolist())) / math.sqrt(sum(x * x for x in g.tolist()))
    want = [-lr * mult * ratio * x + (mult - 1) * w for x, w in zip(g.tolist(), p.tolist())]
    torch.testing.assert_close(u, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.optimistic_gradient_descent(0.05),
        lambda: ft.optimistic_adam(0.05),
        lambda: ft.fromage(0.05),
    ],
)
def test_shared_properties(make):
    check_pure(make())
    check_bfloat16(make())
    check_masked(make())
    check_train_step(make())


def test_compiles_with_schedules_and_tensors():
    check_compiles(ft.optimistic_gradient_descent(lambda c: 0.1 / (c + 1), beta=torch.tensor(0.5)))
    check_compiles(ft.fromage(lambda c: 0.1 / (c + 1)))
    check_compiles(ft.optimistic_adam(torch.tensor(0.01)))


def test_empty_trees_and_state():
    for tx in (ft.optimistic_gradient_descent(0.1), ft.fromage(0.1), ft.optimistic_adam(0.1)):
        assert tx.update({}, tx.init({}), {})[0] == {}
    s = ft.scale_by_optimistic_gradient().init([torch.zeros(2)])
    assert s._fields == ("is_initial_step", "previous_gradient")


def test_state_does_not_alias_the_gradient():
    tx = ft.scale_by_optimistic_gradient()
    g = [torch.ones(2)]
    _, state = tx.update(g, tx.init(g))
    assert state.previous_gradient[0].data_ptr() != g[0].data_ptr()


def test_bad_arguments():
    with pytest.raises(TypeError, match="alpha"):
        ft.scale_by_optimistic_gradient(alpha=lambda c: 1.0)
    with pytest.raises(ValueError, match="beta"):
        ft.optimistic_gradient_descent(0.1, beta=float("nan"))
    with pytest.raises(ValueError, match="schedule"):
        ft.optimistic_adam(lambda c: 0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        ft.fromage(float("inf"))


def test_injectable_learning_rate():
    for alias in (ft.optimistic_gradient_descent, ft.fromage):
        tx = ft.inject_hyperparams(alias)(learning_rate=0.1)
        p = [torch.ones(2)]
        u, _ = tx.update([torch.ones(2)], tx.init(p), p)
        assert torch.isfinite(u[0]).all()


def test_optimistic_adam_v2_is_adam_then_optimism_then_learning_rate():
    """optax's reworked interface: ``−lr · (alpha · rₜ + beta · (rₜ − rₜ₋₁))`` with Adam's
    direction ``r``, computed here from scale_by_adam's own output over steps (float64)."""
    lr, alpha, beta = 0.05, 0.7, 1.5
    tx = ft.optimistic_adam_v2(lr, alpha=alpha, beta=beta, nesterov=False)
    adam = ft.scale_by_adam()
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state, adam_state = tx.init(params), adam.init(params)
    previous = None
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = {"w": torch.randn(3, generator=gen, dtype=torch.float64)}
        u, state = tx.update(g, state, params)
        r, adam_state = adam.update(g, adam_state, params)
        change = 0.0 if previous is None else r["w"] - previous
        torch.testing.assert_close(u["w"], -lr * (alpha * r["w"] + beta * change))
        previous = r["w"]
