"""Prodigy and D-Adaptation AdamW against their rules written per element in float64 (global
sums over two leaves), with schedules, purity, masks, bfloat16, compile, inject_hyperparams, a
train step and bad arguments."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _two_leaf_reference import assert_train_step_halves_loss
from _two_leaf_reference import flat as _flat
from _two_leaf_reference import grads as two_leaf_grads
from _two_leaf_reference import lin as _lin
from _two_leaf_reference import p0 as _p0
from _two_leaf_reference import run as _run

import functrain as ft
from functrain import testing

F64 = torch.float64


def _grads(n: int) -> list[list[torch.Tensor]]:
    return two_leaf_grads(n, seed=0, zero_leaf=1)


def _prodigy_ref(grads, p0, lr, b1, b2, b3, eps, d0, coef, wd, safeguard):
    n = len(p0)
    m, v, s, x = [0.0] * n, [0.0] * n, [0.0] * n, list(p0)
    d, num, out = d0, 0.0, []
    for t, gt in enumerate(grads, start=1):
        g = _flat(gt)
        c_lr = lr(t - 1) if callable(lr) else lr
        dlr = d * c_lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        acc = sum(g[i] * (p0[i] - x[i]) for i in range(n))
        for i in range(n):
            m[i] = b1 * m[i] + (1 - b1) * d * g[i]
            v[i] = b2 * v[i] + (1 - b2) * (d * g[i]) ** 2
            s[i] = b3 * s[i] + (d if safeguard else dlr) * d * g[i] / d0
        num = b3 * num + (d / d0) * dlr * acc
        new_d = max(d, coef * num / sum(abs(si) for si in s))
        u = [-wd * dlr * x[i] - dlr * m[i] / (math.sqrt(v[i]) + new_d * eps) for i in range(n)]
        d = new_d
        x = [a + b for a, b in zip(x, u)]
        out.append(list(x))
    return out


def _dadapt_ref(grads, p0, lr, b1, b2, eps, d0, wd):
    n = len(p0)
    m, v, s, x = [0.0] * n, [0.0] * n, [0.0] * n, list(p0)
    d, num, out, sb2 = d0, 0.0, [], math.sqrt(b2)
    for t, gt in enumerate(grads, start=1):
        g = _flat(gt)
        c_lr = lr(t - 1) if callable(lr) else lr
        dlr = d * c_lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        acc = sum(g[i] * s[i] / (math.sqrt(v[i]) + eps) for i in range(n))
        for i in range(n):
            m[i] = b1 * m[i] + (1 - b1) * dlr * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            s[i] = sb2 * s[i] + (1 - sb2) * dlr * g[i]
        num = sb2 * num + (1 - sb2) * dlr * acc
        d = max(d, num / ((1 - sb2) * sum(abs(si) for si in s)))
        u = [-wd * dlr * x[i] - m[i] / (math.sqrt(v[i]) + eps) for i in range(n)]
        x = [a + b for a, b in zip(x, u)]
        out.append(list(x))
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "learning_rate": _lin,
            "betas": (0.8, 0.95),
            "beta3": 0.9,
            "eps": 1e-3,
            "estim_lr0": 1e-2,
            "estim_lr_coef": 2.0,
            "weight_decay": 0.1,
        },
        {"estim_lr0": 1e-1, "safeguard_warmup": True},
    ],
)
def test_prodigy_matches_rule(kw: dict) -> None:
    grads = _grads(15)
    full = {
        "learning_rate": 1.0,
        "betas": (0.9, 0.999),
        "beta3": None,
        "eps": 1e-8,
        "estim_lr0": 1e-6,
        "estim_lr_coef": 1.0,
        "weight_decay": 0.0,
        "safeguard_warmup": False,
        **kw,
    }
    b1, b2 = full["betas"]
    b3 = full["beta3"] if full["beta3"] is not None else b2**0.5
    want = _prodigy_ref(
        grads,
        _flat(_p0()),
        full["learning_rate"],
        b1,
        b2,
        b3,
        full["eps"],
        full["estim_lr0"],
        full["estim_lr_coef"],
        full["weight_decay"],
        full["safeguard_warmup"],
    )
    got = _run(ft.prodigy(**kw), grads, _p0())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {
            "learning_rate": _lin,
            "betas": (0.5, 0.9),
            "eps": 1e-4,
            "estim_lr0": 1e-2,
            "weight_decay": 0.1,
        },
    ],
)
def test_dadapt_adamw_matches_rule(kw: dict) -> None:
    grads = _grads(15)
    full = {
        "learning_rate": 1.0,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "estim_lr0": 1e-6,
        "weight_decay": 0.0,
        **kw,
    }
    want = _dadapt_ref(
        grads,
        _flat(_p0()),
        full["learning_rate"],
        *full["betas"],
        full["eps"],
        full["estim_lr0"],
        full["weight_decay"],
    )
    got = _run(ft.dadapt_adamw(**kw), grads, _p0())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [ft.prodigy, ft.dadapt_adamw])
def test_pure_masked_bfloat16(make) -> None:
    tx = ft.masked(make(estim_lr0=1e-2), {"a": True, "b": False})
    p = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2)}
    g = {"a": torch.tensor([0.5, -2.0, 0.0], dtype=torch.bfloat16), "b": torch.ones(2)}
    state = tx.init(p)
    before = copy.deepcopy((g, state, p))
    for _ in range(3):
        u, state2 = tx.update(g, state, p)
    testing.assert_trees_all_equal((g, state, p), before, bitwise=True)
    assert u["a"].dtype == torch.bfloat16 and u["b"] is g["b"]
    assert state2.inner_state.estim_lr.dtype == torch.float32  # widened, not bfloat16
    # The same numbers as a float32 run, rounded once.
    ref = make(estim_lr0=1e-2)
    pf, gf = [p["a"].float()], [g["a"].float()]
    want, _ = ref.update(gf, ref.init(pf), pf)
    assert torch.equal(u["a"], want[0].to(torch.bfloat16))
    # The initial point is a copy: changing the live parameters in place leaves it alone.
    if make is ft.prodigy:
        p["a"].add_(1.0)
        assert torch.equal(state.inner_state.params0["a"], before[1].inner_state.params0["a"])


@pytest.mark.parametrize("make", [ft.prodigy, ft.dadapt_adamw])
def test_compiled_with_schedule_compiles_once(make) -> None:
    tx = make(ft.linear_schedule(1.0, 0.1, 6), weight_decay=0.1)
    params = {"w": torch.linspace(-1, 1, 6).reshape(3, 2), "b": torch.ones(2)}
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    se = sc = tx.init(params)
    with testing.assert_max_compiles(1):
        for i in range(6):
            g = {"w": torch.full((3, 2), 0.1 * (i - 2)) + 0.01, "b": torch.ones(2) * (i % 2 - 0.5)}
            ue, se = tx.update(g, se, params)
            uc, sc = compiled(g, sc, params)
            testing.assert_trees_all_close(uc, ue, rtol=1e-5, atol=1e-9)
            testing.assert_trees_all_close(sc.estim_lr, se.estim_lr, rtol=1e-5)


@pytest.mark.parametrize("make", [ft.prodigy, ft.dadapt_adamw])
def test_inject_hyperparams_and_train_step(make) -> None:
    tx = ft.inject_hyperparams(make)(learning_rate=1.0, estim_lr0=1e-3)
    assert_train_step_halves_loss(tx, init=0.0, steps=30)


def test_bad_arguments_complex_and_empty() -> None:
    with pytest.raises(ValueError, match=r"betas\[0\]"):
        ft.prodigy(betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="beta3"):
        ft.prodigy(beta3=1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        ft.dadapt_adamw(-1.0)
    with pytest.raises(ValueError, match="estim_lr0"):
        ft.dadapt_adamw(estim_lr0=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        ft.prodigy(weight_decay=-0.1)
    with pytest.raises(ValueError, match="eps"):
        ft.prodigy(eps=float("nan"))
    with pytest.raises(TypeError, match="betas"):
        ft.dadapt_adamw(betas=0.9)
    with pytest.raises(ValueError, match="needs params"):
        tx = ft.prodigy()
        tx.update([torch.ones(1)], tx.init([torch.ones(1)]))
    with pytest.raises(TypeError, match=r"params\[0\].*complex"):
        ft.dadapt_adamw().init([torch.ones(2, dtype=torch.complex64)])
    tx = ft.prodigy()
    state = tx.init({})
    u, new = tx.update({}, state, {})
    assert u == {} and int(new.count) == 1
