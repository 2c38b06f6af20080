"""SM3 against a hand-written float64 loop over row/column covers, plus the shared checks."""

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


def _reference_2d(grads, b1, b2, eps):
    """SM3-II for one matrix, element by element in Python floats."""
    rows, cols = len(grads[0]), len(grads[0][0])
    r_acc, c_acc = [0.0] * rows, [0.0] * cols
    m = [[0.0] * cols for _ in range(rows)]
    c = 1.0 if b2 == 1 else 1 - b2
    outs = []
    for g in grads:
        g = g.tolist()
        v = [
            [c * g[i][j] ** 2 + b2 * min(r_acc[i], c_acc[j]) for j in range(cols)]
            for i in range(rows)
        ]
        for i in range(rows):
            for j in range(cols):
                r = g[i][j] / math.sqrt(v[i][j] + eps) if v[i][j] > 0 else 0.0
                m[i][j] = (1 - b1) * r + b1 * m[i][j]
        r_acc = [max(v[i]) for i in range(rows)]
        c_acc = [max(v[i][j] for i in range(rows)) for j in range(cols)]
        outs.append([row[:] for row in m])
    return outs


@pytest.mark.parametrize("args", [(0.9, 1.0, 1e-8), (0.5, 0.9, 1e-3)])
def test_matches_reference_loop(args):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(8)]
    grads[0][1] = 0.0  # a zero row at the first step: ν = 0, the 0/0 = 0 convention
    grads[4] = -grads[3]
    tx = ft.scale_by_sm3(*args)
    state = tx.init(grads[0])
    for g, want in zip(grads, _reference_2d(grads, *args)):
        u, state = tx.update(g, state)
        torch.testing.assert_close(u, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_one_dim_leaf_is_adagrad_like():
    tx = ft.scale_by_sm3(b1=0.0)
    g = torch.tensor([3.0, 0.0, -1.0], dtype=torch.float64)
    state = tx.init(g)
    _, state = tx.update(g, state)
    u, _ = tx.update(g, state)
    want = g / torch.sqrt(2 * g * g + 1e-8)
    torch.testing.assert_close(u, torch.where(g == 0, 0.0, want), rtol=1e-12, atol=0)


def test_shared_properties():
    check_pure(ft.sm3(0.1))
    check_bfloat16(ft.sm3(0.1))
    check_masked(ft.sm3(0.1))
    check_compiles(ft.sm3(torch.tensor(0.1)))
    check_train_step(ft.sm3(0.5))


def test_state_layout_empty_and_complex():
    state = ft.scale_by_sm3().init({"k": torch.zeros(2, 3, 4), "s": torch.zeros(())})
    assert [m.shape for m in state.mu["k"]] == [(2,), (3,), (4,)] and state.mu["s"] == []
    tx = ft.sm3(0.1)
    assert tx.update({}, tx.init({}))[0] == {}
    with pytest.raises(ValueError, match=r"params\['z'\].*complex"):
        tx.init({"z": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize(
    "kwargs,name", [({"momentum": 1.5}, "b1"), ({"learning_rate": -1.0}, "learning_rate")]
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ft.sm3(**{"learning_rate": 0.1, **kwargs})


def test_injectable_learning_rate():
    tx = ft.inject_hyperparams(ft.sm3)(learning_rate=0.1, momentum=0.0)
    p = [torch.zeros(2)]
    u, _ = tx.update([torch.tensor([2.0, -0.5])], tx.init(p), p)
    torch.testing.assert_close(u[0], torch.tensor([-0.1, 0.1]))
