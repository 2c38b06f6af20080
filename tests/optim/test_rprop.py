"""Rprop against a hand-written float64 loop and torch.optim.Rprop, plus the shared checks."""

from __future__ import annotations

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


def _grads(n: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(n)]
    for i in (0, 1, 5):
        out[i][0] = 0.0  # zeros: the "no sign test" branch
    out[4] = -out[3]  # a full sign flip
    return out


def _reference(grads, lr, em, ep, lo, hi):
    """Rprop− per element, in Python floats (the paper's rule, optax's state layout)."""
    n = len(grads[0])
    step, prev, outs = [lr] * n, [0.0] * n, []
    for g in grads:
        out = []
        for i, x in enumerate(g.tolist()):
            s = x * prev[i]
            if s != 0:
                step[i] = min(max(step[i] * (ep if s > 0 else em), lo), hi)
            u = 0.0 if s < 0 else step[i] * ((x > 0) - (x < 0))
            prev[i] = u
            out.append(u)
        outs.append(out)
    return outs


@pytest.mark.parametrize("args", [(0.01, 0.5, 1.2, 1e-6, 50.0), (0.05, 0.3, 1.7, 0.02, 0.08)])
def test_matches_reference_loop(args):
    tx = ft.scale_by_rprop(*args)
    state = tx.init(torch.zeros(6, dtype=torch.float64))
    for g, want in zip(_grads(), _reference(_grads(), *args)):
        u, state = tx.update(g, state)
        torch.testing.assert_close(u, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_matches_torch_rprop_trajectory():
    """Same trajectory as torch.optim.Rprop over 20 steps (lr inside the step bounds: PyTorch
    also clips the step size where no sign test happens, optax does not)."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(5, generator=g, dtype=torch.float64)

    def grad(w):
        return 2 * (w - target) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0], dtype=torch.float64)

    w_t = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Rprop([w_t], lr=0.03, etas=(0.4, 1.3), step_sizes=(1e-4, 0.2))
    tx = ft.rprop(0.03, 0.4, 1.3, 1e-4, 0.2)
    w = torch.zeros(5, dtype=torch.float64)
    state = tx.init(w)
    for _ in range(20):
        w_t.grad = grad(w_t.detach())
        opt.step()
        u, state = tx.update(grad(w), state, w)
        w = ft.apply_updates(w, u)
        torch.testing.assert_close(w, w_t.detach(), rtol=1e-12, atol=1e-14)


def test_shared_properties():
    tx = ft.rprop(0.01)
    check_pure(tx)
    check_bfloat16(tx)
    check_masked(tx)
    check_compiles(ft.rprop(torch.tensor(0.01)))
    check_train_step(ft.rprop(0.01))


def test_empty_tree_and_complex_refused():
    tx = ft.rprop(0.1)
    assert tx.update({}, tx.init({}))[0] == {}
    with pytest.raises(ValueError, match=r"params\['z'\].*complex"):
        tx.init({"z": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"learning_rate": 0.1, "eta_minus": -0.5}, "eta_minus"),
        ({"learning_rate": 0.1, "min_step_size": 1.0, "max_step_size": 0.5}, "min_step_size"),
        ({"learning_rate": float("nan")}, "learning_rate"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ft.rprop(**kwargs)


def test_no_schedule_and_injectable():
    with pytest.raises(TypeError, match="learning_rate"):
        ft.rprop(lambda c: 0.1)
    tx = ft.inject_hyperparams(ft.rprop)(learning_rate=0.1)
    p = torch.zeros(2)
    u, _ = tx.update(torch.ones(2), tx.init(p), p)
    torch.testing.assert_close(u, torch.full((2,), -0.1))
