"""``incremental_update`` / ``periodic_update``: parameter EMAs and target networks.

References: ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn`` over a real
float64 training run, the closed form of an EMA of a constant, optax's documented formulas and a
plain Python loop for ``periodic_update``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import functrain as ft
from functrain.checkpoint import CheckpointManager


def _tree(seed: int, dtype: torch.dtype = torch.float64) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "fc": {"w": torch.randn(3, 4, generator=gen, dtype=dtype)},
        "b": torch.randn(4, generator=gen, dtype=dtype),
    }


@pytest.mark.parametrize("use_buffers", [False, True])
def test_matches_averaged_model_ema_over_a_training_run(use_buffers: bool) -> None:
    decay, steps = 0.9, 20
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()
    averaged = AveragedModel(
        model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    # AveragedModel's first call copies the model; ours starts from a copy made by hand.
    averaged.update_parameters(model)

    def current() -> dict:
        out = {n: p.detach().clone() for n, p in model.named_parameters()}
        if use_buffers:  # the floating buffers; num_batches_tracked is an int counter
            out.update({n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()})
        return out

    ema = current()
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
        loss = F.mse_loss(model(x), x[:, :2].sin())
        opt.zero_grad()
        loss.backward()
        opt.step()
        averaged.update_parameters(model)
        ema = ft.incremental_update(current(), ema, 1 - decay)

    ref = {n: p.detach() for n, p in averaged.module.named_parameters()}
    ref.update({n: b for n, b in averaged.module.named_buffers() if b.is_floating_point()})
    # The EMA moved well away from the parameters, so the comparison says something.
    assert max((ema[n] - p).abs().max().item() for n, p in model.named_parameters()) > 1e-2
    for name, value in ema.items():
        # lerp (old + w (new - old)) vs optax's w new + (1 - w) old: equal to rounding
        torch.testing.assert_close(value, ref[name], rtol=1e-13, atol=1e-13, msg=name)
    if not use_buffers:  # AveragedModel keeps the buffers in sync, unaveraged
        for name, buf in model.named_buffers():
            assert torch.equal(dict(averaged.module.named_buffers())[name], buf)


@pytest.mark.parametrize("step_size", [0.1, 0.5, torch.tensor(0.01, dtype=torch.float64)])
def test_ema_of_a_constant_has_the_closed_form(step_size) -> None:
    new, ema0 = _tree(0), _tree(1)
    ema = ema0
    for _ in range(30):
        ema = ft.incremental_update(new, ema, step_size)
    w = float(step_size)
    for path in (("fc", "w"), ("b",)):
        get = (lambda t: t["fc"]["w"]) if path == ("fc", "w") else (lambda t: t["b"])
        expected = get(new) + (1 - w) ** 30 * (get(ema0) - get(new))
        torch.testing.assert_close(get(ema), expected, rtol=1e-13, atol=1e-14)


def test_incremental_update_is_optax_formula_and_keeps_float_dtypes() -> None:
    new, old = _tree(0, torch.float32), _tree(1, torch.float32)
    out = ft.incremental_update(new, old, 0.3)
    expected = 0.3 * new["b"].double() + 0.7 * old["b"].double()
    assert out["b"].dtype == torch.float32
    torch.testing.assert_close(out["b"].double(), expected, rtol=1e-6, atol=1e-7)
    half = ft.incremental_update(
        {"x": torch.ones(2, dtype=torch.bfloat16)},
        {"x": torch.zeros(2, dtype=torch.bfloat16)},
        torch.tensor(0.5),
    )
    assert half["x"].dtype == torch.bfloat16


def test_integer_and_bool_leaves_become_floating_point_as_in_optax() -> None:
    # optax: ``step_size * new + (1 - step_size) * old`` on int arrays promotes to float.
    out = ft.incremental_update(
        {"n": torch.tensor([4, 10]), "m": torch.tensor([True, False])},
        {"n": torch.tensor([0, 2]), "m": torch.tensor([False, False])},
        0.25,
    )
    assert out["n"].dtype == out["m"].dtype == torch.get_default_dtype()
    torch.testing.assert_close(out["n"], torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(out["m"], torch.tensor([0.25, 0.0]))
    # periodic_update selects; integer leaves keep their dtype.
    picked = ft.periodic_update({"n": torch.tensor(7)}, {"n": torch.tensor(1)}, torch.tensor(4), 2)
    assert picked["n"].dtype == torch.int64 and int(picked["n"]) == 7


@given(
    period=st.integers(1, 6),
    start=st.integers(0, 20),
    count=st.integers(1, 25),
    as_tensor=st.booleans(),
)
def test_periodic_update_matches_a_python_loop(period, start, count, as_tensor) -> None:
    target, ref = _tree(100), _tree(100)
    for step in range(start, start + count):
        online = _tree(step)
        steps = torch.tensor(step) if as_tensor else step
        target = ft.periodic_update(online, target, steps, period)
        if step % period == 0:
            ref = online
        ft.testing.assert_trees_all_equal(target, ref, bitwise=True)


def test_both_are_pure_and_incremental_update_returns_fresh_tensors() -> None:
    new, old = _tree(0), _tree(1)
    new_copy, old_copy = copy.deepcopy(new), copy.deepcopy(old)
    out = ft.incremental_update(new, old, torch.tensor(0.2, dtype=torch.float64))
    ft.periodic_update(new, old, torch.tensor(3), 3)
    ft.periodic_update(new, old, 3, 3)
    ft.testing.assert_trees_all_equal(new, new_copy, bitwise=True)
    ft.testing.assert_trees_all_equal(old, old_copy, bitwise=True)
    ptrs = {t.data_ptr() for t in ft.tree.leaves(new) + ft.tree.leaves(old)}
    assert not ptrs & {t.data_ptr() for t in ft.tree.leaves(out)}


def test_vmap_over_an_ensemble() -> None:
    new = {"w": torch.randn(4, 3, dtype=torch.float64)}
    old = {"w": torch.randn(4, 3, dtype=torch.float64)}
    sizes = torch.tensor([0.1, 0.2, 0.5, 1.0], dtype=torch.float64)
    out = torch.func.vmap(ft.incremental_update)(new, old, sizes)
    expected = sizes[:, None] * new["w"] + (1 - sizes[:, None]) * old["w"]
    torch.testing.assert_close(out["w"], expected, rtol=1e-15, atol=1e-15)
    steps = torch.tensor([0, 1, 2, 3])
    picked = torch.func.vmap(lambda n, o, s: ft.periodic_update(n, o, s, 2))(new, old, steps)
    assert torch.equal(
        picked["w"], torch.stack([new["w"][0], old["w"][1], new["w"][2], old["w"][3]])
    )


def test_compile_fullgraph_matches_eager() -> None:
    torch._dynamo.reset()
    new, old = _tree(0, torch.float32), _tree(1, torch.float32)
    inc = torch.compile(ft.incremental_update, fullgraph=True, backend="aot_eager")
    per = torch.compile(ft.periodic_update, fullgraph=True, backend="aot_eager")
    size = torch.tensor(0.05)
    ft.testing.assert_trees_all_equal(
        inc(new, old, size), ft.incremental_update(new, old, size), bitwise=True
    )
    for step in range(4):  # one graph for every step value: the choice is on the device
        steps = torch.tensor(step)
        ft.testing.assert_trees_all_equal(
            per(new, old, steps, 2), ft.periodic_update(new, old, steps, 2), bitwise=True
        )


@pytest.mark.parametrize("fn", ["incremental", "periodic"])
def test_mismatches_name_the_path(fn: str) -> None:
    call = (
        (lambda n, o: ft.incremental_update(n, o, 0.1))
        if fn == "incremental"
        else (lambda n, o: ft.periodic_update(n, o, torch.tensor(0), 1))
    )
    new = _tree(0)
    with pytest.raises(ft.tree.TreeMismatchError, match=r"new_tensors\['b'\] has no counterpart"):
        call(new, {"fc": new["fc"], "c": new["b"]})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"old_tensors\['fc'\]\['w'\].*shape"):
        call(new, {"fc": {"w": torch.zeros(4, 3, dtype=torch.float64)}, "b": new["b"]})
    with pytest.raises(ft.tree.TreeMismatchError, match=r"old_tensors\['b'\].*None"):
        call(new, {"fc": new["fc"], "b": None})


def test_periodic_update_refuses_dtype_mismatch_and_bad_periods() -> None:
    with pytest.raises(ft.tree.TreeMismatchError, match=r"old_tensors\['w'\].*dtype"):
        ft.periodic_update({"w": torch.ones(2)}, {"w": torch.ones(2, dtype=torch.float64)}, 1, 1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="update_period"):
            ft.periodic_update({"w": torch.ones(2)}, {"w": torch.ones(2)}, 1, bad)


# The recipe of docs/guides/checkpoints.md: the EMA lives in state.extra, so train_loop's
# checkpoints carry it and a resumed run continues it bit for bit.


def _with_ema(step, decay: float):
    def ema_step(state, batch):
        state, metrics = step(state, batch)
        ema = ft.incremental_update(state.params, state.extra["ema"], 1 - decay)
        return state.replace(extra={**state.extra, "ema": ema}), metrics

    return ema_step


def _ema_setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    model, params, _ = ft.functionalize(net)

    def loss_fn(p, batch):
        return F.cross_entropy(model(p, batch["x"]), batch["y"])

    tx = ft.adamw(1e-2)
    # A copy: the donating step updates the params' memory in place.
    state = ft.TrainState.create(
        params=params, tx=tx, extra={"ema": ft.tree.map(torch.clone, params)}
    )
    return _with_ema(ft.make_train_step(loss_fn, tx), 0.9), state, loss_fn


def _ema_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=gen)
    return {"x": x, "y": torch.randint(0, 3, (48,), generator=gen)}


def _ema_run(ckpt, **kwargs):
    step, state, _ = _ema_setup()
    batches = ft.TensorBatches(_ema_data(), 8, seed=5)
    return ft.train_loop(
        step, state, batches, epochs=3, checkpoint_manager=CheckpointManager(ckpt), **kwargs
    )


def test_ema_in_extra_resumes_bit_for_bit(tmp_path) -> None:
    full = _ema_run(tmp_path / "full")
    first = _ema_run(tmp_path / "split", max_steps=9)
    assert int(first.state.step) == 9
    second = _ema_run(tmp_path / "split")
    assert second.resumed_from == 9 and int(second.state.step) == 18
    ft.testing.assert_trees_all_equal(
        second.state.extra["ema"], full.state.extra["ema"], bitwise=True
    )
    ft.testing.assert_trees_all_equal(second.state.params, full.state.params, bitwise=True)
    # The EMA is a real average, not the params.
    diff = ft.tree.sub(full.state.extra["ema"], full.state.params)
    assert float(ft.tree.norm(diff)) > 1e-3


def test_eval_step_on_the_ema_weights() -> None:
    step, state, loss_fn = _ema_setup()
    data = _ema_data()
    for i in range(3):
        state, _ = step(state, {k: v[8 * i : 8 * i + 8] for k, v in data.items()})
    eval_step = ft.make_eval_step(loss_fn)
    metrics = eval_step(state.replace(params=state.extra["ema"]), data)
    expected = loss_fn(state.extra["ema"], data)
    torch.testing.assert_close(metrics["loss"], expected)
    state, _ = step(state, {k: v[:8] for k, v in data.items()})  # the state is still usable
