"""Scaling transforms: fixed scales, learning rates, schedules, signs and trust ratios."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import testing


def _tree(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def test_scale_and_learning_rate_numbers() -> None:
    g = _tree()
    u, _ = ft.scale(0.5).update(g, ft.EmptyState())
    testing.assert_trees_all_equal(u, ft.tree.map(lambda x: x * 0.5, g))
    u, _ = ft.scale_by_learning_rate(0.1).update(g, ft.EmptyState())
    testing.assert_trees_all_equal(u, ft.tree.map(lambda x: x * -0.1, g))
    u, _ = ft.scale_by_learning_rate(0.1, flip_sign=False).update(g, ft.EmptyState())
    testing.assert_trees_all_equal(u, ft.tree.map(lambda x: x * 0.1, g))
    tx = ft.scale_by_learning_rate(None)
    testing.assert_trees_all_equal(tx.update(g, tx.init(g))[0], g)


def test_tensor_learning_rate_is_read_at_every_update() -> None:
    lr = torch.tensor(0.1)
    tx = ft.scale_by_learning_rate(lr)
    g = _tree()
    state = tx.init(g)
    u1, state = tx.update(g, state)
    lr.fill_(0.2)
    u2, state = tx.update(g, state)
    testing.assert_trees_all_close(u2, ft.tree.scale(2.0, u1), rtol=1e-6)
    testing.assert_trees_all_close(u1, ft.tree.scale(-0.1, g), rtol=1e-6)


def test_schedule_is_evaluated_before_the_increment() -> None:
    seen = []

    def schedule(count):
        seen.append(int(count))
        return 1.0 / (count + 1)

    tx = ft.scale_by_learning_rate(schedule)
    g = [torch.ones(2)]
    state = tx.init(g)
    outs = []
    for _ in range(4):
        u, state = tx.update(g, state)
        outs.append(float(u[0][0]))
    assert seen == [0, 1, 2, 3]
    assert outs == pytest.approx([-1.0, -0.5, -1 / 3, -0.25])
    assert state.count.dtype == torch.int32 and int(state.count) == 4


def test_scale_by_schedule_rejects_non_callables() -> None:
    with pytest.raises(TypeError, match="callable"):
        ft.scale_by_schedule(0.1)
    with pytest.raises(ValueError, match="step_size"):
        ft.scale(float("nan"))
    with pytest.raises(TypeError, match="learning_rate"):
        ft.scale_by_learning_rate("0.1")


def test_scale_by_sign() -> None:
    g = [torch.tensor([-2.0, 0.0, 3.0, -0.0]), torch.tensor([[1e-30]])]
    u, _ = ft.scale_by_sign().update(g, ft.EmptyState())
    testing.assert_trees_all_equal(u, [torch.sign(g[0]), torch.ones(1, 1)])


def test_scale_by_trust_ratio_matches_reference() -> None:
    g, p = _tree(0), _tree(1)
    p["b"] = torch.zeros(4)  # zero parameter norm: ratio 1
    tx = ft.scale_by_trust_ratio(trust_coefficient=0.5, eps=0.1)
    u, _ = tx.update(g, tx.init(p), p)
    expected = {
        "w": g["w"] * (0.5 * p["w"].norm() / (g["w"].norm() + 0.1)),
        "b": g["b"],
    }
    testing.assert_trees_all_close(u, expected, rtol=1e-6)
    # min_norm clips both norms from below.
    tx = ft.scale_by_trust_ratio(min_norm=100.0)
    u, _ = tx.update(g, tx.init(p), p)
    testing.assert_trees_all_close(u, g, rtol=1e-6)
    # A zero update stays zero.
    zero = ft.tree.zeros_like(g)
    testing.assert_trees_all_equal(
        ft.scale_by_trust_ratio().update(zero, ft.EmptyState(), p)[0], zero
    )


def test_param_block_scalings() -> None:
    g, p = _tree(0), _tree(1)
    u, _ = ft.scale_by_param_block_norm().update(g, ft.EmptyState(), p)
    testing.assert_trees_all_close(u, {k: g[k] * p[k].norm() for k in g}, rtol=1e-6)
    u, _ = ft.scale_by_param_block_rms().update(g, ft.EmptyState(), p)
    testing.assert_trees_all_close(u, {k: g[k] * p[k].square().mean().sqrt() for k in g}, rtol=1e-6)
    tiny = ft.tree.scale(0.0, p)
    u, _ = ft.scale_by_param_block_rms(min_scale=0.25).update(g, ft.EmptyState(), tiny)
    testing.assert_trees_all_close(u, ft.tree.scale(0.25, g), rtol=1e-6)


@pytest.mark.parametrize(
    "tx",
    [ft.scale_by_trust_ratio(), ft.scale_by_param_block_rms(), ft.scale_by_param_block_norm()],
)
def test_params_required_and_shapes_checked(tx) -> None:
    g = _tree()
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(g))
    bad = {"w": torch.zeros(3, 4), "b": torch.zeros(5)}
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['b'\]"):
        tx.update(g, tx.init(g), bad)
