"""MoMo and MoMo-Adam against the paper's rules written per element in float64 on a quadratic
(the loss passed as ``value=``), plus the shared checks, bad arguments and a train step."""

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
_SCALES = [0.5, 1.0, 2.0, 3.0, 0.1]
_TARGET = [1.0, -2.0, 0.0, 0.5, 3.0]


def _loss_grad(p: list[float]) -> tuple[float, list[float]]:
    loss = sum(s * (x - t) ** 2 for s, x, t in zip(_SCALES, p, _TARGET))
    return loss, [2 * s * (x - t) for s, x, t in zip(_SCALES, p, _TARGET)]


def _momo_reference(steps, lr, beta, lower_bound, wd, adapt, p0, adam=None):
    """MoMo (``adam=None``) or MoMo-Adam (``adam=(b2, eps)``), as Schaipp et al.'s Algorithms."""
    n = len(p0)
    d, v, p = [0.0] * n, [0.0] * n, list(p0)
    fbar = gamma = 0.0
    lb, out = lower_bound, []
    for k in range(steps):
        f, g = _loss_grad(p)
        b = beta if (k > 0 or adam) else 0.0
        fbar = b * fbar + (1 - b) * f
        d = [b * di + (1 - b) * gi for di, gi in zip(d, g)]
        gamma = b * gamma + (1 - b) * sum(gi * pi for gi, pi in zip(g, p))
        if adam:
            b2, eps = adam
            v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
            bc1, bc2 = 1 - beta ** (k + 1), 1 - b2 ** (k + 1)
            pre = [eps + math.sqrt(vi / bc2) for vi in v]
        else:
            bc1, pre = 1.0, [1.0] * n
        dd = [di / qi for di, qi in zip(d, pre)]
        norm = sum(di * x for di, x in zip(d, dd))
        iprod = sum(di * pi for di, pi in zip(d, p))
        alpha = lr(k) if callable(lr) else lr
        c = 1 + alpha * wd
        if adapt:
            cap = c * (fbar - gamma) + iprod
            if cap < c * bc1 * lb:
                lb = max(cap / (2 * bc1 * c), lower_bound)
        h = c * (fbar - bc1 * lb - gamma) + iprod
        tau = 0.0 if norm <= 2.220446049250313e-16 else min(alpha / bc1, max(h, 0.0) / norm)
        p = [pi - alpha * wd / c * pi - tau * x for pi, x in zip(p, dd)]
        if adapt:
            lb = max(((fbar + iprod - gamma) - 0.5 * tau * norm) / bc1, lower_bound)
        out.append(list(p))
    return out


def _run(tx, steps, p0):
    def f(p):
        s, t = torch.tensor(_SCALES, dtype=F64), torch.tensor(_TARGET, dtype=F64)
        return (s * (p[0] - t) ** 2).sum()

    params, state, out = [p0], tx.init([p0]), []
    for _ in range(steps):
        loss, g = torch.func.grad_and_value(f)(params)[::-1]
        u, state = tx.update(g, state, params, value=loss)
        params = ft.apply_updates(params, u)
        out.append(params[0].tolist())
    return out, state


def _sched(c):
    return 0.8 / (1.0 + 0.1 * (c.double() if torch.is_tensor(c) else c))


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"learning_rate": 0.3, "beta": 0.5, "lower_bound": -1.0},
        {"learning_rate": _sched, "weight_decay": 0.05, "adapt_lower_bound": True},
        {"lower_bound": 0.2, "adapt_lower_bound": True},
    ],
)
def test_momo_matches_rule(kw: dict) -> None:
    full = {"learning_rate": 1.0, "beta": 0.9, "lower_bound": 0.0, "weight_decay": 0.0}
    full["adapt_lower_bound"] = False
    full.update(kw)
    p0 = torch.linspace(-1, 1, 5, dtype=F64)
    got, _ = _run(ft.momo(**kw), 15, p0)
    want = _momo_reference(15, *full.values(), p0.tolist())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"learning_rate": 0.3, "b1": 0.5, "b2": 0.9, "eps": 1e-3, "lower_bound": -1.0},
        {"learning_rate": _sched, "weight_decay": 0.05, "adapt_lower_bound": True},
    ],
)
def test_momo_adam_matches_rule(kw: dict) -> None:
    full = {"learning_rate": 1e-2, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "lower_bound": 0.0}
    full.update({"weight_decay": 0.0, "adapt_lower_bound": False})
    full.update(kw)
    p0 = torch.linspace(-1, 1, 5, dtype=F64)
    got, _ = _run(ft.momo_adam(**kw), 15, p0)
    f = full
    want = _momo_reference(
        15,
        f["learning_rate"],
        f["b1"],
        f["lower_bound"],
        f["weight_decay"],
        f["adapt_lower_bound"],
        p0.tolist(),
        adam=(f["b2"], f["eps"]),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.1, 10.0))
def test_momo_loss_shift_with_lower_bound(shift: float) -> None:
    """Adding a constant to the loss and to the lower bound changes no step."""
    p0 = torch.linspace(-1, 1, 5, dtype=F64)
    a, _ = _run(ft.momo(0.5, lower_bound=0.0), 4, p0)
    tx = ft.momo(0.5, lower_bound=shift)
    params, state = [p0], tx.init([p0])
    for want in a:
        f, g = _loss_grad(params[0].tolist())
        u, state = tx.update([torch.tensor(g, dtype=F64)], state, params, value=f + shift)
        params = ft.apply_updates(params, u)
        torch.testing.assert_close(params[0].tolist(), want, rtol=1e-9, atol=1e-9)


def test_state_dtypes_follow_lowest_param_dtype() -> None:
    params = {"a": torch.ones(2, dtype=torch.bfloat16), "b": torch.ones(2)}
    state = ft.momo_adam(lower_bound=0.25).init(params)
    assert state.barf.dtype == state.lb.dtype == torch.bfloat16 and float(state.lb) == 0.25
    assert state.exp_avg["b"].dtype == torch.float32


@pytest.mark.parametrize("alias", [ft.momo, ft.momo_adam])
def test_shared_properties(alias) -> None:
    kw = {"value": torch.tensor(2.0, dtype=F64)}
    check_pure(alias(), **kw)
    check_bfloat16(alias(), value=2.0)
    check_masked(alias(), **kw)
    check_compiles(alias(ft.linear_schedule(0.5, 0.1, 6)), value=torch.tensor(2.0))
    check_train_step(alias(0.5))  # make_train_step passes value=loss


def test_inject_hyperparams() -> None:
    for alias in (ft.momo, ft.momo_adam):
        tx = ft.inject_hyperparams(alias)(learning_rate=0.5)
        params = [torch.ones(2, dtype=F64)]
        state = tx.init(params)
        state.hyperparams["learning_rate"].fill_(0.0)
        u, _ = tx.update([torch.ones(2, dtype=F64)], state, params, value=1.0)
        assert torch.equal(u[0], torch.zeros(2, dtype=F64))


def test_errors_and_empty_tree() -> None:
    tx = ft.momo()
    p = [torch.ones(2)]
    # TypeError, as optax's missing required keyword and scale_by_polyak's missing loss.
    with pytest.raises(TypeError, match="momo needs the loss"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(TypeError, match="momo_adam needs the loss"):
        ft.momo_adam().update(p, ft.momo_adam().init(p), p, value=None)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p), value=1.0)
    with pytest.raises(TypeError, match="single real number"):
        tx.update(p, tx.init(p), p, value=torch.ones(2))
    c = [torch.ones(2, dtype=torch.complex64)]
    with pytest.raises(TypeError, match=r"updates\[0\].*complex64"):
        ft.momo_adam().update(c, ft.momo_adam().init(c), c, value=1.0)
    for alias in (ft.momo, ft.momo_adam):
        u, state = alias().update({}, alias().init({}), {}, value=1.0)
        assert u == {} and int(state.count) == 1
    with pytest.raises(ValueError, match="beta"):
        ft.momo(beta=1.5)
    with pytest.raises(ValueError, match="b2"):
        ft.momo_adam(b2=1.0)
    with pytest.raises(ValueError, match="eps"):
        ft.momo_adam(eps=-1.0)
    with pytest.raises(ValueError, match="lower_bound"):
        ft.momo(lower_bound=float("nan"))
    with pytest.raises(TypeError, match="weight_decay"):
        ft.momo(weight_decay=lambda c: 0.1)
