"""conditionally_transform / conditionally_mask against hand-written per-step rules, with
device-side (tensor) conditions, compile, extra arguments and a train step."""

from __future__ import annotations

import copy

import pytest
import torch

import functrain as ft
from functrain import testing

F64 = torch.float64


def _grads(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = [torch.randn(4, generator=gen, dtype=F64) for _ in range(n)]
    out[2] = torch.zeros(4, dtype=F64)
    out[3] = -out[1]
    return out


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("python_bool", [False, True])
def test_momentum_only_on_chosen_steps(mask: bool, python_bool: bool) -> None:
    def cond(step: torch.Tensor):
        return bool(step % 3 == 1) if python_bool else step % 3 == 1

    wrap = ft.conditionally_mask if mask else ft.conditionally_transform
    tx = wrap(ft.trace(0.9), cond)
    state = tx.init([torch.zeros(4, dtype=F64)])
    m = [0.0] * 4
    for t, g in enumerate(_grads(10)):
        before = copy.deepcopy((g, state))
        u, new = tx.update([g], state)
        testing.assert_trees_all_equal((g, state), before, bitwise=True)
        state = new
        if t % 3 == 1:
            m = [0.9 * a + b for a, b in zip(m, g.tolist())]
            want = m
        else:
            want = [0.0] * 4 if mask else g.tolist()
        torch.testing.assert_close(u[0].tolist(), want, rtol=0, atol=1e-12)
        inner = state.inner_state
        torch.testing.assert_close(inner.trace[0].tolist(), m, rtol=0, atol=1e-12)
        assert int(state.step) == t + 1 and state.step.dtype == torch.int32


def test_rejected_step_does_not_leak_nan_and_keeps_dtypes() -> None:
    tx = ft.conditionally_transform(ft.scale_by_adam(), lambda step: step >= 1)
    p = [torch.zeros(2, dtype=torch.bfloat16)]
    state = tx.init(p)
    bad = [torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)]
    u, state = tx.update(bad, state)
    assert torch.equal(u[0].isnan(), bad[0].isnan()) and u[0][1] == 1  # passed through
    assert not state.inner_state.mu[0].isnan().any()  # the rejected adam state was discarded
    assert state.inner_state.mu[0].dtype == torch.bfloat16
    assert int(state.inner_state.count) == 0


def test_compiles_once_and_forward_extra_args() -> None:
    tx = ft.conditionally_mask(ft.adam(0.1), lambda step, flag: (step > 1) & flag, True)
    params = {"w": torch.ones(3)}
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    se = sc = tx.init(params)
    with testing.assert_max_compiles(1):
        for i in range(5):
            g, flag = {"w": torch.full((3,), 0.1 * (i + 1))}, torch.tensor(i != 3)
            ue, se = tx.update(g, se, params, flag=flag)
            uc, sc = compiled(g, sc, params, flag=flag)
            testing.assert_trees_all_close(uc, ue, rtol=1e-6, atol=1e-7)
            assert bool((ue["w"] == 0).all()) == (i <= 1 or i == 3)


def test_bad_arguments_and_train_step() -> None:
    with pytest.raises(TypeError, match="inner"):
        ft.conditionally_mask(0.1, lambda s: True)
    with pytest.raises(TypeError, match="should_transform_fn"):
        ft.conditionally_transform(ft.sgd(0.1), True)
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    tx = ft.conditionally_mask(ft.adam(0.1), lambda step: step % 2 == 0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params={"w": torch.zeros(3, dtype=F64)}, tx=tx))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
