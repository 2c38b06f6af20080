"""Polyak step sizes against the formula in float64, plus the shared checks."""

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
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft


def _reference(g, loss, f_min, max_lr, eps, variant, scaling=1.0):
    """``−scaling·γ·g`` with γ from optax's chain: the norm is of the already scaled gradient."""
    flat = [scaling * x for t in g for x in t.flatten().tolist()]
    sq = sum(x * x for x in flat)
    gap = loss - f_min
    if variant == "sps+":
        gap = max(gap, 0.0)
    step = 0.0 if sq + eps <= 2.220446049250313e-16 else min(gap / (sq + eps), max_lr)
    return [-scaling * step * t for t in g]


@pytest.mark.parametrize(
    "f_min,max_lr,eps,variant,scaling,loss",
    [
        (0.0, 1.0, 0.0, "sps", 1.0, 3.0),
        (1.2, 0.5, 1e-3, "sps+", 0.7, 0.4),  # negative gap clipped to 0
        (1.2, 0.5, 1e-3, "sps", 0.7, 0.4),  # negative gap kept: an ascent step
        (0.0, 100.0, 0.0, "sps", 2.0, 5.0),
    ],
)
def test_matches_formula(f_min, max_lr, eps, variant, scaling, loss):
    tx = ft.polyak_sgd(max_lr, scaling, f_min, eps, variant)
    g = [
        torch.tensor([0.3, -1.0, 0.0], dtype=torch.float64),
        torch.tensor(0.2, dtype=torch.float64),
    ]
    u, _ = tx.update(g, tx.init(g), g, value=torch.tensor(loss, dtype=torch.float64))
    for a, b in zip(u, _reference(g, loss, f_min, max_lr, eps, variant, scaling)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_zero_gradient_gives_zero_step():
    tx = ft.scale_by_polyak()
    g = [torch.zeros(3, dtype=torch.float64)]
    u, _ = tx.update(g, tx.init(g), value=1.0)
    assert torch.equal(u[0], torch.zeros(3, dtype=torch.float64))
    assert not torch.isnan(u[0]).any()


@settings(max_examples=40, deadline=None)
@given(c=st.floats(1e-3, 1e3), loss=st.floats(0.0, 10.0))
def test_direction_is_scale_invariant(c, loss):
    """Scaling the gradient by c scales γ by 1/c² (below the cap): the update by 1/c."""
    tx = ft.scale_by_polyak(max_learning_rate=1e30)
    g = [torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)]
    u1, _ = tx.update(g, tx.init(g), value=loss)
    uc, _ = tx.update([c * g[0]], tx.init(g), value=loss)
    torch.testing.assert_close(uc[0] * c, u1[0], rtol=1e-12, atol=1e-300)


def test_missing_value_is_a_clear_error():
    tx = ft.polyak_sgd()
    g = [torch.ones(2)]
    with pytest.raises(TypeError, match="value=loss"):
        tx.update(g, tx.init(g), g)
    with pytest.raises(TypeError, match="single real number"):
        tx.update(g, tx.init(g), g, value=torch.ones(2))


def test_shared_properties():
    kw = {"value": torch.tensor(2.0, dtype=torch.float64)}
    check_pure(ft.polyak_sgd(), **kw)
    check_bfloat16(ft.polyak_sgd(), value=2.0)
    check_masked(ft.polyak_sgd(), **kw)
    check_compiles(ft.polyak_sgd(scaling=lambda c: 1.0 / (c + 1)), value=torch.tensor(2.0))
    check_train_step(ft.polyak_sgd(max_learning_rate=0.5))


def test_empty_tree():
    tx = ft.scale_by_polyak()
    assert tx.update({}, tx.init({}), value=1.0)[0] == {}


@pytest.mark.parametrize(
    "kwargs,err,name",
    [
        ({"max_learning_rate": -1.0}, ValueError, "max_learning_rate"),
        ({"eps": -1e-3}, ValueError, "eps"),
        ({"variant": "sps-"}, ValueError, "variant"),
        ({"f_min": float("inf")}, ValueError, "f_min"),
    ],
)
def test_bad_arguments(kwargs, err, name):
    with pytest.raises(err, match=name):
        ft.polyak_sgd(**kwargs)


def test_injectable_scaling():
    tx = ft.inject_hyperparams(ft.polyak_sgd)(scaling=0.5)
    g = [torch.tensor([2.0])]
    u, _ = tx.update(g, tx.init(g), g, value=1.0)  # γ = 1 / (0.5·2)² = 1 → −0.5·1·2
    torch.testing.assert_close(u[0], torch.tensor([-1.0]))


def test_python_float_loss_keeps_float64_precision() -> None:
    """A Python-float loss went through float32 first: 0.1 became 0.10000000149 in float64."""
    tx = ft.scale_by_polyak()
    g = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    u, _ = tx.update(g, tx.init(g), g, value=0.1)
    assert u["w"][0].item() == 0.1  # step = (0.1 - 0) / ‖g‖² = 0.1, times g = 1
