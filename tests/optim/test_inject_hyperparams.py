"""inject_hyperparams: same numbers as the plain factory, readable and changeable hyperparameters."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import testing


def _problem(dtype=torch.float64, steps=12):
    g = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(5, 3, generator=g, dtype=dtype),
        "b": torch.randn(3, generator=g, dtype=dtype),
    }
    grads = [
        {
            "w": torch.randn(5, 3, generator=g, dtype=dtype),
            "b": torch.randn(3, generator=g, dtype=dtype),
        }
        for _ in range(steps)
    ]
    return params, grads


def _run(tx, params, grads, state=None):
    state = tx.init(params) if state is None else state
    for gr in grads:
        u, state = tx.update(gr, state, params)
        params = ft.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_injected_adamw_equals_plain_adamw(dtype):
    params, grads = _problem(dtype)
    kwargs = dict(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1)
    got, state = _run(ft.inject_hyperparams(ft.adamw)(**kwargs), params, grads)
    ref, ref_state = _run(ft.adamw(**kwargs), params, grads)
    testing.assert_trees_all_close(got, ref, rtol=1e-14 if dtype == torch.float64 else 1e-6)
    # float32 hyperparameter tensors round e.g. 1 - b2 in float32, Python floats in double.
    testing.assert_trees_all_close(
        state.inner_state, ref_state, rtol=1e-14 if dtype == torch.float64 else 2e-5
    )
    assert sorted(state.hyperparams) == [
        "b1",
        "b2",
        "eps",
        "eps_root",
        "learning_rate",
        "weight_decay",
    ]
    for name, value in state.hyperparams.items():
        assert value.shape == () and value.dtype == dtype, name
    assert int(state.count) == len(grads)
    assert state.hyperparams["learning_rate"].item() == pytest.approx(0.05)


def test_schedule_is_evaluated_at_count_and_recorded():
    params, grads = _problem()
    sched = ft.warmup_cosine_decay_schedule(0.0, 0.1, 3, 10)
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=sched, momentum=0.9)
    state = tx.init(params)
    assert state.hyperparams["learning_rate"].item() == pytest.approx(sched(0))
    ref_tx, ref_state = ft.sgd(sched, momentum=0.9), None
    ref_state = ref_tx.init(params)
    for t, gr in enumerate(grads):
        u, state = tx.update(gr, state, params)
        ref_u, ref_state = ref_tx.update(gr, ref_state, params)
        testing.assert_trees_all_close(u, ref_u, rtol=1e-6)
        # The state records the value used by this update (for logging `lr`).
        assert state.hyperparams["learning_rate"].item() == pytest.approx(
            sched(t), rel=1e-6, abs=1e-9
        )


def test_changing_lr_mid_run_takes_effect():
    params, grads = _problem()
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=0.01)
    mid, state = _run(tx, params, grads[:5])
    # Replace the tensor (the functional way) ...
    state = state._replace(
        hyperparams={**state.hyperparams, "learning_rate": torch.tensor(0.2, dtype=torch.float64)}
    )
    got, _ = _run(tx, mid, grads[5:], state)
    # ... or fill it in place; optax-style Python numbers are accepted too.
    _, state_b = _run(tx, params, grads[:5])
    state_b.hyperparams["learning_rate"].fill_(0.2)
    got_b, _ = _run(tx, mid, grads[5:], state_b)
    _, state_c = _run(tx, params, grads[:5])
    state_c.hyperparams["learning_rate"] = 0.2
    got_c, _ = _run(tx, mid, grads[5:], state_c)

    ref_mid, ref_state = _run(ft.adamw(0.01), params, grads[:5])
    ref, _ = _run(ft.adamw(0.2), ref_mid, grads[5:], ref_state)
    testing.assert_trees_all_close(mid, ref_mid, rtol=1e-14)
    for g in (got, got_b, got_c):
        testing.assert_trees_all_close(g, ref, rtol=1e-13)


def test_compiled_update_does_not_recompile_when_lr_changes():
    # Needs functrain.optim.base.chain to be traceable by Dynamo (it is built at every update).
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    params, grads = _problem(torch.float32, steps=6)
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=0.01, weight_decay=0.1)
    counter = CompileCounter()
    update = torch.compile(tx.update, backend=counter, fullgraph=True)
    state_c = state_e = tx.init(params)
    p_c = p_e = params
    for t, gr in enumerate(grads):
        lr = torch.tensor(0.01 * (t + 1))
        state_c = state_c._replace(hyperparams={**state_c.hyperparams, "learning_rate": lr})
        state_e = state_e._replace(hyperparams={**state_e.hyperparams, "learning_rate": lr.clone()})
        u_c, state_c = update(gr, state_c, p_c)
        u_e, state_e = tx.update(gr, state_e, p_e)
        testing.assert_trees_all_close(u_c, u_e, rtol=1e-6)
        p_c, p_e = ft.apply_updates(p_c, u_c), ft.apply_updates(p_e, u_e)
    assert counter.frame_count == 1


def test_static_integer_and_dtype_handling():
    seen = {}

    def factory(learning_rate: float, steps: int = 3, flag: bool = False, fn=None, name: str = "x"):
        seen.update(learning_rate=learning_rate, steps=steps, flag=flag, fn=fn, name=name)
        return ft.scale(-learning_rate)

    hook = lambda u: u  # noqa: E731
    tx = ft.inject_hyperparams(factory, static_args="fn", hyperparam_dtype=torch.float64)(
        0.5, steps=4, flag=True, fn=hook
    )
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    assert set(state.hyperparams) == {"learning_rate"}
    assert state.hyperparams["learning_rate"].dtype == torch.float64
    assert seen["steps"] == 4 and type(seen["steps"]) is int and seen["flag"] is True
    assert seen["fn"] is hook and seen["name"] == "x"
    # An integer for a float parameter is injected (as a floating tensor).
    tx = ft.inject_hyperparams(factory)(learning_rate=1)
    state = tx.init(params)
    assert state.hyperparams["learning_rate"].dtype == torch.float32
    # Integer 0-d tensors for int parameters stay static Python ints.
    ft.inject_hyperparams(factory)(0.1, steps=torch.tensor(7)).init(params)
    assert seen["steps"] == 7 and type(seen["steps"]) is int
    with pytest.raises(ValueError, match="static_args"):
        ft.inject_hyperparams(factory, static_args=("nope",))


def test_user_tensor_is_copied_and_bad_state_raises():
    lr = torch.tensor(0.1)
    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=lr)
    params = {"w": torch.ones(2)}
    state = tx.init(params)
    state.hyperparams["learning_rate"].fill_(0.3)
    assert lr.item() == pytest.approx(0.1)
    with pytest.raises(TypeError, match="InjectHyperparamsState"):
        tx.update({"w": torch.ones(2)}, (state,), params)
    broken = state._replace(hyperparams={})
    with pytest.raises(KeyError, match="learning_rate"):
        tx.update({"w": torch.ones(2)}, broken, params)


def test_update_does_not_mutate_inputs():
    params, grads = _problem(steps=1)
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=ft.linear_schedule(0.1, 0.0, 10), b1=0.9)
    state = tx.init(params)
    for _ in range(2):
        before = ft.tree.map(lambda x: x.clone(), (grads[0], state, params))
        _, new_state = tx.update(grads[0], state, params)
        testing.assert_trees_all_equal((grads[0], state, params), before)
        state = new_state


def test_callable_non_schedule_arguments_go_through_static_args():
    params, grads = _problem(steps=4)
    mask = lambda p: ft.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    tx = ft.inject_hyperparams(ft.adamw, static_args="mask")(
        learning_rate=0.1, weight_decay=0.5, mask=mask
    )
    got, state = _run(tx, params, grads)
    ref, _ = _run(ft.adamw(0.1, weight_decay=0.5, mask=mask), params, grads)
    testing.assert_trees_all_close(got, ref, rtol=1e-14)
    assert "mask" not in state.hyperparams
