"""Review regressions for :func:`functrain.sam` with ``sync_period=1``.

With one call per period there are no adversarial steps: every call is an outer step from the
current params, so SAM is its outer optimizer. The transparent update used to run that step
from the cache of the previous call (optax's order), so each step restarted from the params
before the last update. References: ``torch.optim.SGD`` trajectories in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

F64 = torch.float64


def _loss(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ w - y) ** 2).mean() + 0.1 * (w**4).sum()


def _torch_sgd(lr: float, momentum: float, x, y, n: int) -> torch.Tensor:
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr, momentum=momentum)
    for _ in range(n):
        opt.zero_grad()
        _loss(w, x, y).backward()
        opt.step()
    return w.detach()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=F64)
    return x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)


@settings(max_examples=15, deadline=None)
@given(
    lr=st.floats(0.01, 0.2),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    opaque=st.booleans(),
    reset_state=st.booleans(),
)
def test_sync_period_one_is_the_outer_optimizer(
    lr: float, momentum: float, opaque: bool, reset_state: bool
) -> None:
    x, y = _data()
    adv = ft.chain(ft.normalize(), ft.sgd(0.05))
    tx = ft.sam(
        ft.sgd(lr, momentum=momentum or None),
        adv,
        sync_period=1,
        reset_state=reset_state,
        opaque_mode=opaque,
    )
    w = torch.zeros(3, dtype=F64)
    state = tx.init(w)
    grad = torch.func.grad(_loss)
    for _ in range(6):
        kw = {"grad_fn": lambda p, i: grad(p, x, y)} if opaque else {}
        u, state = tx.update(grad(w, x, y), state, w, **kw)
        w = ft.apply_updates(w, u)
    testing.assert_trees_all_close(w, _torch_sgd(lr, momentum, x, y, 6), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sync_period_one_in_a_train_step(momentum: float) -> None:
    x, y = _data()
    tx = ft.sam(ft.sgd(0.05, momentum=momentum or None), ft.sgd(0.05), sync_period=1)
    step = ft.make_train_step(lambda p, b: _loss(p["w"], b["x"], b["y"]), tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params={"w": torch.zeros(3, dtype=F64)}, tx=tx))
    for _ in range(5):
        state, _ = step(state, {"x": x, "y": y})
    want = _torch_sgd(0.05, momentum, x, y, 5)
    testing.assert_trees_all_close(state.params["w"], want, rtol=1e-10, atol=1e-12)
