"""Mechanic (wrapping SGD) and COCOB-Backprop against their rules written per element in
float64, with purity, masks, bfloat16, compile, a train step and bad arguments."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from _two_leaf_reference import assert_compiles_once_like_eager, assert_train_step_halves_loss
from _two_leaf_reference import flat as _flat
from _two_leaf_reference import grads as two_leaf_grads
from _two_leaf_reference import p0 as _p0
from _two_leaf_reference import run as _run

import functrain as ft
from functrain import testing

F64 = torch.float64


def _grads(n: int) -> list[list[torch.Tensor]]:
    return two_leaf_grads(n, seed=2, zero_leaf=1)


def _mechanic_sgd_ref(grads, p0, lr, wd, eps, s_init, k):
    """Mechanic around sgd(lr): its base update is −lr·g."""
    n = len(p0)
    betas = [1 - 0.1**i for i in range(1, k + 1)]
    r, m, v, s = [0.0] * k, [0.0] * k, [0.0] * k, [s_init] * k
    x, x0, out = list(p0), list(p0), []
    for gt in grads:
        g = _flat(gt)
        ssum = sum(s)
        gn, pn = math.sqrt(sum(a * a for a in g)), math.sqrt(sum(a * a for a in x))
        gw = [g[i] + wd * ssum * gn / (pn + eps) * x[i] for i in range(n)]
        dprev = [(x0[i] - x[i]) / (ssum + eps) for i in range(n)]
        delta = [dprev[i] + lr * g[i] for i in range(n)]
        h = sum(gw[i] * dprev[i] for i in range(n))
        for j in range(k):
            clipped = min(max(h, -m[j]), m[j])
            m[j] = max(betas[j] * m[j], abs(h) + eps)
            v[j] = betas[j] ** 2 * v[j] + h * h
            r[j] = betas[j] * r[j] + clipped * s[j]
            s[j] = (s_init / k * m[j] + max(r[j], 0.0)) / (math.sqrt(v[j]) + eps)
        x = [x0[i] - sum(s) * delta[i] for i in range(n)]
        out.append(list(x))
    return out


def _cocob_ref(grads, p0, alpha, eps, lr):
    n = len(p0)
    big, tot, rew, cum, x, out = [eps] * n, [0.0] * n, [0.0] * n, [0.0] * n, list(p0), []
    for gt in grads:
        g = [lr * a for a in _flat(gt)]
        for i in range(n):
            big[i] = max(big[i], abs(g[i]))
            tot[i] += abs(g[i])
            rew[i] = max(rew[i] - g[i] * (x[i] - p0[i]), 0.0)
            cum[i] -= g[i]
        x = [
            p0[i] + cum[i] / (big[i] * max(tot[i] + big[i], alpha * big[i])) * (big[i] + rew[i])
            for i in range(n)
        ]
        out.append(list(x))
    return out


@pytest.mark.parametrize(
    "lr, wd, eps, s_init, k",
    [(1.0, 1e-2, 1e-8, 1e-6, 6), (0.5, 0.0, 1e-6, 1e-2, 3), (2.0, 0.3, 1e-8, 1e-4, 1)],
)
def test_mechanize_sgd_matches_rule(lr, wd, eps, s_init, k) -> None:
    grads = _grads(15)
    want = _mechanic_sgd_ref(grads, _flat(_p0()), lr, wd, eps, s_init, k)
    got = _run(ft.mechanize(ft.sgd(lr), wd, eps, s_init, k), grads, _p0())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("alpha, eps, lr", [(100.0, 1e-8, 1.0), (2.0, 1e-3, 0.5), (10.0, 1.0, 3.0)])
def test_cocob_matches_rule(alpha, eps, lr) -> None:
    grads = _grads(15)
    want = _cocob_ref(grads, _flat(_p0()), alpha, eps, lr)
    got = _run(ft.cocob(lr, alpha, eps), grads, _p0())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_mechanize_restarts_from_first_update_params() -> None:
    """x0 is the parameters of the first update, not of init (pretrained weights loaded later)."""
    tx = ft.mechanize(ft.sgd(1.0))
    state = tx.init([torch.zeros(2, dtype=F64)])
    params = [torch.tensor([1.0, 2.0], dtype=F64)]
    _, state = tx.update([torch.ones(2, dtype=F64)], state, params)
    assert torch.equal(state.x0[0], params[0])


@pytest.mark.parametrize(
    "make", [lambda: ft.mechanize(ft.adam(1.0), num_betas=2), ft.scale_by_cocob]
)
def test_pure_masked_bfloat16(make) -> None:
    tx = ft.masked(make(), {"a": True, "b": False})
    p = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.ones(2)}
    g = {"a": torch.tensor([0.5, -2.0, 0.0], dtype=torch.bfloat16), "b": torch.ones(2)}
    state = tx.init(p)
    before = copy.deepcopy((g, state, p))
    u, new = tx.update(g, state, p)
    u, new = tx.update(g, new, ft.apply_updates(p, u))
    testing.assert_trees_all_equal((g, state, p), before, bitwise=True)
    assert u["a"].dtype == torch.bfloat16 and u["b"] is g["b"]
    assert all(x.dtype == y.dtype for x, y in zip(ft.tree.leaves(new), ft.tree.leaves(state)))


@pytest.mark.parametrize(
    "tx",
    [
        ft.mechanize(ft.adam(ft.linear_schedule(1.0, 0.1, 6))),
        ft.cocob(ft.linear_schedule(1.0, 0.1, 6), weight_decay=0.1),
    ],
)
def test_compiled_with_schedule_compiles_once(tx) -> None:
    assert_compiles_once_like_eager(tx, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.mechanize(ft.inject_hyperparams(ft.adam)(learning_rate=1.0)),
        lambda: ft.inject_hyperparams(ft.cocob)(learning_rate=1.0, alpha=10.0),
    ],
)
def test_inject_hyperparams_and_train_step(make) -> None:
    tx = make()
    assert_train_step_halves_loss(tx, init=0.1, steps=40)


def test_bad_arguments_complex_and_empty() -> None:
    with pytest.raises(ValueError, match="num_betas"):
        ft.mechanize(ft.sgd(1.0), num_betas=0)
    with pytest.raises(ValueError, match="s_init"):
        ft.mechanize(ft.sgd(1.0), s_init=0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        ft.mechanize(ft.sgd(1.0), weight_decay=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        ft.scale_by_cocob(alpha=0.0)
    with pytest.raises(ValueError, match="eps"):
        ft.cocob(eps=-1e-8)
    with pytest.raises(ValueError, match="needs params"):
        tx = ft.scale_by_cocob()
        tx.update([torch.ones(1)], tx.init([torch.ones(1)]))
    with pytest.raises(TypeError, match=r"params\[0\].*complex"):
        ft.scale_by_cocob().init([torch.ones(2, dtype=torch.complex64)])
    for tx in (ft.mechanize(ft.sgd(1.0)), ft.scale_by_cocob()):
        u, _ = tx.update({}, tx.init({}), {})
        assert u == {}
