"""States derived with ``TrainState.replace`` share memory, so donation consumes them together."""

import pytest
import torch

import functrain as ft


def _setup(donate=True):
    params = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    tx = ft.adam(0.1)
    step = ft.make_train_step(lambda p, b: (p["w"] * b).sum(), tx, donate=donate)
    state = ft.TrainState.create(params=params, tx=tx)
    batch = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    return step, state, batch


def test_donating_the_source_consumes_a_replaced_copy():
    step, state, batch = _setup()
    sibling = state.replace(key=None)  # shares params and opt_state with `state`
    step(state, batch)
    assert sibling.consumed
    with pytest.raises(ft.ConsumedStateError, match="replace"):
        _ = sibling.params
    with pytest.raises(ft.ConsumedStateError):
        step(sibling, batch)


def test_donating_the_copy_consumes_its_source_and_relatives():
    step, state, batch = _setup()
    child = state.replace(extra={"note": torch.zeros(())})
    grandchild = child.replace(key=None)
    new_state, _ = step(grandchild, batch)
    for old in (state, child, grandchild):
        assert old.consumed
        with pytest.raises(ft.ConsumedStateError):
            ft.tree.leaves(old)
    assert not new_state.consumed
    assert int(new_state.step) == 1


def test_prepare_then_step_consumes_the_unprepared_state():
    step, state, batch = _setup()
    prepared = step.prepare(state)
    step(prepared, batch)
    with pytest.raises(ft.ConsumedStateError):
        _ = state.opt_state


def test_without_donation_every_relative_stays_intact():
    step, state, batch = _setup(donate=False)
    sibling = state.replace(key=None)
    before = sibling.params["w"].clone()
    new_state, _ = step(state, batch)
    assert not state.consumed and not sibling.consumed
    assert torch.equal(sibling.params["w"], before)
    assert not torch.equal(new_state.params["w"], before)


def test_a_copied_state_is_independent_of_the_donated_one():
    step, state, batch = _setup()
    copy = ft.tree.map(torch.clone, state)  # fresh tensors, so a fresh lease
    before = copy.params["w"].clone()
    step(state, batch)
    assert not copy.consumed
    assert torch.equal(copy.params["w"], before)
    _, metrics = step(copy, batch)
    assert torch.isfinite(metrics["loss"])


def test_successive_steps_are_not_consumed_by_their_predecessor():
    step, state, batch = _setup()
    for _ in range(3):
        state, _ = step(state, batch)
        state = state.replace(extra=dict(state.extra))
    assert int(state.step) == 3 and not state.consumed
