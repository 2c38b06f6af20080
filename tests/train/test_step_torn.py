"""A donating step that fails while writing its update in place consumes its input.

A fused in-place update writes one dtype group (or chunk) after another; an exception between
two writes (a device running out of memory, say) leaves the donated parameters half-updated.
Such a state must not be handed back as usable: the step consumes it and says why. A step that
fails before any write keeps its promise to leave the input usable.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain.optim import _fused_engines


def _loss(params, batch):
    return ((params["a"].double() * batch).sum() + (params["b"] * batch).sum()) ** 2


def _state() -> ft.TrainState:
    # Two dtypes: the kernel engine updates them as two groups, one call each.
    params = {"a": torch.ones(3), "b": torch.ones(3, dtype=torch.float64)}
    return ft.TrainState.create(params=params, tx=ft.adamw(0.1))


def _fail_on_second_kernel_call(monkeypatch) -> list[int]:
    calls = [0]
    real = _fused_engines._call

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("simulated out of memory between two groups")
        return real(*args, **kwargs)

    monkeypatch.setattr(_fused_engines, "_call", flaky)
    return calls


def test_a_step_failing_between_in_place_writes_consumes_its_input(monkeypatch):
    step = ft.make_train_step(_loss, ft.adamw(0.1), donate=True)
    state = _state()
    leaves = dict(state.params)  # the donated memory, written in place
    before = {k: v.clone() for k, v in leaves.items()}
    calls = _fail_on_second_kernel_call(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated") as info:
        step(state, torch.ones(3, dtype=torch.float64))
    assert calls[0] == 2
    assert state.consumed
    assert any("half-updated" in note for note in info.value.__notes__)
    with pytest.raises(ft.ConsumedStateError, match="failed while updating it in place"):
        state.params
    # It was indeed torn: one group had been written before the failure, the other not.
    changed = [not torch.equal(leaves[k], before[k]) for k in leaves]
    assert sorted(changed) == [False, True]


def test_a_step_failing_before_any_write_leaves_its_input_usable():
    def bad_loss(params, batch):
        raise ValueError("bad batch")

    step = ft.make_train_step(bad_loss, ft.adamw(0.1), donate=True)
    state = _state()
    with pytest.raises(ValueError, match="bad batch"):
        step(state, torch.ones(3))
    assert not state.consumed
    good = ft.make_train_step(_loss, ft.adamw(0.1), donate=True)
    new_state, _ = good(state, torch.ones(3, dtype=torch.float64))
    assert int(new_state.step) == 1


def test_train_loop_hands_back_no_torn_state(monkeypatch):
    step = ft.make_train_step(_loss, ft.adamw(0.1), donate=True)
    state = _state()
    _fail_on_second_kernel_call(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated") as info:
        ft.train_loop(step, state, [torch.ones(3, dtype=torch.float64)] * 3, epochs=1)
    assert info.value.train_state is None
