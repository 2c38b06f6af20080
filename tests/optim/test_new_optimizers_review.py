"""Review of schedule-free, ``reduce_on_plateau`` and ``incremental_update``/``periodic_update``
where they meet the train step, checkpoints, wrappers and each other.

References: the pure path ``tx.update`` + ``ft.apply_updates``, the rules written out by hand in
float64, and ``torch.optim.lr_scheduler.ReduceLROnPlateau``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing

F64 = torch.float64


def _data() -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, generator=g, dtype=F64), "b": torch.zeros((), dtype=F64)}
    x, y = torch.randn(12, 3, generator=g, dtype=F64), torch.randn(12, generator=g, dtype=F64)
    return params, (x, y)


def _mse(p: Any, batch: Any) -> torch.Tensor:
    return ((batch[0] @ p["w"] + p["b"] - batch[1]) ** 2).mean()


def _pure(tx: ft.GradientTransformation, params: Any, batches: list[Any]) -> tuple[Any, Any]:
    """The reference: ``tx.update`` + ``ft.apply_updates`` on fresh tensors."""
    p = ft.tree.map(torch.clone, params)
    state = tx.init(p)
    for batch in batches:
        grads = torch.func.grad(_mse)(p, batch)
        updates, state = tx.update(grads, state, p, value=_mse(p, batch))
        p = ft.apply_updates(p, updates)
    return p, state


def _sf_sgd_by_hand(params: Any, batches: list[Any], lr: float, b1: float) -> dict[str, Any]:
    """Schedule-free SGD (Defazio et al.) in float64, weight_lr_power 2, no warmup."""
    y = {k: v.clone() for k, v in params.items()}
    z = {k: v.clone() for k, v in params.items()}
    weight_sum = 0.0
    for batch in batches:
        g = torch.func.grad(_mse)(y, batch)
        weight_sum += lr**2
        c = lr**2 / weight_sum
        for k in y:
            x = (y[k] - (1 - b1) * z[k]) / b1
            z[k] = z[k] - lr * g[k]
            x = (1 - c) * x + c * z[k]
            y[k] = b1 * x + (1 - b1) * z[k]
    return y


def _close(a: Any, b: Any, tol: float = 1e-12) -> None:
    for u, v in zip(ft.tree.leaves(a), ft.tree.leaves(b), strict=True):
        torch.testing.assert_close(u.double(), v.double(), rtol=tol, atol=tol)


# --- schedule-free in the train step ----------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {},  # donating, in place
        {"donate": False},
        {"micro_batches": 3},
        {"micro_batches": 3, "strategy": "vmap"},
        {"nonfinite": "skip"},
        {"fused": False},
    ],
)
def test_schedule_free_step_paths_equal_the_pure_path_and_the_rule(kw: dict[str, Any]) -> None:
    params, batch = _data()
    tx = ft.schedule_free_sgd(0.1, b1=0.8)
    step = ft.make_train_step(_mse, tx, **kw)
    state = ft.TrainState.create(params=ft.tree.map(torch.clone, params), tx=tx)
    for _ in range(4):
        state, _ = step(state, batch)
    ref_params, ref_state = _pure(tx, params, [batch] * 4)
    _close(state.params, ref_params)
    _close(state.opt_state, ref_state)
    _close(state.params, _sf_sgd_by_hand(params, [batch] * 4, 0.1, 0.8))


def test_schedule_free_compiled_step_and_injected_lr_equal_the_pure_path() -> None:
    params, batch = _data()
    plain = ft.schedule_free_adamw(0.05, weight_decay=0.01)
    injected = ft.inject_hyperparams(ft.schedule_free_adamw)(learning_rate=0.05, weight_decay=0.01)
    ref_params, _ = _pure(plain, params, [batch] * 3)
    for tx, kw in ((plain, {"compile": {"backend": "aot_eager"}}), (injected, {})):
        step = ft.make_train_step(_mse, tx, **kw)
        state = ft.TrainState.create(params=ft.tree.map(torch.clone, params), tx=tx)
        for _ in range(3):
            state, metrics = step(state, batch)
        _close(state.params, ref_params)
    assert float(metrics["lr"]) == 0.05  # the injected learning rate is reported


def test_multisteps_around_schedule_free_equals_mean_gradient_steps() -> None:
    params, (x, y) = _data()
    tx = ft.MultiSteps(ft.schedule_free_sgd(0.1), every_k_schedule=2)
    step = ft.make_train_step(_mse, tx)
    state = ft.TrainState.create(params=ft.tree.map(torch.clone, params), tx=tx)
    minis = [(x[3 * i : 3 * i + 3], y[3 * i : 3 * i + 3]) for i in range(4)]
    for mini in minis:
        state, _ = step(state, mini)
    # As optax.MultiSteps: the inner update sees the mean of k gradients taken at the same y.
    inner, p = ft.schedule_free_sgd(0.1), ft.tree.map(torch.clone, params)
    s = inner.init(p)
    for j in range(2):
        gs = [torch.func.grad(_mse)(p, minis[2 * j + i]) for i in range(2)]
        u, s = inner.update(ft.tree.map(lambda a, b: (a + b) / 2, *gs), s, p)
        p = ft.apply_updates(p, u)
    _close(state.params, p)


def test_schedule_free_nan_batch_skipped_bit_for_bit() -> None:
    params, (x, y) = _data()
    tx = ft.schedule_free_adamw(0.05)
    step = ft.make_train_step(_mse, tx, nonfinite="skip")
    state, _ = step(ft.TrainState.create(params=params, tx=tx), (x, y))
    before = ft.tree.map(torch.clone, (state.params, state.opt_state))
    bad_y = y.clone()
    bad_y[0] = float("nan")
    state, metrics = step(state, (x, bad_y))
    assert int(metrics["skipped"]) == 1
    for a, b in zip(ft.tree.leaves((state.params, state.opt_state)), ft.tree.leaves(before)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_eval_params_after_checkpoint_round_trip(tmp_path: Path) -> None:
    params, batch = _data()
    tx = ft.schedule_free_sgd(0.1, b1=0.8)
    step = ft.make_train_step(_mse, tx)
    state = ft.TrainState.create(params=params, tx=tx)
    for _ in range(3):
        state, _ = step(state, batch)
    ft.checkpoint.save(tmp_path / "ckpt", state)
    target = ft.TrainState.create(params=ft.tree.map(torch.zeros_like, params), tx=tx)
    back = ft.checkpoint.restore(tmp_path / "ckpt", target)
    got = ft.schedule_free_eval_params(back.opt_state, back.params)
    z = state.opt_state.z
    want = {k: (state.params[k] - 0.2 * z[k]) / 0.8 for k in params}  # x = (y − (1 − b1)·z)/b1
    _close(got, want)


def test_eval_params_of_a_wrapped_state_says_where_the_state_is() -> None:
    params, _ = _data()
    cases = [
        (ft.chain(ft.clip_by_global_norm(1.0), ft.schedule_free_adamw(0.1)), r"state\[1\]"),
        (ft.inject_hyperparams(ft.schedule_free_adamw)(learning_rate=0.1), "state.inner_state"),
        (ft.MultiSteps(ft.schedule_free_sgd(0.1), 2), "state.inner_opt_state"),
    ]
    for tx, where in cases:
        with pytest.raises(ValueError, match=f"holds one at {where}"):
            ft.schedule_free_eval_params(tx.init(params), params)
    with pytest.raises(ValueError, match=r"got EmptyState$"):
        ft.schedule_free_eval_params(ft.EmptyState(), params)


def test_eval_step_at_eval_params_reads_the_buffers_trained_at_y() -> None:
    """BatchNorm's running statistics come from the forward passes at ``y``: the eval step
    uses them unchanged at ``x`` (recompute them at ``x`` where that matters)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    model, params, buffers = ft.functionalize(net)
    x, y = torch.randn(16, 3, dtype=F64), torch.randn(16, 4, dtype=F64)

    def loss_fn(p: Any, batch: Any, buffers: Any) -> Any:
        out, buffers = model.apply(p, buffers, batch[0])
        return ft.LossOutput(((out - batch[1]) ** 2).mean(), buffers=buffers)

    tx = ft.schedule_free_sgd(0.1)
    step = ft.make_train_step(loss_fn, tx)
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx)
    for _ in range(3):
        state, _ = step(state, (x, y))
    eval_params = ft.schedule_free_eval_params(state.opt_state, state.params)
    trained_buffers = ft.tree.map(torch.clone, state.buffers)
    net.eval()
    metrics = ft.make_eval_step(loss_fn)(state.replace(params=eval_params), (x, y))
    reference = copy.deepcopy(net)
    reference.load_state_dict({**eval_params, **trained_buffers})
    with torch.no_grad():
        want = ((reference(x) - y) ** 2).mean()
    torch.testing.assert_close(metrics["loss"], want)
    _close(state.buffers, trained_buffers)  # read, never updated


# --- reduce_on_plateau: the value that reaches it ----------------------------------------------


def _lossum(p: Any, batch: Any) -> ft.LossSum:
    x, y, mask = batch
    return ft.LossSum((((x @ p["w"] + p["b"] - y) ** 2) * mask).sum(), mask.sum())


@pytest.mark.parametrize("k,strategy", [(1, "loop"), (3, "loop"), (3, "vmap")])
def test_plateau_sees_the_token_mean_of_a_losssum(k: int, strategy: str) -> None:
    params, (x, y) = _data()
    mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=F64)  # uneven counts per K
    tx = ft.chain(ft.sgd(0.0), ft.reduce_on_plateau(accumulation_size=2))
    step = ft.make_train_step(_lossum, tx, micro_batches=k, strategy=strategy)
    state, _ = step(ft.TrainState.create(params=params, tx=tx), (x, y, mask))
    want = float((((x @ params["w"] - y) ** 2) * mask).sum() / mask.sum())
    assert float(state.opt_state[1].avg_value) == pytest.approx(want, rel=1e-12)


def test_plateau_sees_the_unscaled_loss_under_dynamic_loss_scale() -> None:
    params, batch = _data()
    tx = ft.chain(ft.sgd(0.0), ft.reduce_on_plateau(accumulation_size=2))
    step = ft.make_train_step(_mse, tx, loss_scale=ft.DynamicLossScale(2.0**12))
    state, _ = step(ft.TrainState.create(params=params, tx=tx), batch)
    assert float(state.opt_state[1].avg_value) == pytest.approx(float(_mse(params, batch)))


def test_plateau_inside_multisteps_sees_the_last_mini_steps_loss() -> None:
    """As optax.MultiSteps: extra arguments reach the inner update only at the k-th call."""
    params, (x, y) = _data()
    tx = ft.MultiSteps(ft.chain(ft.sgd(0.0), ft.reduce_on_plateau()), every_k_schedule=3)
    step = ft.make_train_step(_mse, tx)
    state = ft.TrainState.create(params=params, tx=tx)
    minis = [(x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]) for i in range(3)]
    for i, mini in enumerate(minis):
        state, _ = step(state, mini)
        best = float(state.opt_state.inner_opt_state[1].best_value)
        assert best == (float(_mse(params, mini)) if i == 2 else float("inf"))


@pytest.mark.parametrize("mask_extra", [False, True])
def test_plateau_under_masked_and_partition_gets_the_value(mask_extra: bool) -> None:
    params, batch = _data()
    for tx in (
        ft.masked(
            ft.chain(ft.sgd(0.0), ft.reduce_on_plateau(patience=1)),
            {"w": True, "b": False},
            mask_compatible_extra_args=mask_extra,
        ),
        ft.partition(
            {"a": ft.chain(ft.sgd(0.0), ft.reduce_on_plateau(patience=1)), "b": ft.sgd(0.0)},
            {"w": "a", "b": "b"},
            mask_compatible_extra_args=mask_extra,
        ),
    ):
        step = ft.make_train_step(_mse, tx)
        state = ft.TrainState.create(params=params, tx=tx)
        for _ in range(2):
            state, _ = step(state, batch)  # constant loss (lr 0): improved, then bad -> reduce
        leaves = ft.tree.leaves(state.opt_state)
        assert any(t.dtype == F64 and float(t) == float(_mse(params, batch)) for t in leaves)
        assert any(
            t.dtype == F64 and t.ndim == 0 and float(t) == pytest.approx(0.1) for t in leaves
        )


def test_nan_loss_with_nonfinite_ignore_counts_as_bad_like_torch() -> None:
    params, (x, y) = _data()
    bad_y = y.clone()
    bad_y[0] = float("nan")
    batches = [(x, y), (x, bad_y), (x, y), (x, bad_y), (x, bad_y)]
    tx = ft.chain(ft.sgd(0.0), ft.reduce_on_plateau(factor=0.5, patience=2))
    step = ft.make_train_step(_mse, tx, nonfinite="ignore")
    state = ft.TrainState.create(params=params, tx=tx)
    opt = torch.optim.SGD([torch.zeros(1)], lr=1.0)
    # optax's patience p is torch's p - 1 (see reduce_on_plateau's docstring).
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1)
    for batch in batches:
        state, metrics = step(state, batch)
        sched.step(float(metrics["loss"]))
        assert float(state.opt_state[1].scale) == opt.param_groups[0]["lr"]
    assert float(state.opt_state[1].scale) == 0.25


# --- incremental_update / periodic_update beside a donating step -------------------------------


def _storages(tree_: Any) -> set[int]:
    return {x.untyped_storage().data_ptr() for x in ft.tree.leaves(tree_)}


def test_periodic_update_int_steps_target_survives_a_donating_step() -> None:
    """Old code returned ``new_tensors`` itself: the next in-place step moved the target."""
    params, batch = _data()
    tx = ft.sgd(0.1)
    step = ft.make_train_step(_mse, tx)  # donate=True: params updated in place
    state = ft.TrainState.create(params=ft.tree.map(torch.clone, params), tx=tx)
    target = ft.tree.map(torch.clone, params)
    snapshots = []
    for i in range(1, 4):
        state, _ = step(state, batch)
        snapshots.append(ft.tree.map(torch.clone, state.params))
        target = ft.periodic_update(state.params, target, i, 2)
        assert not _storages(target) & _storages(state.params)
    # Refreshed at step 2, kept at step 3: the params after step 2, not after step 3.
    for k in params:
        assert torch.equal(target[k], snapshots[1][k])


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(0, 50), period=st.integers(1, 7))
def test_periodic_update_int_and_tensor_steps_agree(steps: int, period: int) -> None:
    new, old = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    a = ft.periodic_update(new, old, steps, period)
    b = ft.periodic_update(new, old, torch.tensor(steps), period)
    want = torch.ones(2) if steps % period == 0 else torch.zeros(2)
    assert torch.equal(a["w"], want) and torch.equal(b["w"], want)
    assert a["w"] is not new["w"]  # never the caller's new tensors


def test_ema_beside_a_donating_step_matches_float64_by_hand() -> None:
    params, batch = _data()
    tx = ft.adam(0.05)
    step = ft.make_train_step(_mse, tx)
    state = ft.TrainState.create(
        params=params, tx=tx, extra={"ema": ft.tree.map(torch.clone, params)}
    )
    want = {k: v.clone() for k, v in params.items()}
    for _ in range(4):
        state, _ = step(state, batch)
        ema = ft.incremental_update(state.params, state.extra["ema"], 0.1)
        state = state.replace(extra={"ema": ema})
        assert not _storages(ema) & _storages(state.params)
        want = {k: 0.1 * state.params[k] + 0.9 * want[k] for k in want}
    _close(state.extra["ema"], want)


def test_ema_of_bf16_params_kept_in_float32() -> None:
    """Old code rounded ``0.01 * new`` to bfloat16 before adding it to the float32 average."""
    g = torch.Generator().manual_seed(3)
    p64 = torch.randn(64, generator=g, dtype=F64)
    ema, want = p64.float(), p64.clone()
    for _ in range(50):
        p64 = p64 + 0.01 * torch.randn(64, generator=g, dtype=F64)
        pb = p64.to(torch.bfloat16)
        ema = ft.incremental_update({"w": pb}, {"w": ema}, 0.01)["w"]
        want = 0.01 * pb.double() + 0.99 * want
    assert ema.dtype == torch.float32
    torch.testing.assert_close(ema.double(), want, rtol=0, atol=1e-4)


def test_ema_update_compiles_fullgraph_once_for_tensor_step_sizes() -> None:
    params, _ = _data()
    ema = ft.tree.map(torch.zeros_like, params)

    def update(p: Any, e: Any, w: torch.Tensor, n: torch.Tensor) -> Any:
        return ft.incremental_update(p, e, w), ft.periodic_update(p, e, n, 3)

    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    with testing.count_compiles() as count:
        for i in range(4):
            w = torch.tensor(0.1 * (i + 1), dtype=F64)
            got = compiled(params, ema, w, torch.tensor(i))
            want = update(params, ema, w, torch.tensor(i))
            _close(got, want)
    assert count.compiles == 1
