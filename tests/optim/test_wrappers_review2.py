"""Second review of the optimizer wrappers against optax's semantics.

Every expected number is worked out by hand in float64 from optax's definitions (``masked``,
``multi_transform``, ``MultiSteps``, ``apply_if_finite``, ``zero_nans``, ``inject_hyperparams``,
``apply_updates``); none is produced by the code under test. The last test checks that each
wrapper follows the same trajectory in the donating (in-place) train step as in the pure one.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import functrain as ft
from functrain import testing

F64 = torch.float64
NAN = math.nan


def _t(*values: float, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _params() -> dict[str, Any]:
    return {"a": _t(1.0, -2.0), "b": {"c": _t(0.5), "d": _t(3.0)}}


def _grads(scale: float = 1.0) -> dict[str, Any]:
    return {"a": _t(0.5, 0.25) * scale, "b": {"c": _t(2.0) * scale, "d": _t(-1.0) * scale}}


def _close(got: Any, want: Any) -> None:
    testing.assert_trees_all_close(got, want, rtol=1e-14, atol=0.0)


def _snapshot(t: Any) -> Any:
    return ft.tree.map(lambda x: x.clone(), t)


def _bitwise_equal(a: Any, b: Any) -> bool:
    try:
        testing.assert_trees_all_equal(a, b, bitwise=True)
    except AssertionError:
        return False
    return True


# --- masked -------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["tree", "callable", "reordered"])
def test_masked_prefix_mask_passes_out_leaves_through_and_keeps_no_state_for_them(form):
    # optax: inner = sgd(0.1, momentum=0.9) runs on the subtree "b" only (a boolean covers a
    # whole dict); "a" passes through unchanged and the inner state has no entry for it
    # (MaskedNode in optax, None here). Trace: t1 = g1, t2 = g2 + 0.9·t1; update = −0.1·t.
    seen = []

    def mask_fn(tree_: Any) -> dict[str, bool]:
        seen.append(tree_)
        return {"a": False, "b": True}

    mask = {
        "tree": {"a": False, "b": True},
        "callable": mask_fn,
        "reordered": {"b": True, "a": False},  # dict order must not matter (keys are matched)
    }[form]
    tx = ft.masked(ft.sgd(0.1, momentum=0.9), mask)
    params = _params()
    state = tx.init(params)
    g1, g2 = _grads(1.0), _grads(-3.0)
    u1, state = tx.update(g1, state, params)
    u2, state = tx.update(g2, state, params)
    _close(u1, {"a": g1["a"], "b": {"c": _t(-0.2), "d": _t(0.1)}})
    # t2 = −3·g + 0.9·g = −2.1·g  →  update = 0.21·g.
    _close(u2, {"a": g2["a"], "b": {"c": _t(0.42), "d": _t(-0.21)}})
    leaves = ft.tree.leaves(state.inner_state)
    assert all(x.shape != (2,) for x in leaves)  # nothing the size of "a" is kept
    trace = state.inner_state[0].trace
    assert trace["a"] is None
    _close(trace["b"], {"c": _t(-4.2), "d": _t(2.1)})
    if form == "callable":
        # Called on the params in init and on the updates in update (as in optax).
        assert seen[0] is params and seen[1] is g1 and seen[2] is g2


def test_masked_nested_inside_masked_applies_the_intersection():
    # Outer mask keeps "b"; inner mask (over the full tree) keeps "a" and "b.d": only "b.d" is
    # transformed. Outer-masked-out leaves reach the inner wrapper as empty subtrees.
    inner = ft.masked(ft.scale(-0.5), {"a": True, "b": {"c": False, "d": True}})
    tx = ft.masked(inner, {"a": False, "b": True})
    g = _grads()
    u, _ = tx.update(g, tx.init(_params()), _params())
    _close(u, {"a": g["a"], "b": {"c": _t(2.0), "d": _t(0.5)}})


# --- partition / freeze -------------------------------------------------------------------


def test_partition_label_without_parameters_keeps_an_empty_state():
    # optax allows a transform whose label no leaf carries; its masked state holds no tensor
    # the size of a parameter, and the other transform sees every leaf.
    tx = ft.partition({"x": ft.sgd(0.1), "y": ft.adam(0.1)}, {"a": "x", "b": "x"})
    params = _params()
    state = tx.init(params)
    g = _grads()
    for _ in range(2):
        u, state = tx.update(g, state, params)
        _close(u, ft.tree.map(lambda x: -0.1 * x, g))
    adam_state = state.inner_states["y"].inner_state[0]
    assert adam_state.mu == {"a": None, "b": None} and adam_state.nu == {"a": None, "b": None}


@pytest.mark.parametrize("callable_labels", [False, True])
def test_partition_unknown_label_is_a_clear_error(callable_labels):
    labels = {"a": "x", "b": {"c": "x", "d": "nope"}}
    with pytest.raises(ValueError, match=r"param_labels\['b'\]\['d'\].*'nope'"):
        tx = ft.partition({"x": ft.sgd(0.1)}, (lambda t: labels) if callable_labels else labels)
        tx.init(_params())


def test_partition_prefix_labels_and_freeze_by_hand():
    # "fast" covers the whole dict "b" (a prefix label); freeze zeroes "a" and "b.c" only.
    tx = ft.chain(
        ft.freeze({"a": True, "b": {"c": True, "d": False}}),
        ft.partition({"fast": ft.scale(-1.0), "slow": ft.scale(-0.01)}, {"a": "slow", "b": "fast"}),
    )
    g = _grads()
    u, _ = tx.update(g, tx.init(_params()), _params())
    _close(u, {"a": _t(0.0, 0.0), "b": {"c": _t(0.0), "d": _t(1.0)}})


# --- MultiSteps ---------------------------------------------------------------------------


def test_multisteps_callable_schedule_counters_and_has_updated():
    # k = 2 for the first gradient step, then 3. Grads 1..8 into sgd(1.0): the inner sees the
    # means (1+2)/2 = 1.5, (3+4+5)/3 = 4 and (6+7+8)/3 = 7.
    ms = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=lambda step: 2 if int(step) == 0 else 3)
    params = {"w": _t(0.0)}
    state = ms.init(params)
    got = []
    for i in range(1, 9):
        u, state = ms.update({"w": _t(float(i))}, state, params)
        got.append(
            (
                float(u["w"]),
                int(state.mini_step),
                int(state.gradient_step),
                bool(ms.has_updated(state)),
            )
        )
    assert got == [
        (0.0, 1, 0, False),
        (-1.5, 0, 1, True),
        (0.0, 1, 1, False),
        (0.0, 2, 1, False),
        (-4.0, 0, 2, True),
        (0.0, 1, 2, False),
        (0.0, 2, 2, False),
        (-7.0, 0, 3, True),
    ]
    assert state.mini_step.device.type == "cpu" and state.gradient_step.dtype == torch.int32


def test_multisteps_with_apply_if_finite_inside_skips_the_whole_nan_cycle():
    # k = 2. Cycle 1 accumulates mean(1, NaN) = NaN: apply_if_finite (inside) rejects it, so the
    # update is 0 but the cycle still ends (gradient_step 1). Cycle 2: mean(1, 3) = 2 → −2.
    ms = ft.MultiSteps(ft.apply_if_finite(ft.sgd(1.0), max_consecutive_errors=1), 2)
    params = {"w": _t(0.0)}
    state = ms.init(params)
    got = []
    for v in (1.0, NAN, 1.0, 3.0):
        u, state = ms.update({"w": _t(v)}, state, params)
        got.append((float(u["w"]), int(state.mini_step), int(state.gradient_step)))
    assert got == [(0.0, 1, 0), (0.0, 0, 1), (0.0, 1, 1), (-2.0, 0, 2)]
    assert int(state.inner_opt_state.total_notfinite) == 1


def test_multisteps_with_apply_if_finite_outside_drops_only_the_nan_mini_step():
    # apply_if_finite outside: the NaN mini-step is rejected before MultiSteps sees it (its
    # state, mid-cycle, is kept), so the cycle completes with the next finite mini-step:
    # mean(1, 3) = 2 → −2.
    tx = ft.apply_if_finite(ft.MultiSteps(ft.sgd(1.0), 2).gradient_transformation(), 1)
    params = {"w": _t(0.0)}
    state = tx.init(params)
    got = []
    for v in (1.0, NAN, 3.0):
        u, state = tx.update({"w": _t(v)}, state, params)
        got.append((float(u["w"]), int(state.inner_state.mini_step), int(state.notfinite_count)))
    assert got == [(0.0, 1, 0), (0.0, 1, 1), (-2.0, 0, 0)]


def test_multisteps_mean_is_accumulated_wide_and_cast_like_the_updates():
    # optax: the running mean lives in the (float32) accumulator and reaches the inner
    # optimizer cast like the updates. bfloat16 grads 1 and 1 + 2⁻⁷ average to 1 + 2⁻⁸
    # exactly in float32, a tie in bfloat16 that rounds to even: 1.
    ms = ft.MultiSteps(ft.sgd(1.0), 2)
    params = {"w": torch.zeros(1, dtype=torch.bfloat16)}
    state = ms.init(params)
    assert state.acc_grads["w"].dtype == torch.float32
    _, state = ms.update({"w": _t(1.0, dtype=torch.bfloat16)}, state, params)
    u, state = ms.update({"w": _t(1.0 + 2**-7, dtype=torch.bfloat16)}, state, params)
    assert u["w"].dtype == torch.bfloat16 and float(u["w"]) == -1.0
    assert float(state.acc_grads["w"]) == 0.0 and state.acc_grads["w"].dtype == torch.float32


# --- apply_if_finite / zero_nans ----------------------------------------------------------


def test_apply_if_finite_keeps_state_and_forces_the_update_after_the_limit():
    # optax: notfinite_count counts consecutive bad updates (reset by a good one),
    # total_notfinite all of them; a bad update is applied once notfinite_count exceeds
    # max_consecutive_errors = 2. Inner: sgd(0.1, momentum=0.5), trace t ← g + 0.5·t.
    tx = ft.apply_if_finite(ft.sgd(0.1, momentum=0.5), max_consecutive_errors=2)
    params = {"w": _t(0.0, 0.0)}
    state = tx.init(params)
    rows = []
    for g in (
        (2.0, 4.0),
        (NAN, 1.0),
        (1.0, math.inf),
        (1.0, 1.0),
        (NAN, 1.0),
        (NAN, 1.0),
        (NAN, 1.0),
    ):
        before = _snapshot(state.inner_state)
        u, state = tx.update({"w": _t(*g)}, state, params)
        kept = _bitwise_equal(state.inner_state, before)
        rows.append(
            (
                u["w"].tolist(),
                int(state.notfinite_count),
                bool(state.last_finite),
                int(state.total_notfinite),
                kept,
            )
        )
    # Step 4: t = (1, 1) + 0.5·(2, 4) = (2, 3). Step 7 is the third bad one in a row: applied,
    # t = (NaN, 1 + 0.5·3) = (NaN, 2.5).
    want = [
        ([-0.2, -0.4], 0, True, 0, False),
        ([0.0, 0.0], 1, False, 1, True),
        ([0.0, 0.0], 2, False, 2, True),
        ([-0.2, -0.3], 0, True, 2, False),
        ([0.0, 0.0], 1, False, 3, True),
        ([0.0, 0.0], 2, False, 4, True),
    ]
    for got_row, want_row in zip(rows, want):
        assert got_row[0] == pytest.approx(want_row[0], rel=1e-15) and got_row[1:] == want_row[1:]
    last = rows[6]
    assert math.isnan(last[0][0]) and last[0][1] == pytest.approx(-0.25, rel=1e-15)
    assert last[1:] == (3, False, 5, False)


def test_apply_if_finite_limit_zero_applies_every_update():
    tx = ft.apply_if_finite(ft.scale(-1.0), max_consecutive_errors=0)
    u, state = tx.update({"w": _t(NAN, 2.0)}, tx.init({"w": _t(0.0, 0.0)}))
    assert math.isnan(float(u["w"][0])) and float(u["w"][1]) == -2.0
    assert int(state.notfinite_count) == 1 and not bool(state.last_finite)


def test_zero_nans_zeroes_nans_only_and_records_them_per_leaf():
    tx = ft.zero_nans()
    params = {"f": _t(0.0, 0.0, 0.0), "i": torch.zeros(2, dtype=torch.int64), "g": _t(0.0)}
    state = tx.init(params)
    assert not any(bool(x) for x in ft.tree.leaves(state.found_nan))
    updates = {"f": _t(NAN, math.inf, -1.0), "i": torch.tensor([3, -4]), "g": _t(1.5)}
    snap = _snapshot(updates)
    u, state = tx.update(updates, state)
    testing.assert_trees_all_equal(updates, snap)
    assert u["f"].tolist() == [0.0, math.inf, -1.0] and u["i"].tolist() == [3, -4]
    assert {k: bool(v) for k, v in state.found_nan.items()} == {"f": True, "i": False, "g": False}


# --- inject_hyperparams -------------------------------------------------------------------


def test_inject_hyperparams_static_numbers_tensors_schedules_and_state_edits():
    # sgd(lr, momentum): momentum static (stays a Python float, not in the state), lr a
    # schedule 1/(1 + count) … then replaced by a plain number to show the edit path.
    tx = ft.inject_hyperparams(ft.sgd, static_args=("momentum",))(
        learning_rate=lambda count: 1.0 / (1.0 + count), momentum=0.5
    )
    params = {"w": _t(0.0)}
    state = tx.init(params)
    assert sorted(state.hyperparams) == ["learning_rate"]
    u1, state = tx.update({"w": _t(2.0)}, state, params)  # t = 2, lr = 1
    u2, state = tx.update({"w": _t(2.0)}, state, params)  # t = 2 + 1 = 3, lr = 1/2
    assert float(u1["w"]) == -2.0 and float(u2["w"]) == -1.5
    assert float(state.hyperparams["learning_rate"]) == 0.5

    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=torch.tensor(0.25, dtype=F64), momentum=0.5)
    state = tx.init(params)
    assert sorted(state.hyperparams) == ["learning_rate", "momentum"]
    u1, state = tx.update({"w": _t(2.0)}, state, params)  # t = 2
    state.hyperparams["learning_rate"] = 2.0  # a Python number: the next update uses it
    state.hyperparams["momentum"] = torch.tensor(0.0, dtype=F64)
    u2, state = tx.update({"w": _t(2.0)}, state, params)  # t = 2 + 0·2 = 2, lr = 2
    assert float(u1["w"]) == -0.5 and float(u2["w"]) == -4.0
    assert state.hyperparams["learning_rate"].dtype == F64


# --- chain / named_chain / apply_updates --------------------------------------------------


def test_chain_and_named_chain_state_structures():
    inner = ft.chain(ft.identity(), ft.sgd(0.1, momentum=0.9))
    tx = ft.chain(ft.scale(2.0), inner)
    state = tx.init(_params())
    assert isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], tuple)
    named = ft.named_chain(("double", ft.scale(2.0)), ("opt", inner))
    nstate = named.init(_params())
    assert list(nstate) == ["double", "opt"]
    g = _grads()
    u, _ = tx.update(g, state, _params())
    nu, _ = named.update(g, nstate, _params())
    _close(u, ft.tree.map(lambda x: -0.2 * x, g))
    _close(nu, u)
    empty = ft.chain()
    assert empty.init(_params()) == () and empty.update(g, ())[0] is g


def test_apply_updates_none_updates_dtype_cast_after_promotion_and_purity():
    # optax: (p + u).astype(p.dtype), the sum taken in the promoted dtype. 1 + (2⁻²⁴ + 2⁻⁵⁰)
    # in float64 rounds up to 1 + 2⁻²³ in float32; casting u first (to 2⁻²⁴) would give a tie
    # rounding down to 1.
    u_small = 2.0**-24 + 2.0**-50
    for params, updates in (
        ({"p": _t(1.0, dtype=torch.float32)}, {"p": _t(u_small)}),
        ({"p": _t(1.0, dtype=torch.float32), "q": _t(5.0)}, {"p": _t(u_small), "q": None}),
    ):
        snap = (_snapshot(params), _snapshot({k: v for k, v in updates.items() if v is not None}))
        out = ft.apply_updates(params, updates)
        assert out["p"].dtype == torch.float32 and float(out["p"]) == 1.0 + 2.0**-23
        if "q" in params:
            assert out["q"] is params["q"] or torch.equal(out["q"], params["q"])
        testing.assert_trees_all_equal(params, snap[0])
        testing.assert_trees_all_equal({k: v for k, v in updates.items() if v is not None}, snap[1])
    # Integer parameters: the float sum is truncated back, as astype does.
    out = ft.apply_updates([torch.tensor([1, 2])], [_t(0.7, -0.7)])
    assert out[0].dtype == torch.int64 and out[0].tolist() == [1, 1]


# --- the donating train step ----------------------------------------------------------------


def _loss(params: Any, batch: torch.Tensor) -> torch.Tensor:
    return sum((leaf * leaf).sum() * batch.sum() for leaf in ft.tree.leaves(params))


def _matrices(tree_: Any) -> Any:
    return ft.tree.map(lambda x: x.ndim > 1, tree_)


def _step_params() -> dict[str, Any]:
    return {"a": _t(1.0, -2.0), "b": {"c": torch.tensor([[0.5, 1.5], [2.0, -1.0]], dtype=F64)}}


_DONATE_CASES = {
    "masked": lambda: ft.masked(ft.adam(0.1), {"a": True, "b": False}),
    "masked_callable": lambda: ft.chain(
        ft.masked(ft.add_decayed_weights(0.1), _matrices), ft.sgd(0.1, momentum=0.9)
    ),
    "adamw_mask": lambda: ft.adamw(0.1, weight_decay=0.3, mask={"a": False, "b": True}),
    "partition": lambda: ft.partition(
        {"x": ft.adam(0.1), "y": ft.sgd(0.2, momentum=0.5), "unused": ft.adam(0.3)},
        {"a": "x", "b": "y"},
    ),
    "freeze": lambda: ft.chain(ft.freeze({"a": True, "b": False}), ft.adam(0.1)),
    "selective": lambda: ft.selective_transform(ft.adam(0.1), freeze_mask={"a": True, "b": False}),
    "apply_if_finite": lambda: ft.apply_if_finite(ft.adam(0.1), 1),
    "all_frozen": lambda: ft.selective_transform(ft.adamw(0.1), freeze_mask=True),
    "root_label": lambda: ft.partition({"x": ft.sgd(0.1), "y": ft.adamw(0.1)}, "x"),
    "zero_nans": lambda: ft.chain(ft.zero_nans(), ft.sgd(0.1, momentum=0.9)),
    "multi_steps": lambda: ft.MultiSteps(
        ft.adam(0.1), 2, should_skip_update_fn=ft.skip_not_finite
    ).gradient_transformation(),
    "inject": lambda: ft.inject_hyperparams(ft.adamw)(learning_rate=0.1, weight_decay=0.2),
    "inject_schedule": lambda: ft.inject_hyperparams(ft.sgd)(
        learning_rate=lambda c: 0.1 / (1.0 + c), momentum=0.9
    ),
    "named_chain": lambda: ft.named_chain(
        ("clip", ft.clip_by_global_norm(1.0)), ("adam", ft.scale_by_adam()), ("lr", ft.scale(-0.1))
    ),
    "chain_inject_mask": lambda: ft.chain(
        ft.clip_by_global_norm(2.0),
        ft.inject_hyperparams(ft.adamw, static_args="mask")(
            learning_rate=0.1, weight_decay=0.1, mask=_matrices
        ),
    ),
}


def _hyperparams(opt_state: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(opt_state, ft.InjectHyperparamsState):
        return opt_state.hyperparams
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        for s in opt_state:
            if isinstance(s, ft.InjectHyperparamsState):
                return s.hyperparams
    return None


@pytest.mark.parametrize("name", sorted(_DONATE_CASES))
def test_each_wrapper_has_the_same_trajectory_in_the_donating_step(name):
    # NaN batches (with nonfinite="ignore", so they reach the wrappers) exercise the skipping
    # paths; an injected learning rate is changed between steps.
    batches = [_t(1.0, 0.5), _t(NAN, 1.0), _t(-2.0, 0.25), _t(0.3, 0.1), _t(NAN, 1.0), _t(1.0, 1.0)]
    trajectories = {}
    for donate in (True, False):
        tx = _DONATE_CASES[name]()
        step = ft.make_train_step(_loss, tx, donate=donate, nonfinite="ignore")
        state = ft.TrainState.create(params=_step_params(), tx=tx, seed=None)
        traj = []
        for i, batch in enumerate(batches):
            if (
                i == 3
                and (hp := _hyperparams(state.opt_state)) is not None
                and "momentum" not in hp
            ):
                hp["learning_rate"] = torch.tensor(0.05, dtype=F64)
            state, _ = step(state, batch)
            traj.append((_snapshot(state.params), ft.tree.map(_copy_leaf, state.opt_state)))
        trajectories[donate] = traj
    for (p_fast, s_fast), (p_pure, s_pure) in zip(trajectories[True], trajectories[False]):
        testing.assert_trees_all_close(p_fast, p_pure, rtol=1e-12, atol=1e-14, equal_nan=True)
        assert ft.tree.structure(s_fast) == ft.tree.structure(s_pure)
        testing.assert_trees_all_close(s_fast, s_pure, rtol=1e-12, atol=1e-14, equal_nan=True)


def _copy_leaf(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


# --- regressions ----------------------------------------------------------------------------


def test_multisteps_should_skip_may_return_a_python_bool():
    # optax takes jnp.asarray(should_skip): a plain boolean is legal. It raised ValueError here.
    calls = []

    def skip_fn(updates, gradient_step, params):
        calls.append(1)
        return len(calls) == 3, {}  # the second update call (init made the first) is skipped

    ms = ft.MultiSteps(ft.sgd(1.0), 2, should_skip_update_fn=skip_fn)
    params = {"w": _t(0.0)}
    state = ms.init(params)
    got = []
    for v in (1.0, 100.0, 3.0):
        u, state = ms.update({"w": _t(v)}, state, params)
        got.append((float(u["w"]), int(state.mini_step)))
    assert got == [(0.0, 1), (0.0, 1), (-2.0, 0)]  # mean(1, 3) = 2


def test_multisteps_python_bool_skip_compiles_fullgraph():
    ms = ft.MultiSteps(ft.sgd(1.0), 2, should_skip_update_fn=lambda u, s, p: (False, ()))
    update = torch.compile(ms.update, backend="eager", fullgraph=True)
    params = {"w": _t(0.0)}
    state = ms.init(params)
    outs = []
    for v in (1.0, 3.0):
        u, state = update({"w": _t(v)}, state, params)
        outs.append(float(u["w"]))
    assert outs == [0.0, -2.0]


def test_apply_if_finite_takes_a_numpy_integer_limit():
    np = pytest.importorskip("numpy")
    tx = ft.apply_if_finite(ft.scale(-1.0), max_consecutive_errors=np.int64(1))
    state = tx.init({"w": _t(0.0)})
    u1, state = tx.update({"w": _t(NAN)}, state)
    u2, state = tx.update({"w": _t(NAN)}, state)
    assert float(u1["w"]) == 0.0 and math.isnan(float(u2["w"]))  # 2 > 1: applied
    with pytest.raises(TypeError, match="max_consecutive_errors"):
        ft.apply_if_finite(ft.scale(-1.0), max_consecutive_errors=1.0)


_ROOT_MASKED_OUT = {
    "masked_weight_decay": lambda: ft.chain(
        ft.masked(ft.add_decayed_weights(0.5), False), ft.sgd(0.1)
    ),
    "selective_all_frozen": lambda: ft.selective_transform(ft.adamw(0.1), freeze_mask=True),
    "partition_root_label": lambda: ft.partition({"x": ft.sgd(0.1), "y": ft.adamw(0.1)}, "x"),
    "masked_callable_false": lambda: ft.chain(
        ft.masked(ft.adaptive_grad_clip(0.01), lambda t: False), ft.sgd(0.1)
    ),
}


@pytest.mark.parametrize("name", sorted(_ROOT_MASKED_OUT))
def test_inner_that_needs_params_runs_when_the_whole_tree_is_masked_out(name):
    # optax passes MaskedNode() (an empty tree) as the params; here the masked-out root became
    # None, "params not given", and add_decayed_weights / adaptive_grad_clip raised ValueError.
    # The inner transform sees an empty tree, so every update is plain sgd(0.1) (or zero).
    tx = _ROOT_MASKED_OUT[name]()
    params = _params()
    state = tx.init(params)
    g = _grads()
    for _ in range(2):
        u, state = tx.update(g, state, params)
        scale = 0.0 if name == "selective_all_frozen" else -0.1
        _close(u, ft.tree.map(lambda x: scale * x, g))
    if name == "selective_all_frozen":
        adam_state = state.inner_states["train"].inner_state[0]
        assert int(adam_state.count) == 2 and not ft.tree.leaves(adam_state.mu)


def test_whole_tree_masked_out_compiles_fullgraph():
    tx = ft.selective_transform(ft.adamw(0.1), freeze_mask=True)
    params = _params()
    update = torch.compile(tx.update, backend="eager", fullgraph=True)
    u, _ = update(_grads(), tx.init(params), params)
    _close(u, ft.tree.map(torch.zeros_like, _grads()))
