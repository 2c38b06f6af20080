"""masked, partition, freeze, selective_transform, apply_if_finite and zero_nans.

References are the inner transforms run by hand on the sub-trees they should see.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch

import functrain as ft
from functrain import testing


def _tree(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {
        "enc": {
            "w": torch.randn(3, 4, generator=g, dtype=dtype),
            "b": torch.randn(4, generator=g, dtype=dtype),
        },
        "head": {
            "w": torch.randn(4, 2, generator=g, dtype=dtype),
            "b": torch.randn(2, generator=g, dtype=dtype),
        },
    }


def _clone(t):
    return ft.tree.map(lambda x: x.clone(), t)


def _run(tx, params, grads_list):
    state = tx.init(params)
    outs = []
    for grads in grads_list:
        u, state = tx.update(grads, state, params)
        outs.append(u)
        params = ft.apply_updates(params, u)
    return outs, state, params


def _check_pure(tx, params, grads, steps: int = 2):
    """Runs ``steps`` updates and checks that no input is modified."""
    state = tx.init(params)
    for _ in range(steps):
        before = (_clone(grads), _clone(state), _clone(params))
        _, new_state = tx.update(grads, state, params)
        testing.assert_trees_all_equal((grads, state, params), before)
        state = new_state


# --- masked -------------------------------------------------------------------------------


def test_masked_leaves_pass_through_and_others_match_inner():
    params, grads_list = _tree(0), [_tree(i) for i in range(1, 6)]
    mask = {"enc": {"w": True, "b": False}, "head": {"w": True, "b": False}}
    outs, state, _ = _run(ft.masked(ft.adam(0.1), mask), params, grads_list)

    sub = lambda t: {"enc": t["enc"]["w"], "head": t["head"]["w"]}  # noqa: E731
    ref_outs, _, _ = _run(ft.adam(0.1), sub(params), [sub(g) for g in grads_list])
    for out, ref, grads in zip(outs, ref_outs, grads_list):
        testing.assert_trees_all_equal(sub(out), ref)
        assert out["enc"]["b"] is grads["enc"]["b"] and out["head"]["b"] is grads["head"]["b"]
    # The inner state only covers the unmasked leaves.
    adam_state = state.inner_state[0]
    assert adam_state.mu["enc"]["b"] is None and adam_state.nu["head"]["b"] is None
    assert len(ft.tree.leaves(adam_state.mu)) == 2


def test_masked_prefix_and_callable_masks():
    params, grads = _tree(0), _tree(1)
    prefix = ft.masked(ft.scale(-2.0), {"enc": True, "head": False})
    u, _ = prefix.update(grads, prefix.init(params), params)
    testing.assert_trees_all_equal(u["enc"], ft.tree.scale(-2.0, grads["enc"]))
    testing.assert_trees_all_equal(u["head"], grads["head"])

    # Weight decay on matrices only, the typical use.
    by_rank = ft.masked(ft.scale(0.5), lambda t: ft.tree.map(lambda x: x.ndim > 1, t))
    u, _ = by_rank.update(grads, by_rank.init(params), params)
    testing.assert_trees_all_equal(u["head"]["w"], grads["head"]["w"] * 0.5)
    testing.assert_trees_all_equal(u["head"]["b"], grads["head"]["b"])

    everything = ft.masked(ft.scale(3.0), True)
    u, _ = everything.update(grads, everything.init(params), params)
    testing.assert_trees_all_equal(u, ft.tree.scale(3.0, grads))
    nothing = ft.masked(ft.adam(0.1), False)
    state = nothing.init(params)
    assert ft.tree.leaves(state) == [state.inner_state[0].count]
    u, _ = nothing.update(grads, state, params)
    testing.assert_trees_all_equal(u, grads)


def test_masked_passes_masked_params_and_extra_args():
    seen = {}

    def init(params):
        seen["init"] = params
        return ft.EmptyState()

    def update(updates, state, params=None, **extra):
        seen["params"], seen["extra"] = params, extra
        return updates, state

    inner = ft.GradientTransformation(init, update)
    params, grads = _tree(0), _tree(1)
    mask = {"enc": False, "head": True}
    tx = ft.masked(inner, mask, mask_compatible_extra_args=True)
    tx.update(grads, tx.init(params), params, tags=_tree(2), scalar=3)
    assert seen["init"]["enc"] is None and seen["params"]["enc"] is None
    assert seen["extra"]["tags"]["enc"] is None and seen["extra"]["tags"]["head"] is not None
    assert seen["extra"]["scalar"] == 3


def test_masked_bad_masks_name_the_path():
    params, grads = _tree(0), _tree(1)
    tx = ft.masked(ft.scale(1.0), {"enc": True, "tail": False})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"mask\['tail'\]|updates\['head'\]"):
        tx.init(params)
    with pytest.raises(TypeError, match=r"mask\['enc'\]\['[wb]'\].*bool"):
        ft.masked(ft.scale(1.0), ft.tree.map(lambda x: x.ndim, params))
    with pytest.raises(TypeError, match="bool"):
        ft.masked(ft.scale(1.0), {"enc": torch.ones(1), "head": True})
    good = ft.masked(ft.scale(1.0), {"enc": True, "head": False})
    state = good.init(params)
    with pytest.raises(ft.tree.TreeMismatchError, match="head"):
        good.update({"enc": grads["enc"]}, state, params)


# --- partition / multi_transform ------------------------------------------------------------


def test_partition_equals_each_transform_on_its_subtree():
    params, grads_list = _tree(0), [_tree(i) for i in range(1, 7)]
    labels = {"enc": {"w": "adam", "b": "sgd"}, "head": "adam"}
    txs = {"adam": ft.adam(0.05), "sgd": ft.sgd(0.1, momentum=0.9)}
    outs, state, _ = _run(ft.partition(txs, labels), params, grads_list)

    adam_part = lambda t: {"enc": t["enc"]["w"], "head": t["head"]}  # noqa: E731
    sgd_part = lambda t: t["enc"]["b"]  # noqa: E731
    ref_adam, _, _ = _run(ft.adam(0.05), adam_part(params), [adam_part(g) for g in grads_list])
    ref_sgd, _, _ = _run(
        ft.sgd(0.1, momentum=0.9), sgd_part(params), [sgd_part(g) for g in grads_list]
    )
    for out, ra, rs in zip(outs, ref_adam, ref_sgd):
        testing.assert_trees_all_equal(adam_part(out), ra)
        testing.assert_trees_all_equal(sgd_part(out), rs)
    assert set(state.inner_states) == {"adam", "sgd"}
    assert state.inner_states["sgd"].inner_state[0].trace["head"] is None
    assert ft.multi_transform is ft.partition and ft.MultiTransformState is ft.PartitionState


def test_partition_callable_labels_and_unused_transform():
    params, grads = _tree(0), _tree(1)
    label_fn = lambda t: ft.tree.map(lambda x: "matrix" if x.ndim > 1 else "vector", t)  # noqa: E731
    tx = ft.partition(
        {"matrix": ft.scale(-1.0), "vector": ft.set_to_zero(), "unused": ft.adam(1.0)}, label_fn
    )
    u, state = tx.update(grads, tx.init(params), params)
    testing.assert_trees_all_equal(u["enc"]["w"], -grads["enc"]["w"])
    testing.assert_trees_all_equal(u["enc"]["b"], torch.zeros(4, dtype=torch.float64))
    assert ft.tree.leaves(state.inner_states["unused"].inner_state[0].mu) == []


def test_partition_unknown_label_names_label_and_path():
    with pytest.raises(ValueError, match=r"param_labels\['head'\]\['b'\].*'bias'"):
        ft.partition({"w": ft.scale(1.0)}, {"head": {"w": "w", "b": "bias"}})
    tx = ft.partition({"w": ft.scale(1.0)}, lambda t: ft.tree.map(lambda x: "other", t))
    with pytest.raises(ValueError, match="'other'"):
        tx.init(_tree(0))
    with pytest.raises(TypeError, match="mapping"):
        ft.partition({}, {"a": "x"})


# --- freeze / selective_transform ------------------------------------------------------------


def test_freeze_zeroes_frozen_leaves():
    params, grads = _tree(0), _tree(1)
    tx = ft.chain(ft.freeze({"enc": True, "head": False}), ft.sgd(0.1))
    u, _ = tx.update(grads, tx.init(params), params)
    testing.assert_trees_all_equal(u["enc"], ft.tree.zeros_like(grads["enc"]))
    testing.assert_trees_all_equal(u["head"], ft.tree.scale(-0.1, grads["head"]))
    new = ft.apply_updates(params, u)
    testing.assert_trees_all_equal(new["enc"], params["enc"])

    all_frozen = ft.freeze(True)
    u, _ = all_frozen.update(grads, all_frozen.init(params), params)
    assert all(bool((x == 0).all()) for x in ft.tree.leaves(u))


def test_selective_transform_keeps_no_state_for_frozen_leaves():
    params, grads_list = _tree(0), [_tree(i) for i in range(1, 4)]
    tx = ft.selective_transform(ft.adam(0.1), freeze_mask={"enc": False, "head": True})
    outs, state, _ = _run(tx, params, grads_list)
    ref, _, _ = _run(ft.adam(0.1), params["enc"], [g["enc"] for g in grads_list])
    for out, r in zip(outs, ref):
        testing.assert_trees_all_equal(out["enc"], r)
        testing.assert_trees_all_equal(out["head"], ft.tree.zeros_like(params["head"]))
    assert state.inner_states["train"].inner_state[0].mu["head"] is None


# --- apply_if_finite ------------------------------------------------------------------------


def test_apply_if_finite_skips_keeps_state_counts_and_gives_up():
    params = {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    ok = {"w": torch.tensor([0.5, -0.25], dtype=torch.float64)}
    nan = {"w": torch.tensor([math.nan, 1.0], dtype=torch.float64)}
    inf = {"w": torch.tensor([1.0, math.inf], dtype=torch.float64)}
    inner = ft.adam(0.1)
    tx = ft.apply_if_finite(inner, max_consecutive_errors=2)
    state = tx.init(params)
    ref_state = inner.init(params)

    u, state = tx.update(ok, state, params)
    ref_u, ref_state = inner.update(ok, ref_state, params)
    testing.assert_trees_all_equal(u, ref_u)
    testing.assert_trees_all_equal(state.inner_state, ref_state)
    assert bool(state.last_finite) and int(state.notfinite_count) == 0

    for i, bad in enumerate([nan, inf], start=1):
        u, state = tx.update(bad, state, params)
        testing.assert_trees_all_equal(u, ft.tree.zeros_like(ok))
        testing.assert_trees_all_equal(state.inner_state, ref_state)  # bit for bit
        assert not bool(state.last_finite)
        assert (int(state.notfinite_count), int(state.total_notfinite)) == (i, i)

    # The third consecutive error exceeds max_consecutive_errors=2: applied anyway, as optax.
    u, state = tx.update(nan, state, params)
    forced_u, forced_state = inner.update(nan, ref_state, params)
    testing.assert_trees_all_equal(u, forced_u)
    testing.assert_trees_all_equal(state.inner_state, forced_state)
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (3, 3)

    # A finite update resets the consecutive count, not the total.
    _, state = tx.update(ok, state, params)
    assert (int(state.notfinite_count), int(state.total_notfinite), bool(state.last_finite)) == (
        0,
        3,
        True,
    )


def test_apply_if_finite_compiles_fullgraph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    params = {"w": torch.ones(3)}
    tx = ft.apply_if_finite(ft.sgd(0.1, momentum=0.9), max_consecutive_errors=1)
    counter = CompileCounter()
    step = torch.compile(tx.update, backend=counter, fullgraph=True)
    state_c = state_e = tx.init(params)
    for g in (
        [1.0, 2.0, 3.0],
        [math.nan, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [math.inf, 0.0, 0.0],
        [math.nan, 0.0, 0.0],
    ):
        grads = {"w": torch.tensor(g)}
        uc, state_c = step(grads, state_c, params)
        ue, state_e = tx.update(grads, state_e, params)
        testing.assert_trees_all_equal((uc, state_c), (ue, state_e))
    assert counter.frame_count == 1


def test_apply_if_finite_bad_arguments():
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        ft.apply_if_finite(ft.sgd(0.1), -1)
    with pytest.raises(TypeError, match="max_consecutive_errors"):
        ft.apply_if_finite(ft.sgd(0.1), 1.5)
    with pytest.raises(TypeError, match="GradientTransformation"):
        ft.apply_if_finite(lambda u: u, 1)


# --- zero_nans ------------------------------------------------------------------------------


def test_zero_nans_replaces_nans_only_and_records_them():
    params = {"a": torch.zeros(3), "b": torch.zeros(2)}
    tx = ft.zero_nans()
    state = tx.init(params)
    testing.assert_trees_all_equal(
        state.found_nan, {"a": torch.tensor(False), "b": torch.tensor(False)}
    )
    grads = {"a": torch.tensor([math.nan, 1.0, math.inf]), "b": torch.tensor([2.0, -3.0])}
    u, state = tx.update(grads, state, params)
    testing.assert_trees_all_equal(u, {"a": torch.tensor([0.0, 1.0, math.inf]), "b": grads["b"]})
    testing.assert_trees_all_equal(
        state.found_nan, {"a": torch.tensor(True), "b": torch.tensor(False)}
    )


# --- purity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.masked(
            ft.adamw(0.1, weight_decay=0.1), {"enc": True, "head": {"w": False, "b": True}}
        ),
        lambda: ft.partition(
            {"a": ft.adam(0.1), "s": ft.sgd(0.1, momentum=0.9)}, {"enc": "a", "head": "s"}
        ),
        lambda: ft.freeze({"enc": True, "head": False}),
        lambda: ft.selective_transform(ft.adam(0.1), freeze_mask={"enc": True, "head": False}),
        lambda: ft.apply_if_finite(ft.adam(0.1), 1),
        lambda: ft.zero_nans(),
    ],
    ids=["masked", "partition", "freeze", "selective", "apply_if_finite", "zero_nans"],
)
def test_wrappers_do_not_mutate_inputs(make):
    grads = _tree(1)
    grads["enc"]["b"][0] = math.nan  # exercises the non-finite paths too
    _check_pure(make(), _tree(0), grads)
    _check_pure(make(), _tree(0), _tree(2))


# --- torch.compile ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.masked(ft.adam(0.1), {"enc": {"w": True, "b": False}, "head": True}),
        # A callable mask; optree.tree_map keeps it traceable by Dynamo.
        lambda: ft.masked(ft.scale(0.5), lambda t: optree.tree_map(lambda x: x.ndim > 1, t)),
        lambda: ft.partition(
            {"a": ft.adam(0.1), "s": ft.sgd(0.1, momentum=0.9)}, {"enc": "a", "head": "s"}
        ),
        lambda: ft.freeze({"enc": True, "head": False}),
        lambda: ft.zero_nans(),
    ],
    ids=["masked", "masked_callable", "partition", "freeze", "zero_nans"],
)
def test_wrappers_compile_fullgraph_without_recompiling(make):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    tx = make()
    params = _tree(0, torch.float32)
    counter = CompileCounter()
    update = torch.compile(tx.update, backend=counter, fullgraph=True)
    state_c = state_e = tx.init(params)
    for seed in range(1, 4):
        grads = _tree(seed, torch.float32)
        u_c, state_c = update(grads, state_c, params)
        u_e, state_e = tx.update(grads, state_e, params)
        testing.assert_trees_all_close((u_c, state_c), (u_e, state_e), rtol=1e-6)
    assert counter.frame_count == 1
