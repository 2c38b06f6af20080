"""Lookahead against the paper's two nested loops written by hand in float64, in a train step
(loss on ``params.fast``), through a checkpoint, compiled, and with bad arguments."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import testing


def _grads(n: int, shape: tuple[int, ...] = (5,)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(n)]
    out[2] = torch.zeros(shape, dtype=torch.float64)  # a zero gradient
    out[3] = -out[1]  # a sign flip
    return out


def _reference(p0: list[float], grads: list[torch.Tensor], lr: float, k: int, a: float) -> Any:
    """Zhang et al.'s loops per element: k SGD steps on fast, then slow += a·(fast − slow),
    fast = slow. Returns (fast, slow) after each step."""
    fast, slow, out = list(p0), list(p0), []
    for t, g in enumerate(grads):
        fast = [f - lr * gi for f, gi in zip(fast, g.tolist())]
        if (t + 1) % k == 0:
            slow = [s + a * (f - s) for s, f in zip(slow, fast)]
            fast = list(slow)
        out.append((list(fast), list(slow)))
    return out


@pytest.mark.parametrize(("k", "a"), [(3, 0.5), (1, 0.3), (2, 1.0), (4, 0.0)])
def test_matches_nested_loops(k: int, a: float) -> None:
    grads = _grads(12)
    p0 = torch.linspace(-1, 1, 5, dtype=torch.float64)
    tx = ft.lookahead(ft.sgd(0.1), sync_period=k, slow_step_size=a)
    params = ft.LookaheadParams.init_synced([p0])
    state = tx.init(params)
    for g, (want_fast, want_slow) in zip(grads, _reference(p0.tolist(), grads, 0.1, k, a)):
        u, state = tx.update([g], state, params)
        params = ft.apply_updates(params, u)
        torch.testing.assert_close(params.fast[0].tolist(), want_fast, rtol=0, atol=1e-12)
        torch.testing.assert_close(params.slow[0].tolist(), want_slow, rtol=0, atol=1e-12)


def test_reset_state_restarts_momentum_at_each_sync() -> None:
    grads, k = _grads(9), 3
    tx = ft.lookahead(ft.sgd(0.1, momentum=0.9), k, 0.5, reset_state=True)
    params = ft.LookaheadParams.init_synced([torch.zeros(5, dtype=torch.float64)])
    state = tx.init(params)
    fast, slow, m = [0.0] * 5, [0.0] * 5, [0.0] * 5
    for t, g in enumerate(grads):
        u, state = tx.update([g], state, params)
        params = ft.apply_updates(params, u)
        m = [0.9 * mi + gi for mi, gi in zip(m, g.tolist())]
        fast = [f - 0.1 * mi for f, mi in zip(fast, m)]
        if (t + 1) % k == 0:
            slow = [s + 0.5 * (f - s) for s, f in zip(slow, fast)]
            fast, m = list(slow), [0.0] * 5
        torch.testing.assert_close(params.fast[0].tolist(), fast, rtol=0, atol=1e-12)
        torch.testing.assert_close(params.slow[0].tolist(), slow, rtol=0, atol=1e-12)


def test_pure_and_bfloat16() -> None:
    tx = ft.lookahead(ft.adam(0.01), 2, 0.5)
    params = ft.LookaheadParams(
        fast=[torch.ones(4, dtype=torch.bfloat16)], slow=[torch.zeros(4, dtype=torch.bfloat16)]
    )
    g = [torch.full((4,), 0.5, dtype=torch.bfloat16)]
    state = tx.init(params)
    state = tx.update(g, state, params)[1]  # a non-sync step, then the sync step below
    before = copy.deepcopy((g, state, params))
    u, _ = tx.update(g, state, params)
    testing.assert_trees_all_equal((g, state, params), before, bitwise=True)
    assert u.fast[0].dtype == u.slow[0].dtype == torch.bfloat16
    new = ft.apply_updates(params, u)
    # Sync: slow = 0 + 0.5·(1 − 0.01 − 0) ≈ 0.495 (adam's second step is −lr·1), fast = slow.
    torch.testing.assert_close(new.slow[0].float(), torch.full((4,), 0.495), atol=4e-3, rtol=0)
    torch.testing.assert_close(new.fast[0], new.slow[0], atol=4e-3, rtol=0)


def test_compiled_update_matches_eager_without_recompiles() -> None:
    tx = ft.lookahead(ft.adam(ft.linear_schedule(0.1, 0.01, 6)), 3, 0.5, reset_state=True)
    params = ft.LookaheadParams.init_synced({"w": torch.ones(3, 2), "b": torch.zeros(2)})
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    se = sc = tx.init(params)
    pe = pc = params
    with testing.assert_max_compiles(1):
        for i in range(6):
            g = {"w": torch.full((3, 2), 0.1 * (i - 2)), "b": torch.ones(2)}
            ue, se = tx.update(g, se, pe)
            uc, sc = compiled(g, sc, pc)
            pe, pc = ft.apply_updates(pe, ue), ft.apply_updates(pc, uc)
    testing.assert_trees_all_close(pc, pe, rtol=1e-6, atol=1e-7)


def test_train_step_with_loss_on_fast_and_checkpoint(tmp_path: Any) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}

    def loss_fn(p: ft.LookaheadParams, b: Any) -> torch.Tensor:
        return ((b["x"] @ p.fast["w"] - b["y"]) ** 2).mean()

    params = ft.LookaheadParams.init_synced({"w": torch.zeros(3, dtype=torch.float64)})
    tx = ft.lookahead(ft.adam(0.1), 2, 0.5)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    # The step count is even: fast and slow have just been synchronised.
    testing.assert_trees_all_close(state.params.fast, state.params.slow, rtol=0, atol=1e-15)
    # The pure path, with the fast gradients only, gives the same parameters.
    p, s = params, tx.init(params)
    for _ in range(6):
        g = torch.func.grad(loss_fn)(p, batch)
        u, s = tx.update(g.fast, s, p)
        p = ft.apply_updates(p, u)
    testing.assert_trees_all_close(state.params, p, rtol=1e-10, atol=1e-12)
    ft.checkpoint.save(tmp_path / "c.safetensors", state)
    target = step.prepare(ft.TrainState.create(params=params, tx=tx))
    back = ft.checkpoint.restore(tmp_path / "c.safetensors", target)
    assert isinstance(back.params, ft.LookaheadParams)
    testing.assert_trees_all_equal(back.params, state.params, bitwise=True)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sync_period"):
        ft.lookahead(ft.sgd(0.1), 0, 0.5)
    with pytest.raises(TypeError, match="sync_period"):
        ft.lookahead(ft.sgd(0.1), 2.0, 0.5)
    with pytest.raises(ValueError, match="slow_step_size"):
        ft.lookahead(ft.sgd(0.1), 2, 1.5)
    with pytest.raises(TypeError, match="fast_optimizer"):
        ft.lookahead(0.1, 2, 0.5)
    tx = ft.lookahead(ft.sgd(0.1), 2, 0.5)
    p = [torch.zeros(2)]
    with pytest.raises(ValueError, match="LookaheadParams"):
        tx.update([torch.ones(2)], tx.init(p), p)


def test_empty_tree() -> None:
    tx = ft.lookahead(ft.adam(0.1), 2, 0.5)
    params = ft.LookaheadParams.init_synced({})
    u, state = tx.update({}, tx.init(params), params)
    assert u == ft.LookaheadParams({}, {})
    assert int(state.steps_since_sync) == 1
