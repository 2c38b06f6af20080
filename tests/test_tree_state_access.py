"""``ft.tree.get``, ``set``, ``get_all_with_path`` and ``map_params`` on real functrain states.

Expected values are written out by hand (state contents after ``init``, an AdamW step computed
in float64 in the test), never read back from the functions under test.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

Key = ft.tree.NamedTupleKey


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([1.0, -2.0], dtype=torch.float64), "b": torch.zeros(1)}


def test_adam_count_and_moments_are_read_by_name():
    tx = ft.adam(0.1)
    params = _params()
    state = tx.init(params)
    assert ft.tree.get(state, "count").dtype == torch.int32
    assert int(ft.tree.get(state, "count")) == 0
    grads = {"w": torch.tensor([0.5, 1.0], dtype=torch.float64), "b": torch.ones(1)}
    for _ in range(3):
        _, state = tx.update(grads, state, params)
    assert int(ft.tree.get(state, "count")) == 3
    mu = ft.tree.get(state, "mu")
    # three steps of a constant gradient: mu = (1 - 0.9**3) * g
    testing.assert_trees_all_close(
        mu["w"], torch.tensor([0.5, 1.0], dtype=torch.float64) * (1 - 0.9**3), rtol=1e-12
    )
    assert ft.tree.get(state, "ScaleByAdamState") is state[0]
    assert ft.tree.get(state, "EmptyState") == ft.EmptyState()
    assert ft.tree.get(state, "nope") is None
    assert ft.tree.get(state, "nope", default=7) == 7


def test_get_all_with_path_paths_name_the_named_tuples():
    state = ft.adam(0.1).init(_params())
    found = ft.tree.get_all_with_path(state, "count")
    assert [p for p, _ in found] == [(0, Key("ScaleByAdamState", "count"))]
    assert str(found[0][0][-1]) == "ScaleByAdamState.count"
    mu_w = ft.tree.get_all_with_path(state, "w")
    assert [p for p, _ in mu_w] == [
        (0, Key("ScaleByAdamState", "mu"), "w"),
        (0, Key("ScaleByAdamState", "nu"), "w"),
    ]


def test_inject_hyperparams_learning_rate_and_ambiguous_count():
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=0.1, weight_decay=0.01)
    state = tx.init(_params())
    lr = ft.tree.get(state, "learning_rate")
    assert lr.dtype == torch.float64 and float(lr) == 0.1
    with pytest.raises(KeyError, match=r"2 entries named 'count'") as err:
        ft.tree.get(state, "count")
    assert "tree.count" in str(err.value) and "tree.inner_state[0].count" in str(err.value)
    inner = Key("ScaleByAdamState", "count")
    got = ft.tree.get(state, "count", filtering=lambda path, _: path[-1] == inner)
    assert got is state.inner_state[0].count


def test_set_learning_rate_is_used_by_the_next_adamw_step():
    b1, b2, eps, wd, new_lr = 0.9, 0.999, 1e-8, 0.01, 0.25
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=0.1, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    w = [1.0, -2.0, 0.5]
    g = [0.3, -0.7, 2.0]
    params = {"w": torch.tensor(w, dtype=torch.float64)}
    state = tx.init(params)
    old_lr = state.hyperparams["learning_rate"]
    new_state = ft.tree.set(state, learning_rate=torch.tensor(new_lr, dtype=torch.float64))
    updates, _ = tx.update({"w": torch.tensor(g, dtype=torch.float64)}, new_state, params)
    # AdamW's first step by hand: mu_hat = g, nu_hat = g², u = -lr (g / (|g| + eps) + wd w).
    expected = []
    for gi, wi in zip(g, w):
        mu_hat = (1 - b1) * gi / (1 - b1)
        nu_hat = (1 - b2) * gi * gi / (1 - b2)
        expected.append(-new_lr * (mu_hat / (nu_hat**0.5 + eps) + wd * wi))
    testing.assert_trees_all_close(
        updates["w"], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0
    )
    # The old state is untouched.
    assert state.hyperparams["learning_rate"] is old_lr and float(old_lr) == 0.1
    assert new_state.hyperparams is not state.hyperparams


def test_set_replaces_every_match_and_never_mutates():
    tx = ft.inject_hyperparams(ft.adam)(learning_rate=0.1)
    state = tx.init(_params())
    before = copy.deepcopy(state)
    seven = torch.tensor(7, dtype=torch.int32)
    new = ft.tree.set(state, count=seven)
    assert new.count is seven and new.inner_state[0].count is seven
    assert new.inner_state[0].mu is state.inner_state[0].mu  # untouched parts are shared
    testing.assert_trees_all_equal(state, before)
    outer = Key("InjectHyperparamsState", "count")
    only_outer = ft.tree.set(state, lambda path, _: path[-1] == outer, count=seven)
    assert (
        only_outer.count is seven and only_outer.inner_state[0].count is state.inner_state[0].count
    )


def test_masked_and_partition_states():
    params = _params()
    masked = ft.masked(ft.adam(0.1), {"w": True, "b": False})
    state = masked.init(params)
    mu = ft.tree.get(state, "mu")
    assert mu["b"] is None and mu["w"].shape == (2,)
    zeros = {"w": torch.full((2,), 3.0, dtype=torch.float64), "b": None}
    new = ft.tree.set(state, mu=zeros)
    assert new.inner_state[0].mu is zeros and state.inner_state[0].mu is not zeros
    part = ft.partition({"a": ft.adam(0.1), "s": ft.sgd(0.1, momentum=0.9)}, {"w": "a", "b": "s"})
    pstate = part.init(params)
    assert int(ft.tree.get(pstate, "count")) == 0  # only adam counts
    assert ft.tree.get(pstate, "s") is pstate.inner_states["s"]
    assert len(ft.tree.get_all_with_path(pstate, "trace")) == 1


def test_train_state():
    ts = ft.TrainState.create(params=_params(), tx=ft.adam(0.1))
    assert int(ft.tree.get(ts, "count")) == 0
    # TrainState's own attributes are not names (as for flax's TrainState in optax).
    assert ft.tree.get(ts, "step") is None
    five = torch.tensor(5, dtype=torch.int32)
    new = ft.tree.set(ts, count=five)
    assert isinstance(new, ft.TrainState)
    assert new.opt_state[0].count is five and int(ts.opt_state[0].count) == 0
    assert new.params is ts.params


def test_errors_name_the_key():
    state = ft.adam(0.1).init(_params())
    with pytest.raises(KeyError, match="'learning_rate'"):
        ft.tree.set(state, learning_rate=0.5)
    with pytest.raises(KeyError, match="'count' that passes filtering"):
        ft.tree.set(state, lambda path, value: False, count=1)


def test_set_keeps_dict_types():
    tree = {"a": collections.OrderedDict([("z", 1.0), ("lr", 2.0)])}
    new = ft.tree.set(tree, lr=3.0)
    assert type(new["a"]) is collections.OrderedDict and list(new["a"]) == ["z", "lr"]
    assert new["a"]["lr"] == 3.0 and tree["a"]["lr"] == 2.0


def test_map_params_is_tree_map_params():
    tx = ft.adam(0.1)
    state = tx.init({"w": torch.ones(2)})
    wide = ft.tree.map_params(tx, lambda t: t.to(torch.float64), state)
    assert wide[0].mu["w"].dtype == torch.float64 and wide[0].count.dtype == torch.int32
    zeroed = ft.tree.map_params(tx, lambda t: t + 1, state, transform_non_params=lambda c: c + 5)
    assert int(zeroed[0].count) == 5
    testing.assert_trees_all_equal(zeroed[0].nu, {"w": torch.ones(2)})


class Node(NamedTuple):
    lr: Any
    other: Any


_NAMES = st.sampled_from(["lr", "x", "Node"])
_TREES = st.recursive(
    st.floats(-10, 10, allow_nan=False) | st.none(),
    lambda kids: (
        st.dictionaries(_NAMES, kids, max_size=3)
        | st.lists(kids, max_size=3)
        | st.tuples(kids, kids).map(lambda t: Node(*t))
    ),
    max_leaves=12,
)


@given(_TREES, st.sampled_from(["lr", "x"]))
def test_set_replaces_exactly_what_get_all_with_path_finds(tree, key):
    sentinel = "SENTINEL"
    found = ft.tree.get_all_with_path(tree, key)
    before = copy.deepcopy(tree)
    if not found:
        with pytest.raises(KeyError, match=repr(key)):
            ft.tree.set(tree, **{key: sentinel})
        return
    new = ft.tree.set(tree, **{key: sentinel})
    assert tree == before  # not mutated
    after = ft.tree.get_all_with_path(new, key)
    assert after and all(v == sentinel for _, v in after)
    # The outermost matches keep their paths.
    outer = {p for p, _ in found} & {p for p, _ in after}
    assert outer == {p for p, _ in after}
