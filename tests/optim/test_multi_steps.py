"""MultiSteps: k mini-steps equal one inner update on the mean gradient; the inner runs once."""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft
from functrain import testing


def _grads(n: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(4, 3, generator=g, dtype=dtype),
            "b": torch.randn(3, generator=g, dtype=dtype),
        }
        for _ in range(n)
    ]


def _params(dtype=torch.float64):
    return {"w": torch.ones(4, 3, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}


def _counting(inner):
    calls = []

    def update(updates, state, params=None, **extra):
        calls.append(1)
        return inner.update(updates, state, params, **extra)

    return ft.GradientTransformation(inner.init, update), calls


def _mean(trees):
    out = trees[0]
    for t in trees[1:]:
        out = ft.tree.add(out, t)
    return ft.tree.scale(1.0 / len(trees), out)


@pytest.mark.parametrize(
    "make_inner", [lambda: ft.adam(0.1), lambda: ft.sgd(0.1, momentum=0.9)], ids=["adam", "sgd"]
)
def test_k_mini_steps_equal_inner_on_mean_gradient_and_inner_runs_once(make_inner):
    k, cycles = 4, 3
    inner, calls = _counting(make_inner())
    ms = ft.MultiSteps(inner, every_k_schedule=k)
    ref = make_inner()
    params = ref_params = _params()
    state, ref_state = ms.init(params), ref.init(params)
    grads = _grads(k * cycles)
    for c in range(cycles):
        chunk = grads[c * k : (c + 1) * k]
        for i, g in enumerate(chunk):
            u, state = ms.update(g, state, params)
            if i < k - 1:
                testing.assert_trees_all_equal(u, ft.tree.zeros_like(g))
                assert not bool(ms.has_updated(state))
            params = ft.apply_updates(params, u)
        assert bool(ms.has_updated(state))
        ref_u, ref_state = ref.update(_mean(chunk), ref_state, ref_params)
        ref_params = ft.apply_updates(ref_params, ref_u)
        testing.assert_trees_all_close(u, ref_u, rtol=1e-12, atol=1e-15)
        testing.assert_trees_all_close(params, ref_params, rtol=1e-12)
        assert len(calls) == c + 1  # the inner optimizer ran on the k-th mini-step only
    testing.assert_trees_all_close(state.inner_opt_state, ref_state, rtol=1e-12, atol=1e-15)
    assert (int(state.mini_step), int(state.gradient_step)) == (0, cycles)
    assert state.mini_step.device.type == "cpu" and state.mini_step.dtype == torch.int32


def test_sum_and_schedule_of_k():
    grads = _grads(7)
    ms = ft.MultiSteps(
        ft.sgd(1.0), every_k_schedule=lambda step: 2 if step < 2 else 3, use_grad_mean=False
    )
    params = _params()
    state = ms.init(params)
    outs = []
    for g in grads:
        u, state = ms.update(g, state, params)
        outs.append(u)
    # Cycles of 2, 2, then 3 mini-steps; summed gradients, scaled by -lr.
    for end, start in ((1, 0), (3, 2), (6, 4)):
        total = ft.tree.add(*grads[start : end + 1])
        testing.assert_trees_all_close(outs[end], ft.tree.scale(-1.0, total), rtol=1e-12)
    for i in (0, 2, 4, 5):
        testing.assert_trees_all_equal(outs[i], ft.tree.zeros_like(grads[i]))
    assert int(state.gradient_step) == 3


def test_skip_not_finite_leaves_state_untouched():
    grads = _grads(3)
    bad = {"w": grads[0]["w"].clone(), "b": grads[0]["b"].clone()}
    bad["b"][1] = math.nan
    ms = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=3, should_skip_update_fn=ft.skip_not_finite)
    params = _params()
    state = ms.init(params)
    assert int(state.skip_state["num_not_finite"]) == 0
    u, state = ms.update(grads[0], state, params)
    before = state
    u, state = ms.update(bad, state, params)
    testing.assert_trees_all_equal(u, ft.tree.zeros_like(bad))
    testing.assert_trees_all_equal(state._replace(skip_state=()), before._replace(skip_state=()))
    assert int(state.skip_state["num_not_finite"]) == 1 and bool(state.skip_state["should_skip"])
    for g in grads[1:]:
        u, state = ms.update(g, state, params)
    testing.assert_trees_all_close(u, ft.tree.scale(-1.0, _mean(grads)), rtol=1e-12)


def test_skip_large_updates():
    import functools

    skip = functools.partial(ft.skip_large_updates, max_squared_norm=1.0)
    ms = ft.MultiSteps(ft.sgd(1.0), every_k_schedule=1, should_skip_update_fn=skip)
    params = {"w": torch.zeros(2)}
    state = ms.init(params)
    u, state = ms.update({"w": torch.tensor([3.0, 4.0])}, state, params)
    assert int(state.gradient_step) == 0 and float(state.skip_state["norm_squared"]) == 25.0
    u, state = ms.update({"w": torch.tensor([0.3, 0.4])}, state, params)
    testing.assert_trees_all_close(u, {"w": torch.tensor([-0.3, -0.4])})


@pytest.mark.parametrize(
    ("dtype", "acc_dtype", "expected"),
    [
        (torch.float32, None, torch.float32),
        (torch.bfloat16, None, torch.float32),
        (torch.float64, None, torch.float64),
        (torch.float64, torch.float32, torch.float32),
    ],
)
def test_accumulator_dtype(dtype, acc_dtype, expected):
    params = {"w": torch.zeros(3, dtype=dtype)}
    ms = ft.MultiSteps(ft.sgd(1.0), 2, accumulator_dtype=acc_dtype)
    state = ms.init(params)
    assert state.acc_grads["w"].dtype == expected
    u, state = ms.update({"w": torch.ones(3, dtype=dtype)}, state, params)
    assert state.acc_grads["w"].dtype == expected
    u, state = ms.update({"w": torch.ones(3, dtype=dtype) * 3}, state, params)
    assert u["w"].dtype == dtype
    testing.assert_trees_all_close(u, {"w": torch.full((3,), -2.0, dtype=dtype)})


def test_compiled_update_matches_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    ms = ft.MultiSteps(ft.adam(0.1), every_k_schedule=3)
    counter = CompileCounter()
    update = torch.compile(ms.update, backend=counter, fullgraph=True)
    params = _params(torch.float32)
    state_c = state_e = ms.init(params)
    for g in _grads(7, torch.float32):
        u_c, state_c = update(g, state_c, params)
        u_e, state_e = ms.update(g, state_e, params)
        testing.assert_trees_all_close(u_c, u_e, rtol=1e-6)
        testing.assert_trees_all_close(state_c, state_e, rtol=1e-6)
    assert counter.frame_count == 1


def test_gradient_transformation_in_a_chain_and_purity():
    ms = ft.MultiSteps(ft.adamw(0.1), every_k_schedule=2)
    tx = ft.chain(ft.clip_by_global_norm(10.0), ms.gradient_transformation())
    params = _params()
    state = tx.init(params)
    for g in _grads(4):
        before = ft.tree.map(lambda x: x.clone(), (g, state, params))
        u, new_state = tx.update(g, state, params)
        testing.assert_trees_all_equal((g, state, params), before)
        state, params = new_state, ft.apply_updates(params, u)
    assert int(state[1].gradient_step) == 2
    assert ms.inner_opt is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match=">= 1"):
        ft.MultiSteps(ft.sgd(0.1), 0)
    with pytest.raises(TypeError, match="every_k_schedule"):
        ft.MultiSteps(ft.sgd(0.1), "2")
    params = _params()
    ms = ft.MultiSteps(ft.sgd(0.1), lambda step: 0)
    with pytest.raises(ValueError, match="returned 0"):
        ms.update(_grads(1)[0], ms.init(params), params)
    ms = ft.MultiSteps(ft.sgd(0.1), 2, should_skip_update_fn=lambda u, s, p: (0.5, ()))
    with pytest.raises(ValueError, match="0-d bool"):
        ms.init(params)
    ms = ft.MultiSteps(ft.sgd(0.1), 2)
    with pytest.raises(TypeError, match="MultiStepsState"):
        ms.update(_grads(1)[0], (), params)
    with pytest.raises(ft.tree.TreeMismatchError, match="b"):
        ms.update({"w": torch.ones(4, 3, dtype=torch.float64)}, ms.init(params), params)
