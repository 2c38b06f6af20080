"""NovoGrad against a hand-written float64 loop, plus the shared checks."""

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


def _reference(grads, params, b1, b2, eps, eps_root, wd):
    """Per leaf, in Python floats: optax's formulas (no (1 − b1), no bias correction)."""
    mu, nu, outs = None, None, []
    for t, g in enumerate(grads, 1):
        x = g.tolist()
        n = sum(v * v for v in x)
        nu = n if t == 1 else b2 * nu + (1 - b2) * n
        a = [v / (math.sqrt(nu + eps_root) + eps) + wd * p for v, p in zip(x, params.tolist())]
        mu = a if t == 1 else [b1 * m + ai for m, ai in zip(mu, a)]
        outs.append(mu)
    return outs


@pytest.mark.parametrize("args", [(0.9, 0.25, 1e-8, 0.0, 0.0), (0.5, 0.8, 1e-3, 1e-4, 0.01)])
def test_matches_reference_loop(args):
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(8)]
    grads[2] = torch.zeros(5, dtype=torch.float64)
    grads[5] = -grads[4]
    params = torch.randn(5, generator=gen, dtype=torch.float64)
    tx = ft.scale_by_novograd(*args)
    state = tx.init(params)
    for g, want in zip(grads, _reference(grads, params, *args)):
        u, state = tx.update(g, state, params)
        torch.testing.assert_close(u, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_shared_properties():
    check_pure(ft.novograd(0.1, weight_decay=0.01))
    check_bfloat16(ft.novograd(0.1))
    check_masked(ft.novograd(0.1, weight_decay=0.01))
    check_compiles(ft.novograd(lambda c: 0.1 / (c + 1), weight_decay=torch.tensor(0.01)))
    check_train_step(ft.novograd(0.1))


def test_state_layout_and_empty_tree():
    state = ft.scale_by_novograd(mu_dtype=torch.float64).init({"w": torch.zeros(2, 3)})
    assert state._fields == ("count", "mu", "nu")
    assert state.mu["w"].dtype == torch.float64 and state.nu["w"].shape == ()
    tx = ft.novograd(0.1)
    assert tx.update({}, tx.init({}), {})[0] == {}


def test_weight_decay_needs_params():
    tx = ft.scale_by_novograd(weight_decay=0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update([torch.ones(2)], tx.init([torch.ones(2)]))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"b1": 1.5}, "b1"),
        ({"b2": -0.1}, "b2"),
        ({"eps": -1.0}, "eps"),
        ({"eps_root": -1.0}, "eps_root"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ft.novograd(0.1, **kwargs)


def test_injectable_learning_rate():
    tx = ft.inject_hyperparams(ft.novograd)(learning_rate=0.1)
    p = [torch.zeros(2)]
    u, _ = tx.update([torch.tensor([3.0, 4.0])], tx.init(p), p)
    torch.testing.assert_close(u[0], torch.tensor([-0.06, -0.08]))
