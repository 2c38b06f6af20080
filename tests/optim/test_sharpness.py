"""ft.sam and ft.normalize (optax.contrib's), against SAM written out by hand in float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

F64 = torch.float64
TARGET = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
SCALES = torch.tensor([1.0, 3.0, 0.5], dtype=F64)


def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """A non-quadratic loss, so the gradient at the perturbed point differs in direction."""
    d = p["w"] - TARGET
    return (SCALES * d**2).sum() + 0.1 * (d**4).sum() + (p["b"] ** 2).sum()


def init_params() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([2.0, 1.0, -1.0], dtype=F64), "b": torch.tensor([0.3], dtype=F64)}


def global_norm(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((x**2).sum() for x in g.values()))


def reference_sam(lr: float, rho: float, momentum: float, steps: int) -> dict[str, torch.Tensor]:
    """The paper's SAM: ascend ``rho·g/‖g‖``, take the gradient there, descend from the true
    weights (here with heavy-ball momentum, updated on outer steps only)."""
    p = init_params()
    buf = {k: torch.zeros_like(v) for k, v in p.items()}
    for _ in range(steps):
        g = torch.func.grad(loss)(p)
        n = global_norm(g)
        perturbed = {k: p[k] + rho * g[k] / n for k in p}
        g_adv = torch.func.grad(loss)(perturbed)
        buf = {k: momentum * buf[k] + g_adv[k] for k in p}
        p = {k: p[k] - lr * buf[k] for k in p}
    return p


def run(tx: ft.GradientTransformation, calls: int, params: Any = None) -> tuple[Any, Any]:
    p = init_params() if params is None else params
    state = tx.init(p)
    for _ in range(calls):
        g = torch.func.grad(loss)(p)
        u, state = tx.update(g, state, p)
        p = ft.apply_updates(p, u)
    return p, state


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_transparent_sam_is_the_papers_sam(momentum: float) -> None:
    tx = ft.sam(ft.sgd(0.05, momentum=momentum or None), ft.chain(ft.normalize(), ft.sgd(0.1)))
    got, state = run(tx, 2 * 7)
    testing.assert_trees_all_close(got, reference_sam(0.05, 0.1, momentum, 7), rtol=1e-12)
    assert int(state.steps_since_sync) == 0  # an outer step just ran: params are the true ones


def test_adversarial_call_moves_up_the_loss_and_keeps_the_true_weights() -> None:
    tx = ft.sam(ft.sgd(0.05), ft.chain(ft.normalize(), ft.sgd(0.1)))
    p0 = init_params()
    p1, state = run(tx, 1, p0)
    g = torch.func.grad(loss)(p0)
    n = global_norm(g)
    testing.assert_trees_all_close(p1, {k: p0[k] + 0.1 * g[k] / n for k in p0}, rtol=1e-14)
    testing.assert_trees_all_equal(state.cache, p0)
    assert float(loss(p1)) > float(loss(p0))


@pytest.mark.parametrize("reset_state", [True, False])
def test_longer_sync_period_against_a_hand_loop(reset_state: bool) -> None:
    """Three calls per SAM step: two adversarial steps by a momentum optimizer whose state is
    reset (or not) after each outer step."""
    lr, rho, beta = 0.05, 0.02, 0.5
    tx = ft.sam(ft.sgd(lr), ft.sgd(rho, momentum=beta), sync_period=3, reset_state=reset_state)
    got, _ = run(tx, 3 * 4)
    p = init_params()
    adv_buf = {k: torch.zeros_like(v) for k, v in p.items()}
    for _ in range(4):
        q = p
        for _ in range(2):
            g = torch.func.grad(loss)(q)
            adv_buf = {k: beta * adv_buf[k] + g[k] for k in p}
            q = {k: q[k] + rho * adv_buf[k] for k in p}
        g = torch.func.grad(loss)(q)
        p = {k: p[k] - lr * g[k] for k in p}
        # Without a reset the adversarial state goes on from the last adversarial call (the
        # outer call's adversarial update is discarded, as in optax).
        if reset_state:
            adv_buf = {k: torch.zeros_like(v) for k, v in p.items()}
    testing.assert_trees_all_close(got, p, rtol=1e-12)


def test_opaque_mode_equals_transparent_mode() -> None:
    adv = ft.chain(ft.normalize(), ft.sgd(0.1))
    opaque = ft.sam(ft.adam(0.05), adv, sync_period=3, opaque_mode=True)
    transparent = ft.sam(ft.adam(0.05), adv, sync_period=3)
    p_t, _ = run(transparent, 3 * 5)
    p = init_params()
    state = opaque.init(p)
    assert state.cache is None
    seen: list[int] = []

    def grad_fn(params: Any, i: int) -> Any:
        seen.append(i)
        return torch.func.grad(loss)(params)

    for _ in range(5):
        u, state = opaque.update(torch.func.grad(loss)(p), state, p, grad_fn=grad_fn)
        p = ft.apply_updates(p, u)
    assert seen == [0, 1] * 5
    testing.assert_trees_all_close(p, p_t, rtol=1e-12)


def test_train_step_runs_sam_and_does_not_corrupt_the_cache() -> None:
    """The donating step writes new params into the old ones' memory: the cache must be a copy."""
    x = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean() + 0.01 * (p["w"] ** 4).sum()

    tx = ft.sam(ft.sgd(0.05, momentum=0.9), ft.chain(ft.normalize(), ft.sgd(0.05)))
    params = {"w": torch.zeros(3, dtype=F64)}
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    batch = {"x": x, "y": y}
    for _ in range(10):
        state, _ = step(state, batch)
    p, s = {"w": torch.zeros(3, dtype=F64)}, tx.init(params)
    for _ in range(10):
        u, s = tx.update(torch.func.grad(loss_fn)(p, batch), s, p)
        p = ft.apply_updates(p, u)
    testing.assert_trees_all_close(state.params, p, rtol=1e-10, atol=1e-12)
    assert float(loss_fn(p, batch)) < float(loss_fn({"w": torch.zeros(3, dtype=F64)}, batch))


def test_nan_in_the_discarded_branch_does_not_leak() -> None:
    """At a zero gradient ``normalize`` gives 0/0; on the outer call that adversarial update is
    discarded, and optax's ``c·a + (1 − c)·b`` selection would still carry the NaN."""
    tx = ft.sam(ft.sgd(0.1), ft.chain(ft.normalize(), ft.sgd(0.1)))
    p = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    state = tx.init(p)
    u, state = tx.update({"w": torch.tensor([1.0, 0.0], dtype=F64)}, state, p)
    p = ft.apply_updates(p, u)
    u, state = tx.update({"w": torch.zeros(2, dtype=F64)}, state, p)
    testing.assert_tree_all_finite(u)
    testing.assert_trees_all_close(
        ft.apply_updates(p, u), {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    )


def test_update_is_pure_and_compiles_once() -> None:
    tx = ft.sam(ft.adam(ft.linear_schedule(0.1, 0.01, 6)), ft.chain(ft.normalize(), ft.sgd(0.05)))
    p = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    se = sc = tx.init(p)
    pe = pc = p
    with testing.assert_max_compiles(1):
        for i in range(6):
            g = {"w": torch.full((3, 2), 0.1 * (i - 2) + 0.05), "b": torch.ones(2)}
            before = ft.tree.map(torch.clone, (g, se, pe))
            ue, se_new = tx.update(g, se, pe)
            testing.assert_trees_all_equal((g, se, pe), before, bitwise=True)
            uc, sc = compiled(g, sc, pc)
            se = se_new
            pe, pc = ft.apply_updates(pe, ue), ft.apply_updates(pc, uc)
    testing.assert_trees_all_close(pc, pe, rtol=1e-6, atol=1e-7)


@given(st.floats(0.1, 100.0), st.integers(1, 6))
def test_normalize_gives_a_unit_vector(scale: float, n: int) -> None:
    g = [torch.linspace(-1.0, 2.0, n, dtype=F64) * scale, torch.full((2,), scale, dtype=F64)]
    out, _ = ft.normalize().update(g, ft.NormalizeState())
    assert math.isclose(float(ft.tree.norm(out)), 1.0, rel_tol=1e-12)
    testing.assert_trees_all_close(out, [x / float(ft.tree.norm(g)) for x in g], rtol=1e-12)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sync_period"):
        ft.sam(ft.sgd(0.1), ft.sgd(0.1), sync_period=0)
    with pytest.raises(TypeError, match="sync_period"):
        ft.sam(ft.sgd(0.1), ft.sgd(0.1), sync_period=True)
    with pytest.raises(ValueError, match="batch_axis_name"):
        ft.sam(ft.sgd(0.1), ft.sgd(0.1), batch_axis_name="batch")
    with pytest.raises(TypeError, match="adv_optimizer"):
        ft.sam(ft.sgd(0.1), object())
    tx = ft.sam(ft.sgd(0.1), ft.sgd(0.1), opaque_mode=True)
    p = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(p, tx.init(p), p)
    tx = ft.sam(ft.sgd(0.1), ft.sgd(0.1))
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))
