"""Third review of skipped steps and loss scaling.

References: ``torch.amp.GradScaler`` and its update kernel ``torch._amp_update_scale_`` (the
policy ``DynamicLossScale`` documents as its own), and states recorded before a skipped step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft

INT32_MAX = 2**31 - 1


def _grad_scaler_steps(policy: ft.DynamicLossScale, finite: list[bool]) -> list[tuple]:
    """(scale, tracker) after each step, from GradScaler's own update kernel."""
    scale = torch.full((1,), float(policy.init_scale))
    tracker = torch.zeros((1,), dtype=torch.int32)
    out = []
    for ok in finite:
        found_inf = torch.tensor([0.0 if ok else 1.0])
        torch._amp_update_scale_(
            scale,
            tracker,
            found_inf,
            policy.growth_factor,
            policy.backoff_factor,
            policy.growth_interval,
        )
        out.append((scale.item(), int(tracker)))
    return out


@settings(max_examples=60, deadline=None)
@given(
    init_scale=st.sampled_from([1.0, 12345.678, 2.0**16, 3.3e38, 1e-37]),
    growth_factor=st.sampled_from([2.0, 1.1, 1.37, 3.0, 1.0001]),
    backoff_factor=st.sampled_from([0.5, 0.3, 0.9, 0.1234567]),
    growth_interval=st.integers(1, 4),
    finite=st.lists(st.booleans(), min_size=1, max_size=40),
)
def test_update_matches_grad_scaler_kernel_bit_for_bit(
    init_scale, growth_factor, backoff_factor, growth_interval, finite
):
    # GradScaler multiplies the float32 scale by the factors as doubles; a float32 multiply
    # (the old code) rounds 1.1 or 0.3 first and drifts by ulps from the first change.
    policy = ft.DynamicLossScale(init_scale, growth_factor, backoff_factor, growth_interval)
    state = policy.init()
    for ok, expected in zip(finite, _grad_scaler_steps(policy, finite)):
        state = policy.update(state, torch.tensor(ok))
        assert (state.scale.item(), int(state.growth_tracker)) == expected
        assert state.scale.dtype == torch.float32
        assert state.growth_tracker.dtype == torch.int32


def test_the_step_follows_grad_scaler_with_non_power_of_two_factors():
    # A scripted run: NaN batches at fixed steps, the scale compared with GradScaler's.
    policy = ft.DynamicLossScale(
        init_scale=1000.0, growth_factor=1.1, backoff_factor=0.3, growth_interval=2
    )
    bad_steps = {2, 3, 7}
    n_steps = 12
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=policy.init_scale,
        growth_factor=policy.growth_factor,
        backoff_factor=policy.backoff_factor,
        growth_interval=policy.growth_interval,
    )
    batches = []
    for i in range(n_steps):
        batch = torch.arange(1.0, 4.0) * (i + 1) / n_steps
        if i in bad_steps:
            batch[1] = float("nan")
        batches.append(batch)
    ref_scales = []
    for batch in batches:
        opt.zero_grad()
        ref_scales.append(scaler.get_scale())
        scaler.scale((w * batch).sum().square()).backward()
        scaler.step(opt)
        scaler.update()

    tx = ft.sgd(0.01, momentum=0.9)
    step = ft.make_train_step(lambda p, b: (p["w"] * b).sum().square(), tx, loss_scale=policy)
    state = ft.TrainState.create(params={"w": torch.ones(3)}, tx=tx)
    scales, skipped = [], []
    for batch in batches:
        state, metrics = step(state, batch)
        scales.append(metrics["loss_scale"].item())
        skipped.append(int(metrics["skipped"]))
    assert scales == ref_scales
    assert skipped == [int(i in bad_steps) for i in range(n_steps)]
    assert state.extra["loss_scale"].scale.item() == scaler.get_scale()
    torch.testing.assert_close(state.params["w"], w.detach(), rtol=1e-6, atol=1e-7)


def test_growth_tracker_saturates_instead_of_wrapping():
    # growth_interval beyond int32: the scale never grows, the tracker must not go negative.
    policy = ft.DynamicLossScale(init_scale=4.0, growth_interval=2**40)
    state = ft.LossScaleState(torch.tensor(4.0), torch.tensor(INT32_MAX - 1, dtype=torch.int32))
    for _ in range(3):
        state = policy.update(state, torch.tensor(True))
        assert int(state.growth_tracker) == INT32_MAX
        assert state.scale.item() == 4.0


def _lazy_hook() -> ft.GradStatsHook:
    """A hook whose state starts as ``None`` and a Python-int count (both legal pytrees)."""

    def update(stats, grads, s):
        v = stats.values["sq_norm"].mean()
        ema = v if s["ema"] is None else 0.9 * s["ema"] + 0.1 * v
        return {"ema": ema}, {"ema": ema, "n": s["n"] + 1}

    return ft.GradStatsHook(
        init=lambda params: {"ema": None, "n": 0},
        per_micro_batch=lambda g, b: {"sq_norm": ft.tree.norm(g, squared=True)},
        update=update,
    )


@pytest.mark.parametrize("donate", [True, False])
def test_a_skipped_first_step_keeps_a_lazily_filled_hook_state(donate):
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        lambda p, b: (p["w"] * b).mean(),
        tx,
        micro_batches=2,
        grad_stats=_lazy_hook(),
        donate=donate,
    )
    state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=tx)
    bad = torch.tensor([[1.0, float("nan")], [1.0, 2.0]])
    good = torch.tensor([[1.0, 3.0], [1.0, 2.0]])
    state, metrics = step(state, bad)
    assert int(metrics["skipped"]) == 1
    assert state.extra["grad_stats"] == {"ema": None, "n": 0}  # the old code kept a NaN EMA
    state, metrics = step(state, good)
    assert int(metrics["skipped"]) == 0
    # by hand: micro-batch means of b/2 are [0.5, 1.5] and [0.5, 1.0]; squared norms 2.5, 1.25
    assert state.extra["grad_stats"]["n"] == 1
    assert state.extra["grad_stats"]["ema"].item() == pytest.approx(1.875, rel=1e-6)
    state, _ = step(state, bad)
    assert state.extra["grad_stats"]["n"] == 1
    assert state.extra["grad_stats"]["ema"].item() == pytest.approx(1.875, rel=1e-6)


def test_a_skipped_step_keeps_a_python_number_in_the_optimizer_state():
    # An optax-style transform may count in a Python int (legal outside torch.compile).
    def init(params):
        return {"count": 0}

    def update(updates, state, params=None):
        return ft.tree.map(lambda g: -0.5 * g, updates), {"count": state["count"] + 1}

    tx = ft.GradientTransformation(init, update)
    step = ft.make_train_step(lambda p, b: (p["w"] * b).sum(), tx)
    state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=tx)
    state, _ = step(state, torch.tensor([1.0, 2.0]))
    state, metrics = step(state, torch.tensor([float("inf"), 2.0]))
    assert int(metrics["skipped"]) == 1
    assert state.opt_state == {"count": 1}
    assert torch.equal(state.params["w"], torch.tensor([0.5, 0.0]))


def _model_problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 1))
    model, params, buffers = ft.functionalize(net)

    def loss_fn(p, batch, buffers):
        out, new_buffers = model.apply(p, buffers, batch["x"])
        return ft.LossOutput((out.squeeze(-1) - batch["y"]).square().mean(), buffers=new_buffers)

    return params, buffers, loss_fn


TXS = {
    "sgd_momentum": lambda: ft.sgd(0.1, momentum=0.9, nesterov=True),
    "adamw": lambda: ft.adamw(1e-2, weight_decay=0.1),
    "multi_steps": lambda: ft.MultiSteps(ft.adamw(1e-2), every_k_schedule=2),
    "inject": lambda: ft.inject_hyperparams(ft.sgd)(
        learning_rate=ft.linear_schedule(0.1, 0.0, 10), momentum=0.9
    ),
}


@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("name", sorted(TXS))
def test_nan_in_one_micro_batch_changes_nothing_but_step_and_key(name, donate):
    params, buffers, loss_fn = _model_problem()
    tx = TXS[name]()
    hook = ft.noise_scale_hook()
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=3,
        donate=donate,
        grad_stats=hook,
        loss_scale=ft.DynamicLossScale(2.0**10, growth_interval=2),
    )
    state = step.prepare(ft.TrainState.create(params=params, buffers=buffers, tx=tx, seed=5))
    gen = torch.Generator().manual_seed(1)
    for i in range(5):
        batch = {"x": torch.randn(9, 4, generator=gen), "y": torch.randn(9, generator=gen)}
        bad = i in (1, 3, 4)
        if bad:
            batch["x"][7, 2] = float("nan")  # the third micro-batch only
        kept = ft.tree.map(
            torch.clone,
            (state.params, state.opt_state, state.buffers, state.extra[hook.name]),
        )
        count, key = int(state.step), state.key.clone()
        scale = state.extra["loss_scale"].scale.item()
        state, metrics = step(state, batch)
        assert int(state.step) == count + 1
        assert torch.equal(state.key, ft.fold_in(key, 0))
        assert int(metrics["skipped"]) == int(bad)
        if bad:
            after = (state.params, state.opt_state, state.buffers, state.extra[hook.name])
            ft.testing.assert_trees_all_equal(after, kept, bitwise=True)
            assert state.extra["loss_scale"].scale.item() == scale / 2


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("donate", [True, False])
@pytest.mark.parametrize("name", ["sgd_momentum", "adamw"])
def test_a_loss_scaled_step_reads_nothing_on_the_host(name, donate, dtype):
    # No key (seeding reads it) and no max_consecutive_skips (read on the CPU on purpose).
    tx = TXS[name]()
    step = ft.make_train_step(
        lambda p, b: ((b @ p["w"]).float() - 1).square().mean(),
        tx,
        micro_batches=2,
        donate=donate,
        loss_scale=ft.DynamicLossScale(8.0, growth_interval=1),
    )
    state = ft.TrainState.create(params={"w": torch.ones(3, dtype=dtype)}, tx=tx, seed=None)
    good = torch.ones(4, 3, dtype=dtype)
    bad = good.clone()
    bad[3, 0] = float("inf")
    state, _ = step(state, good)  # the first call builds its caches
    with _NoHostReads():
        state, skipped = step(state, bad)
        state, applied = step(state, good)
    assert (int(skipped["skipped"]), int(applied["skipped"])) == (1, 0)
    assert state.extra["loss_scale"].scale.item() == 16.0  # 8 → 16 → 8 → 16
