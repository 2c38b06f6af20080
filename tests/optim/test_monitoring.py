"""``snapshot``, ``monitor`` and ``measure_with_ema`` (optax 0.2.8's monitoring transforms).

References: the measures recomputed by hand from the updates a chain without the monitor
produces, and the moving average written as a float64 loop (optax's formula,
``e ← d·e + (1 − d)·m``, divided by ``1 − dᵗ`` when debiased).
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import testing

F64 = torch.float64


def _grads(i: int) -> dict[str, torch.Tensor]:
    scale = [1.0, 0.0, -3.0, 0.2, 5.0, -0.5][i % 6]  # zeros and sign flips
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=F64) * scale
    return {"w": w, "b": torch.tensor([scale, -1.0], dtype=F64)}


def test_snapshot_records_the_updates_it_sees_and_passes_them_unchanged():
    inner = ft.sgd(0.1, momentum=0.9)
    tx = ft.chain(inner, ft.snapshot("before_clip", ft.tree.norm), ft.clip_by_global_norm(0.05))
    ref = ft.chain(inner, ft.clip_by_global_norm(0.05))
    params = {"w": torch.ones(2, 2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    state = tx.init(params)
    assert torch.equal(state[1].measurement["before_clip"], ft.tree.norm(params))
    s_in, s_ref = inner.init(params), ref.init(params)
    for i in range(6):
        g = _grads(i)
        before, s_in = inner.update(g, s_in, params)
        expected, s_ref = ref.update(g, s_ref, params)
        updates, state = tx.update(g, state, params)
        testing.assert_trees_all_equal(updates, expected)
        torch.testing.assert_close(state[1].measurement["before_clip"], ft.tree.norm(before))


def test_snapshot_tree_measure():
    tx = ft.snapshot("abs", lambda u: ft.tree.map(torch.abs, u))
    g = _grads(2)
    out, state = tx.update(g, tx.init(g))
    assert out is g
    testing.assert_trees_all_equal(state.measurement["abs"], ft.tree.map(torch.abs, g))


def _ema_ref(values: list[float], decay: float, debias: bool) -> list[float]:
    e, out = 0.0, []
    for t, v in enumerate(values, 1):
        e = decay * e + (1 - decay) * v
        out.append(e / (1 - decay**t) if debias else e)
    return out


@pytest.mark.parametrize("debias", [True, False])
def test_monitor_with_ema_matches_a_float64_loop(debias):
    thresh = 0.8
    inner = ft.sgd(0.1, momentum=0.9)
    measures = {
        "norm": ft.tree.norm,
        "norm_ema": ft.measure_with_ema(ft.tree.norm, 0.9, debias),
        "clipped_ema": ft.measure_with_ema(lambda u: ft.tree.norm(u) > thresh, 0.8, debias),
    }
    tx = ft.chain(inner, ft.monitor(measures), ft.clip_by_global_norm(thresh))
    params = {"w": torch.ones(2, 2, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    state = tx.init(params)
    assert set(state[1].measurements) == set(measures)  # one structure from init on
    s_in = inner.init(params)
    norms = []
    for i in range(6):
        g = _grads(i)
        before, s_in = inner.update(g, s_in, params)
        norms.append(float(ft.tree.norm(before)))
        _, state = tx.update(g, state, params)
        m = state[1].measurements
        assert float(m["norm"]) == pytest.approx(norms[-1], rel=1e-14)
        assert float(m["norm_ema"]) == pytest.approx(_ema_ref(norms, 0.9, debias)[-1], rel=1e-12)
        fractions = [float(n > thresh) for n in norms]
        got = m["clipped_ema"]
        assert got.dtype == torch.get_default_dtype()
        assert float(got) == pytest.approx(_ema_ref(fractions, 0.8, debias)[-1], abs=1e-6)
    assert 0 < sum(fractions) < len(fractions)  # both branches of the clip were exercised


def test_monitor_passes_params_and_extra_args_to_its_transforms():
    seen = {}

    def update(u, s, p=None):  # a hand-written transform without **kwargs
        seen["p"] = p
        return ft.tree.sum(u), s

    hand = ft.GradientTransformation(ft.init_empty_state, update)
    tx = ft.monitor({"sum": hand, "ema": ft.measure_with_ema(ft.tree.sum, 0.5)})
    params = [torch.ones(2)]
    _, state = tx.update([torch.tensor([1.0, 2.0])], tx.init(params), params, loss=1.0)
    assert seen["p"] is params
    assert float(state.measurements["sum"]) == 3.0
    assert float(state.measurements["ema"]) == 3.0  # debiased first step


def test_measure_with_ema_accumulator_dtype_and_state():
    tx = ft.measure_with_ema(ft.tree.norm, 0.5, accumulator_dtype=F64)
    state = tx.init([torch.zeros(3)])
    assert state[1].ema.dtype == F64 and state[1].ema.shape == ()
    out, state = tx.update([torch.tensor([3.0, 4.0, 0.0])], state)
    assert out.dtype == torch.float32 and float(out) == 5.0
    assert int(state[1].count) == 1


def test_pure_compiled_and_masked():
    tx = ft.chain(
        ft.masked(
            ft.monitor({"n": ft.tree.norm, "e": ft.measure_with_ema(ft.tree.norm, 0.9)}),
            {"w": True, "b": False},
        ),
        ft.snapshot("abs_sum", lambda u: ft.tree.sum(ft.tree.map(torch.abs, u))),
    )
    params = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    state = tx.init(params)
    g = ft.tree.cast(_grads(0), torch.float32)
    frozen = ft.tree.map(torch.clone, g)
    eager_u, eager_s = tx.update(g, state, params)
    testing.assert_trees_all_equal(g, frozen)
    testing.assert_trees_all_equal(eager_u, g)
    torch.testing.assert_close(eager_s[0].inner_state.measurements["n"], g["w"].norm())
    torch._dynamo.reset()
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    _, s1 = tx.update(g, state, params)
    with testing.assert_max_compiles(2):  # the first update fills `measurements`
        s = state
        for i in range(4):
            gi = ft.tree.cast(_grads(i), torch.float32)
            uc, s = compiled(gi, s, params)
            _, s1 = tx.update(gi, s1 if i else state, params)
            testing.assert_trees_all_close(s, s1, rtol=1e-6, atol=1e-6)
            testing.assert_trees_all_equal(uc, gi)


def test_bfloat16_updates():
    tx = ft.monitor({"n": ft.tree.norm, "e": ft.measure_with_ema(ft.tree.norm, 0.9)})
    g = [torch.tensor([3.0, 4.0], dtype=torch.bfloat16)]
    out, state = tx.update(g, tx.init(g), g)
    assert out is g
    assert float(state.measurements["e"]) == pytest.approx(5.0, rel=1e-2)


def test_train_step_smoke():
    tx = ft.chain(
        ft.monitor({"norm": ft.tree.norm, "ema": ft.measure_with_ema(ft.tree.norm, 0.9)}),
        ft.snapshot("last", ft.tree.norm),
        ft.sgd(0.1),
    )
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=F64)
    batch = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)}

    def loss_fn(p: dict, b: dict) -> torch.Tensor:
        return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()

    params = {"w": torch.zeros(3, dtype=F64)}
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    opt = state.opt_state
    assert float(opt[0].measurements["norm"]) == pytest.approx(float(opt[1].measurement["last"]))


def test_bad_arguments():
    with pytest.raises(TypeError, match="measure"):
        ft.snapshot("x", 3.0)
    with pytest.raises(TypeError, match="measure_name"):
        ft.snapshot(1, ft.tree.norm)
    with pytest.raises(TypeError, match="measures"):
        ft.monitor([ft.tree.norm])
    with pytest.raises(TypeError, match="'bad'"):
        ft.monitor({"bad": 3})
    with pytest.raises(ValueError, match="decay"):
        ft.measure_with_ema(ft.tree.norm, 1.5)
    with pytest.raises(TypeError, match="measure"):
        ft.measure_with_ema(None, 0.9)
