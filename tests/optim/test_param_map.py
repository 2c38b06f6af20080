"""``ft.tree_map_params`` (optax's ``tree_map_params``): states built by hand as references."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def _grads() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def _stepped(tx: ft.GradientTransformation) -> Any:
    """``tx``'s state after one real update, so that no moment is zero."""
    params = _params()
    _, state = tx.update(_grads(), tx.init(params), params)
    return state


def _double(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64) * 2


def test_adam_moments_doubled_by_hand() -> None:
    state = _stepped(ft.adam(0.1))
    grads = _grads()
    mu = {k: 0.1 * g.double() for k, g in grads.items()}  # (1 - b1) * g after one step
    nu = {k: 0.001 * g.double() ** 2 for k, g in grads.items()}  # (1 - b2) * g**2
    out = ft.tree_map_params(ft.adam(0.1), _double, state)
    testing.assert_trees_all_close(out[0].mu, {k: 2 * v for k, v in mu.items()}, rtol=1e-6)
    testing.assert_trees_all_close(out[0].nu, {k: 2 * v for k, v in nu.items()}, rtol=1e-6)
    assert out[0].mu["w"].dtype == torch.float64
    assert out[0].count is state[0].count  # untouched: the same object
    assert optree.tree_structure(out) == optree.tree_structure(state)


def test_sgd_momentum_trace_and_purity() -> None:
    tx = ft.sgd(0.1, momentum=0.9)
    state = _stepped(tx)
    before = copy.deepcopy(state)
    out = ft.tree_map_params(tx, lambda t: t * 2, state)
    testing.assert_trees_all_equal(out[0].trace, {k: 2 * g for k, g in _grads().items()})
    testing.assert_trees_all_equal(state, before)  # the input state is not modified


def _labelled(tx: ft.GradientTransformation, state: Any) -> list[tuple[str, str]]:
    """``(path, 'P' or 'N')`` for every leaf: mapped as params or as a non-param."""
    out = ft.tree_map_params(tx, lambda _: "P", state, transform_non_params=lambda _: "N")
    paths, leaves, _ = optree.tree_flatten_with_path(out)
    return [("/".join(map(str, p)), v) for p, v in zip(paths, leaves)]


# Each case: the transform and the number of params-shaped leaves (2 per params copy) and of
# non-param leaves its state has, counted from its documented state by hand.
_CASES: dict[str, tuple[Callable[[], ft.GradientTransformation], int, int]] = {
    "sgd_momentum": (lambda: ft.sgd(0.1, momentum=0.9), 2, 0),
    "adam": (lambda: ft.adam(0.1), 4, 1),
    "adamw": (lambda: ft.adamw(0.1, weight_decay=0.1), 4, 1),
    "clip_adamw": (lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(0.1)), 4, 1),
    # count, the 6 injected hyperparams, and adam's count
    "inject_adamw": (lambda: ft.inject_hyperparams(ft.adamw)(learning_rate=0.1), 4, 8),
    "lion": (lambda: ft.lion(0.1), 2, 1),
    "lamb": (lambda: ft.lamb(0.1), 4, 1),
    # mini_step, gradient_step, adam's count; adam's mu, nu and acc_grads
    "multi_steps": (lambda: ft.MultiSteps(ft.adam(0.1), 2), 6, 3),
    # v_row, v_col and v are params-shaped (unfactored leaves hold (1,) dummies, as optax)
    "adafactor": (lambda: ft.adafactor(0.1, min_dim_size_to_factor=2), 6, 1),
    # only the masked-in leaf has moments; masked-out ones are None (no leaf)
    "masked_tree": (lambda: ft.masked(ft.adam(0.1), {"w": True, "b": False}), 2, 1),
    "masked_fn": (
        lambda: ft.masked(ft.adam(0.1), lambda p: ft.tree.map(lambda x: x.ndim > 1, p)),
        2,
        1,
    ),
    "partition": (
        lambda: ft.partition(
            {"a": ft.adam(0.1), "s": ft.sgd(0.1, momentum=0.9)}, {"w": "a", "b": "s"}
        ),
        3,
        1,
    ),
}


@pytest.mark.parametrize("name", list(_CASES))
def test_params_and_non_params_split(name: str) -> None:
    make, n_params, n_other = _CASES[name]
    tx = make()
    state = _stepped(tx)
    labels = _labelled(tx, state)
    assert sum(v == "P" for _, v in labels) == n_params, labels
    assert sum(v == "N" for _, v in labels) == n_other, labels
    # f sees exactly the leaves shaped like a param, transform_non_params the rest.
    shapes = {(3, 4), (4,), (1,), (3,)}
    out = ft.tree_map_params(tx, lambda t: t.shape, state, transform_non_params=lambda _: None)
    assert all(s in shapes for s in optree.tree_leaves(out, none_is_leaf=False))


def test_inject_hyperparams_transform_non_params_only() -> None:
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=0.1)
    state = _stepped(tx)
    out = ft.tree_map_params(tx, lambda t: t, state, transform_non_params=lambda v: v * 0 - 1)
    for value in out.hyperparams.values():
        assert value.item() == -1
    assert out.count.item() == -1
    testing.assert_trees_all_equal(out.inner_state[0].mu, state.inner_state[0].mu)


def test_rest_trees_are_passed_to_f() -> None:
    tx = ft.adam(0.1)
    state = _stepped(tx)
    specs = {"w": "row", "b": "col"}
    out = ft.tree_map_params(tx, lambda _, spec: spec, state, specs)
    assert out[0].mu == specs and out[0].nu == specs


def test_masked_rest_needs_is_leaf() -> None:
    tx = ft.masked(ft.adam(0.1), {"w": True, "b": False})
    state = _stepped(tx)
    specs = {"w": "row", "b": "col"}
    with pytest.raises(ft.tree.TreeMismatchError, match="is_leaf"):
        ft.tree_map_params(tx, lambda _, spec: spec, state, specs)
    out = ft.tree_map_params(tx, lambda _, s: s, state, specs, is_leaf=lambda v: v is None)
    assert out.inner_state[0].mu == specs


def test_init_function_as_initable() -> None:
    tx = ft.sgd(0.1, momentum=0.9)
    state = _stepped(tx)
    out = ft.tree_map_params(tx.init, lambda t: t * 2, state)
    testing.assert_trees_all_equal(out[0].trace, {k: 2 * g for k, g in _grads().items()})


def test_init_that_inspects_tensors_raises() -> None:
    def init(params: Any) -> dict[str, Any]:
        return {"rows": params["w"].shape[0]}

    with pytest.raises(TypeError, match=r"tree_map_params.*maps over the params"):
        ft.tree_map_params(init, lambda t: t, {"rows": 3})


def test_init_with_per_leaf_list_raises() -> None:
    def init(params: Any) -> list[torch.Tensor]:
        return [torch.zeros_like(x) for x in ft.tree.leaves(params)]

    with pytest.raises(ft.tree.TreeMismatchError, match="must map over the params"):
        ft.tree_map_params(init, lambda t: t, init(_params()))


def test_state_of_another_transform_raises() -> None:
    with pytest.raises(ft.tree.TreeMismatchError, match="state"):
        ft.tree_map_params(ft.adam(0.1), lambda t: t, _stepped(ft.sgd(0.1, momentum=0.9)))


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(-4, 4, allow_nan=False), momentum=st.floats(0.0, 0.99))
def test_scaling_the_trace_matches_hand_maths(scale: float, momentum: float) -> None:
    tx = ft.sgd(0.1, momentum=momentum)
    state = _stepped(tx)
    out = ft.tree_map_params(tx, lambda t: t.double() * scale, state)
    expected = {k: g.double() * scale for k, g in _grads().items()}  # trace = g after step 1
    testing.assert_trees_all_close(out[0].trace, expected, rtol=1e-6, atol=1e-12)
