"""TrainState: creation, pytree registration, replace, consumption."""

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import functrain as ft


def _state(**kw):
    return ft.TrainState.create(
        params={"w": torch.ones(3), "b": torch.zeros(1)}, tx=ft.adam(1e-3), **kw
    )


def test_create_fields():
    params = {"w": torch.ones(3, requires_grad=True)}
    state = ft.TrainState.create(params=params, tx=ft.adam(1e-3), buffers={"m": torch.zeros(2)})
    assert state.step.dtype == torch.int64 and int(state.step) == 0
    assert not state.params["w"].requires_grad
    assert state.params["w"].data_ptr() != params["w"].data_ptr()  # copied by default
    assert isinstance(state.opt_state, tuple)
    assert state.key.device.type == "cpu" and state.extra == {}
    shared = ft.TrainState.create(params=params, tx=ft.sgd(0.1), copy=False, seed=None)
    assert shared.params["w"].data_ptr() == params["w"].data_ptr() and shared.key is None
    assert torch.equal(
        ft.TrainState.create(params=params, tx=ft.sgd(0.1), seed=3).key, ft.random_key(3)
    )


def test_create_rejects_non_tensor_params():
    with pytest.raises(TypeError, match=r"params\['n'\] must be a tensor"):
        ft.TrainState.create(params={"n": 1.0}, tx=ft.sgd(0.1))


def test_is_an_optree_and_torch_pytree():
    state = _state(buffers={"rm": torch.zeros(2)})
    paths, leaves, _ = ft.tree.flatten_with_paths(state)
    assert ("params", "w") in paths and ("buffers", "rm") in paths and ("step",) in paths
    doubled = ft.tree.map(lambda x: x * 2, state)
    assert isinstance(doubled, ft.TrainState) and torch.equal(
        doubled.params["w"], 2 * torch.ones(3)
    )
    assert optree.tree_structure(state) == optree.tree_structure(doubled)
    t_leaves, spec = torch_pytree.tree_flatten(state)
    assert len(t_leaves) == len(leaves)
    assert isinstance(torch_pytree.tree_unflatten(t_leaves, spec), ft.TrainState)


def test_replace():
    state = _state()
    new = state.replace(step=state.step + 5)
    assert int(new.step) == 5 and new.params is state.params
    with pytest.raises(TypeError, match="no fields"):
        state.replace(bogus=1)


def test_consumed_state_raises_everywhere():
    state = _state()
    state._consume("a test")
    assert state.consumed
    for name in ("step", "params", "opt_state", "buffers", "key", "extra"):
        with pytest.raises(ft.ConsumedStateError, match="consumed by a test"):
            getattr(state, name)
    with pytest.raises(ft.ConsumedStateError):
        ft.tree.leaves(state)
    with pytest.raises(ft.ConsumedStateError):
        state.replace()
    assert "consumed" in repr(state)
