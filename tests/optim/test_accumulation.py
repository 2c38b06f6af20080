"""``trace`` (momentum) and ``ema`` against plain recurrences."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import testing


def _grads(steps: int) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(4, 2, generator=gen, dtype=torch.float64)] for _ in range(steps)]


@pytest.mark.parametrize("nesterov", [False, True])
def test_trace_matches_recurrence(nesterov: bool) -> None:
    decay = 0.7
    grads = _grads(6)
    tx = ft.trace(decay, nesterov)
    state = tx.init([torch.zeros(4, 2, dtype=torch.float64)])
    t = torch.zeros(4, 2, dtype=torch.float64)
    for (g,) in grads:
        t = g + decay * t
        (u,), state = tx.update([g], state)
        testing.assert_trees_all_close(u, g + decay * t if nesterov else t, rtol=1e-14)
    testing.assert_trees_all_close(state.trace[0], t, rtol=1e-14)


def test_trace_accumulator_dtype() -> None:
    tx = ft.trace(0.9, accumulator_dtype=torch.bfloat16)
    state = tx.init([torch.zeros(3)])
    assert state.trace[0].dtype == torch.bfloat16
    (u,), state = tx.update([torch.ones(3)], state)
    assert u.dtype == torch.float32 and state.trace[0].dtype == torch.bfloat16


@pytest.mark.parametrize("debias", [True, False])
def test_ema_matches_recurrence(debias: bool) -> None:
    decay = 0.6
    grads = _grads(5)
    tx = ft.ema(decay, debias=debias)
    state = tx.init([torch.zeros(4, 2, dtype=torch.float64)])
    e = torch.zeros(4, 2, dtype=torch.float64)
    for t, (g,) in enumerate(grads, start=1):
        e = (1 - decay) * g + decay * e
        (u,), state = tx.update([g], state)
        testing.assert_trees_all_close(u, e / (1 - decay**t) if debias else e, rtol=1e-13)
    assert int(state.count) == 5
    testing.assert_trees_all_close(state.ema[0], e, rtol=1e-13)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="decay"):
        ft.ema(1.5)
    with pytest.raises(ValueError, match="decay"):
        ft.trace(float("inf"))
    tx = ft.trace(0.9)
    state = tx.init({"a": torch.zeros(2)})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['a'\].*\(3,\)"):
        tx.update({"a": torch.zeros(3)}, state)
