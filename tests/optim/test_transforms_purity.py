"""Every transform and alias leaves its inputs bit-for-bit unchanged, and rejects updates whose
structure or shapes disagree with its state or params with an error naming the path."""

from __future__ import annotations

import pytest
import torch
from _transform_cases import ALL, example_grads, example_params

import functrain as ft
from functrain import testing

# These neither keep per-leaf state nor read params, so there is nothing to disagree with.
STRUCTURE_FREE = {
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_sign",
    "clip",
    "clip_by_global_norm",
    "clip_by_block_rms",
    "add_noise",
    "noisy_sgd",
    "sign_sgd",
}


def _clone(tree):
    return ft.tree.map(torch.clone, tree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_update_does_not_mutate_its_inputs(name: str, dtype: torch.dtype) -> None:
    lr = torch.tensor(0.1, dtype=dtype)
    tx = ALL[name](lr)
    params = example_params(dtype)
    state = tx.init(params)
    for grads in example_grads(3, dtype):
        inputs = (grads, state, params, lr)
        snapshot = _clone(inputs)
        updates, new_state = tx.update(grads, state, params)
        testing.assert_trees_all_equal(inputs, snapshot)
        testing.assert_trees_all_equal_structs(updates, grads)
        testing.assert_trees_all_equal_dtypes(updates, grads)
        params = ft.apply_updates(params, updates)
        state = new_state
    testing.assert_tree_all_finite(params)


@pytest.mark.parametrize("name", sorted(set(ALL) - STRUCTURE_FREE))
def test_mismatched_shapes_and_structures_name_the_path(name: str) -> None:
    tx = ALL[name](torch.tensor(0.1))
    params = example_params()
    state = tx.init(params)
    grads = example_grads(1)[0]
    wrong_shape = dict(grads, b=torch.zeros(5))
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['b'\]"):
        tx.update(wrong_shape, state, params)
    renamed = {"w": grads["w"], "b": grads["b"], "q": grads["k"]}
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['(k|q)'\]"):
        tx.update(renamed, state, params)
