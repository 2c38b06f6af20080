"""Review of ``ft.tree.set`` on train states and ``ft.tree_map_params`` over ``ft.flatten``.

References are hand-computed float64 maths (Adam's first step) and the documented contract of
``TrainState.replace`` (copies that share tensors are consumed together).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import functrain as ft
from functrain import testing


def _loss(params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    x, y = batch
    return ((x @ params["w"] + params["b"] - y) ** 2).mean()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.zeros(2)}


def test_set_on_train_state_is_consumed_with_its_copy() -> None:
    # The copy ``set`` returns shares the params' memory with the original; a donating step
    # on the copy updates that memory in place, so the original must raise (as after
    # TrainState.replace) rather than silently hand back the updated tensors.
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.1)
    step = ft.make_train_step(_loss, tx, donate=True)
    state = ft.TrainState.create(params=_params(), tx=tx)
    lowered = ft.tree.set(state, learning_rate=torch.tensor(0.01))
    assert lowered.params["w"] is state.params["w"]  # shared, not copied
    w0, b0 = state.params["w"].clone(), state.params["b"].clone()
    new, _ = step(lowered, _batch())
    assert state.consumed
    with pytest.raises(ft.ConsumedStateError):
        _ = state.params
    # The step used the new learning rate: w - 0.01 * grad, the gradient by autograd.
    p = {"w": w0.clone().requires_grad_(), "b": b0.clone().requires_grad_()}
    _loss(p, _batch()).backward()
    assert p["w"].grad is not None
    testing.assert_trees_all_close(new.params["w"], w0 - 0.01 * p["w"].grad, rtol=1e-6)


def test_set_on_train_state_without_a_match_elsewhere_keeps_the_rest() -> None:
    tx = ft.inject_hyperparams(ft.adam)(learning_rate=0.1)
    state = ft.TrainState.create(params=_params(), tx=tx)
    out = ft.tree.set(state, learning_rate=torch.tensor(0.5))
    assert isinstance(out, ft.TrainState)
    assert out.opt_state.hyperparams["learning_rate"].item() == 0.5
    assert state.opt_state.hyperparams["learning_rate"].item() == pytest.approx(0.1)
    assert out.params is state.params and out.key is state.key


def test_tree_map_params_finds_the_moments_of_flatten() -> None:
    # flatten's init flattened the childless placeholder into an empty vector, so Adam's flat
    # moments were taken for non-params: f never ran on them and the cast did nothing.
    tx = ft.flatten(ft.adam(0.1))
    params = _params()
    g = torch.Generator().manual_seed(2)
    grads = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}
    _, state = tx.update(grads, tx.init(params), params)
    out = ft.tree_map_params(tx, lambda t: t.to(torch.float64), state)
    # The flat layout is the tree's leaf order (optree sorts dict keys: b, then w).
    flat_g = torch.cat([grads["b"], grads["w"].reshape(-1)]).double()
    assert out[0].mu.dtype == torch.float64 and out[0].nu.dtype == torch.float64
    testing.assert_trees_all_close(out[0].mu, 0.1 * flat_g, rtol=1e-6)  # (1 - b1) g
    testing.assert_trees_all_close(out[0].nu, 0.001 * flat_g**2, rtol=1e-6)  # (1 - b2) g²
    assert out[0].count.dtype == torch.int32 and out[0].count.item() == 1
    labels = ft.tree_map_params(tx, lambda _: "P", state, transform_non_params=lambda _: "N")
    assert (labels[0].count, labels[0].mu, labels[0].nu) == ("N", "P", "P")


def test_tree_map_params_through_masked_and_inject_over_flatten() -> None:
    params = _params()
    for tx in (
        ft.masked(ft.flatten(ft.adam(0.1)), {"w": True, "b": False}),
        ft.inject_hyperparams(lambda learning_rate: ft.flatten(ft.adam(learning_rate)))(
            learning_rate=0.1
        ),
    ):
        state = tx.init(params)
        out = ft.tree_map_params(tx, lambda _: "P", state, transform_non_params=lambda _: "N")
        adam = out.inner_state[0]
        assert (adam.count, adam.mu, adam.nu) == ("N", "P", "P")


def test_tree_map_params_on_a_checkpoint_restored_without_target_says_so(tmp_path: Any) -> None:
    tx = ft.adam(0.1)
    state = ft.TrainState.create(params=_params(), tx=tx)
    ft.checkpoint.save(tmp_path / "ck", state)
    plain = ft.checkpoint.restore(tmp_path / "ck")  # plain containers, no NamedTuples
    with pytest.raises(ft.tree.TreeMismatchError, match="restored with a target"):
        ft.tree_map_params(tx, lambda t: t, plain["opt_state"])
    restored = ft.checkpoint.restore(tmp_path / "ck", state)
    out = ft.tree_map_params(tx, lambda t: t.to(torch.float64), restored.opt_state)
    assert out[0].mu["w"].dtype == torch.float64 and out[0].count.dtype == torch.int32
