"""Non-finite steps are skipped without corrupting the state; dynamic loss scaling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain.train import faults


def assert_bitwise_equal(a, b):
    """Exact equality that also tells ``-0.0`` from ``0.0`` and compares NaN payloads."""
    ft.testing.assert_trees_all_equal(a, b, bitwise=True)


def snapshot(state: ft.TrainState):
    """A deep copy of everything but the step counter and key (what a skip must keep)."""
    return ft.tree.map(
        lambda t: t.clone(), (state.params, state.opt_state, state.buffers, state.extra)
    )


def _bn_problem(dropout: bool = True):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.2))
    net = nn.Sequential(*layers, nn.Linear(8, 1))
    model, params, buffers = ft.functionalize(net)

    def loss_fn(p, batch, buffers):
        out, new_buffers = model.apply(p, buffers, batch["x"])
        loss = (out.squeeze(-1) - batch["y"]).square().mean() + batch["c"].mean()
        return ft.LossOutput(loss, buffers=new_buffers)

    return params, buffers, loss_fn


def _plain_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 1))
    model, params, _ = ft.functionalize(net)

    def loss_fn(p, batch):
        out = model(p, batch["x"]).squeeze(-1)
        # sqrt(z · w²) at z = 0 is 0 with a NaN gradient: a finite loss, a non-finite gradient.
        edge = torch.sqrt(batch["z"] * p["0.weight"].square().sum()).mean()
        return (out - batch["y"]).square().mean() + batch["c"].mean() + edge

    return params, None, loss_fn


def _batches(n_steps: int, bad: dict[int, str], size: int = 8):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n_steps):
        batch = {
            "x": torch.randn(size, 4, generator=gen),
            "y": torch.randn(size, generator=gen),
            "c": torch.zeros(size),
            "z": torch.ones(size),
        }
        kind = bad.get(i)
        if kind == "nan_input":
            batch["x"][3, 1] = float("nan")
        elif kind == "inf_loss":  # the loss is inf, the gradient finite
            batch["c"][0] = float("inf")
        elif kind == "nan_grad":  # the loss is finite, the gradient NaN
            batch["z"] = torch.zeros(size)
        out.append(batch)
    return out


def _tx():
    schedule = ft.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 20)
    return ft.inject_hyperparams(ft.adamw)(learning_rate=schedule, weight_decay=1e-2)


CONFIGS = [
    pytest.param("loop", "func", True, id="loop-func-donate"),
    pytest.param("loop", "func", False, id="loop-func-keep"),
    pytest.param("loop", "autograd", True, id="loop-autograd-donate"),
    pytest.param("vmap", "func", True, id="vmap-donate"),
]


@pytest.mark.parametrize(("strategy", "backend", "donate"), CONFIGS)
@pytest.mark.parametrize("kind", ["nan_input", "inf_loss", "nan_grad"])
def test_a_non_finite_step_keeps_the_state_bit_for_bit_and_the_run_continues(
    strategy, backend, donate, kind
):
    # BatchNorm (buffers) with "loop"; vmap cannot thread buffers, and the NaN-gradient batch
    # needs the other model.
    if strategy == "vmap" or kind == "nan_grad":
        params, buffers, loss_fn = _plain_problem()
    else:
        params, buffers, loss_fn = _bn_problem()
    tx = _tx()
    hook = ft.noise_scale_hook()
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=2,
        strategy=strategy,
        grad_backend=backend,
        donate=donate,
        grad_stats=hook,
        max_consecutive_skips=3,
    )
    bad_step = 2
    batches = _batches(5, {bad_step: kind})
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx, seed=3)
    history = []
    for i, batch in enumerate(batches):
        before = snapshot(state)
        step_before, key_before = int(state.step), state.key.clone()
        state, metrics = step(state, batch)
        history.append(metrics)
        assert int(state.step) == step_before + 1
        assert torch.equal(state.key, ft.fold_in(key_before, 0))  # the key advances
        if i == bad_step:
            assert int(metrics["skipped"]) == 1
            after = snapshot(state)
            # Everything but the skip counters comes out exactly as it went in.
            nonfinite_after = after[3].pop("nonfinite")
            nonfinite_before = before[3].pop("nonfinite")
            assert_bitwise_equal(after, before)
            assert int(nonfinite_after.total) == int(nonfinite_before.total) + 1
            assert int(nonfinite_after.consecutive) == 1
            assert not math.isfinite(float(metrics["grad_norm"])) or kind == "inf_loss"
            assert float(metrics["update_norm"]) == 0.0
        else:
            assert int(metrics["skipped"]) == 0
            ft.testing.assert_tree_all_finite(state.params)
    assert [int(m["skipped_total"]) for m in history] == [0, 0, 1, 1, 1]
    assert int(state.extra["nonfinite"].consecutive) == 0

    # The run continues exactly as one that never saw the bad batch (step and key advanced).
    ref_step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=2,
        strategy=strategy,
        grad_backend=backend,
        donate=donate,
        grad_stats=hook,
        max_consecutive_skips=3,
    )
    ref = ft.TrainState.create(params=params, buffers=buffers, tx=tx, seed=3)
    for i, batch in enumerate(batches):
        if i == bad_step:
            extra = dict(ref.extra)
            counts = extra["nonfinite"]
            extra["nonfinite"] = faults.NonFiniteState(counts.consecutive, counts.total + 1)
            ref = ref.replace(step=ref.step + 1, key=ft.fold_in(ref.key, 0), extra=extra)
            continue
        ref, ref_metrics = ref_step(ref, batch)
        ft.testing.assert_trees_all_equal(ref_metrics["loss"], history[i]["loss"])
    assert_bitwise_equal(ref, state)


def test_nonfinite_ignore_lets_nan_reach_the_params():
    params, buffers, loss_fn = _bn_problem(dropout=False)
    tx = ft.sgd(0.1)
    step = ft.make_train_step(loss_fn, tx, nonfinite="ignore")
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx)
    state, metrics = step(state, _batches(1, {0: "nan_input"})[0])
    assert "skipped" not in metrics
    assert not all(bool(torch.isfinite(p).all()) for p in state.params.values())


def test_default_skip_keeps_no_state_and_reports_skipped():
    params, buffers, loss_fn = _bn_problem(dropout=False)
    tx = ft.adam(1e-2)
    step = ft.make_train_step(loss_fn, tx, donate=True)
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx)
    before = snapshot(state)
    state, metrics = step(state, _batches(1, {0: "nan_input"})[0])
    assert state.extra == {} and "skipped_total" not in metrics
    assert metrics["skipped"].dtype == torch.int32 and int(metrics["skipped"]) == 1
    assert_bitwise_equal(snapshot(state), before)


def test_negative_zero_params_survive_a_skipped_in_place_step():
    params = {"w": torch.tensor([-0.0, 0.0, 1.5]), "h": torch.tensor([-0.0], dtype=torch.bfloat16)}
    tx = ft.sgd(0.1, momentum=0.9)

    def loss_fn(p, b):
        return (p["w"] * b).sum() + p["h"].float().sum() * b.sum()

    for donate in (True, False):
        step = ft.make_train_step(loss_fn, tx, donate=donate)
        state = ft.TrainState.create(params=params, tx=tx)
        before = snapshot(state)
        state, metrics = step(state, torch.tensor([1.0, float("nan"), 2.0]))
        assert int(metrics["skipped"]) == 1
        assert_bitwise_equal(snapshot(state), before)


def test_max_consecutive_skips_raises_from_the_next_call_with_the_state_intact():
    params, buffers, loss_fn = _bn_problem(dropout=False)
    tx = ft.adam(1e-2)
    step = ft.make_train_step(loss_fn, tx, max_consecutive_skips=1)
    good, bad = _batches(2, {1: "nan_input"})
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx)
    state, _ = step(state, good)
    kept = snapshot(state)
    state, m1 = step(state, bad)  # 1 in a row: allowed
    state, _ = step(state, good)  # a finite step resets the count
    assert int(state.extra["nonfinite"].consecutive) == 0
    state, _ = step(state, bad)
    state, m2 = step(state, bad)  # 2 in a row: returned normally, raised by the next call
    assert int(m2["skipped"]) == 1 and int(m2["skipped_total"]) == 3
    before = snapshot(state)
    with pytest.raises(ft.NonFiniteError, match=r"2 consecutive .*max_consecutive_skips=1"):
        step(state, good)
    assert not state.consumed
    assert_bitwise_equal(snapshot(state), before)
    del kept, m1


def test_a_finite_step_after_skips_equals_a_step_from_the_kept_state():
    # apply_if_finite-style counters: the consecutive count resets, the total does not.
    params, buffers, loss_fn = _bn_problem(dropout=False)
    tx = ft.adam(1e-2)
    step = ft.make_train_step(loss_fn, tx, max_consecutive_skips=5, donate=False)
    good, bad = _batches(2, {1: "nan_input"})
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx, seed=None)
    s1, _ = step(state, bad)
    s2, _ = step(s1, good)
    direct, _ = step(state, good)
    assert_bitwise_equal(s2.params, direct.params)
    assert_bitwise_equal(s2.opt_state, direct.opt_state)
    assert int(s2.extra["nonfinite"].total) == 1 and int(s2.extra["nonfinite"].consecutive) == 0


class _FoundInfStage:
    """A replacement optimizer stage that declares it can skip by itself."""

    supports_found_inf = True

    def __init__(self):
        self.calls = []

    def __call__(self, tx, grads, opt_state, params, *, in_place, found_inf):
        self.calls.append(found_inf)
        from functrain.train.optimizer_stage import Applied

        return Applied(params, opt_state, None)


def test_an_optimizer_stage_with_found_inf_support_gets_the_flag():
    tx = ft.sgd(0.1)
    step = ft.make_train_step(lambda p, b: (p["w"] * b).mean(), tx)
    stage = _FoundInfStage()
    step.apply_optimizer = stage
    state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=tx)
    state, _ = step(state, torch.tensor([1.0, float("inf")]))
    state, _ = step(state, torch.tensor([1.0, 2.0]))
    assert [bool(f) for f in stage.calls] == [True, False]


# ------------------------------------------------------------------------- loss scaling


def _fp16_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(32, 6)
    y = torch.randn(32)
    return net, x, y


def _autocast_loss(out_fn):
    def loss(*args):
        with torch.autocast("cpu", dtype=torch.float16):
            out = out_fn(*args)
        return F.mse_loss(out.float().squeeze(-1), args[-1]["y"])

    return loss


def test_dynamic_loss_scale_follows_torch_grad_scaler():
    net, x, y = _fp16_problem()
    model, params, _ = ft.functionalize(net, copy=True)
    # A huge first scale overflows the float16 backward: the scale backs off, then grows
    # again every 3 finite steps and overflows again.
    policy = ft.DynamicLossScale(init_scale=2.0**30, growth_interval=3)
    lr, momentum = 0.05, 0.9

    scaler = torch.amp.GradScaler(
        "cpu", init_scale=policy.init_scale, growth_interval=policy.growth_interval
    )
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    ref_loss = _autocast_loss(lambda b: net(b["x"]))
    ref_scales, ref_skipped, ref_losses = [], [], []
    n_steps = 24
    for _ in range(n_steps):
        opt.zero_grad()
        loss = ref_loss({"x": x, "y": y})
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ref_scales.append(scale)
        ref_skipped.append(int(scaler.get_scale() < scale))
        ref_losses.append(loss.detach())

    tx = ft.sgd(lr, momentum=momentum)
    ft_loss = _autocast_loss(lambda p, b: model(p, b["x"]))
    step = ft.make_train_step(ft_loss, tx, loss_scale=policy)
    state = ft.TrainState.create(params=params, tx=tx)
    scales, skipped, losses = [], [], []
    for _ in range(n_steps):
        state, metrics = step(state, {"x": x, "y": y})
        scales.append(float(metrics["loss_scale"]))
        skipped.append(int(metrics["skipped"]))
        losses.append(metrics["loss"])
    assert scales == ref_scales
    assert skipped == ref_skipped
    assert 5 <= sum(skipped) < n_steps - 5  # both overflows and updates happened
    assert int(metrics["skipped_total"]) == sum(skipped)
    ft.testing.assert_trees_all_close(losses, ref_losses, rtol=1e-6, atol=0)
    ft.testing.assert_trees_all_close(
        state.params, dict(net.named_parameters()), rtol=1e-6, atol=1e-8
    )
    assert float(state.extra["loss_scale"].scale) == scaler.get_scale()


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("form", ["mean", "sum", "output"])
def test_a_power_of_two_loss_scale_changes_no_bit_in_float32(micro_batches, form):
    torch.manual_seed(0)
    model, params, _ = ft.functionalize(nn.Linear(3, 2))
    batch = {"x": torch.randn(9, 3), "y": torch.randn(9, 2)}

    def loss_fn(p, b):
        err = (model(p, b["x"]) - b["y"]).square()
        if form == "sum":
            return ft.LossSum(err.sum(), err.numel())
        if form == "output":
            return ft.LossOutput(err.mean(), aux={"mae": err.sqrt().mean()})
        return err.mean()

    tx = ft.adam(1e-2)
    plain = ft.make_train_step(loss_fn, tx, micro_batches=micro_batches)
    scaled = ft.make_train_step(
        loss_fn, tx, micro_batches=micro_batches, loss_scale=ft.DynamicLossScale(2.0**12)
    )
    a = ft.TrainState.create(params=params, tx=tx)
    b = ft.TrainState.create(params=params, tx=tx)
    for _ in range(3):
        a, ma = plain(a, batch)
        b, mb = scaled(b, batch)
        assert_bitwise_equal(a.params, b.params)
        assert_bitwise_equal(a.opt_state, b.opt_state)
        assert_bitwise_equal(ma["loss"], mb["loss"])
        assert_bitwise_equal(ma["grad_norm"], mb["grad_norm"])
        if form == "output":
            assert_bitwise_equal(ma["mae"], mb["mae"])


@pytest.mark.parametrize("donate", [True, False])
def test_an_overflow_halves_the_scale_and_keeps_float16_params_bit_for_bit(donate):
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3).half(), "b": torch.zeros(3).half()}

    def loss_fn(p, batch):
        out = batch @ p["w"] + p["b"]
        return out.float().square().mean()

    tx = ft.adam(1e-3)
    policy = ft.DynamicLossScale(init_scale=2.0**8, growth_interval=2)
    step = ft.make_train_step(loss_fn, tx, loss_scale=policy, donate=donate)
    state = step.prepare(ft.TrainState.create(params=params, tx=tx))
    small = torch.randn(5, 4).half()
    huge = small * 3e4  # overflows float16 in the forward
    expect_scale = 2.0**8
    for i, batch in enumerate([small, small, huge, small, huge, huge, small]):
        before = snapshot(state)
        state, metrics = step(state, batch)
        assert float(metrics["loss_scale"]) == expect_scale
        overflow = batch is huge
        assert int(metrics["skipped"]) == int(overflow), i
        after = snapshot(state)
        if overflow:
            assert_bitwise_equal(after[:3], before[:3])
            expect_scale /= 2
        else:
            assert not torch.equal(after[0]["w"], before[0]["w"])
            if int(before[3]["loss_scale"].growth_tracker) + 1 == 2:
                expect_scale *= 2
        assert float(state.extra["loss_scale"].scale) == expect_scale
        assert state.params["w"].dtype == torch.float16


def test_loss_scale_state_lives_in_extra_and_prepare_is_idempotent():
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        lambda p, b: (p["w"] * b).mean(), tx, loss_scale=ft.DynamicLossScale(4.0), donate=False
    )
    state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=tx)
    prepared = step.prepare(state)
    assert not state.consumed and state.extra == {}
    assert float(prepared.extra["loss_scale"].scale) == 4.0
    again = step.prepare(prepared)
    assert again.extra["loss_scale"] is prepared.extra["loss_scale"]
    new, _ = step(prepared, torch.ones(2))
    ft.testing.assert_trees_all_equal_structs(new, prepared)


def test_dynamic_loss_scale_update_matches_grad_scaler_rules():
    policy = ft.DynamicLossScale(init_scale=2.0**127, growth_factor=2.0, growth_interval=2)
    s = policy.init()
    finite, overflow = torch.tensor(True), torch.tensor(False)
    s = policy.update(s, finite)
    assert (float(s.scale), int(s.growth_tracker)) == (2.0**127, 1)
    s = policy.update(s, finite)  # 2**128 is not a float32: no growth, tracker reset
    assert (float(s.scale), int(s.growth_tracker)) == (2.0**127, 0)
    s = policy.update(s, overflow)
    assert (float(s.scale), int(s.growth_tracker)) == (2.0**126, 0)
    assert s.scale.dtype == torch.float32 and s.growth_tracker.dtype == torch.int32


def test_all_finite():
    assert bool(ft.all_finite({}))
    assert bool(ft.all_finite([torch.empty(0), torch.arange(3)]))
    assert bool(ft.all_finite([torch.ones(2, dtype=torch.float16), torch.ones(1)]))
    assert not bool(ft.all_finite([torch.ones(2), torch.tensor([float("-inf")]).half()]))
    assert not bool(ft.all_finite({"a": torch.tensor([complex(0, float("nan"))])}))
    assert ft.all_finite([torch.ones(2)]).shape == ()


# ------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nonfinite": "drop"}, ValueError, "nonfinite must be 'skip' or 'ignore', got 'drop'"),
        ({"max_consecutive_skips": -1}, ValueError, "max_consecutive_skips must be"),
        ({"max_consecutive_skips": True}, ValueError, "max_consecutive_skips must be"),
        ({"loss_scale": 1024.0}, TypeError, "loss_scale must be a ft.DynamicLossScale"),
        (
            {"nonfinite": "ignore", "loss_scale": ft.DynamicLossScale()},
            ValueError,
            "loss_scale needs nonfinite='skip'",
        ),
        (
            {"nonfinite": "ignore", "max_consecutive_skips": 2},
            ValueError,
            "max_consecutive_skips needs nonfinite='skip'",
        ),
    ],
)
def test_bad_step_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ft.make_train_step(lambda p, b: p.sum(), ft.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"init_scale": 0.0}, ValueError, "init_scale must be finite and > 0"),
        ({"init_scale": float("inf")}, ValueError, "init_scale must be finite"),
        ({"init_scale": "big"}, TypeError, "init_scale must be a number"),
        ({"growth_factor": 1.0}, ValueError, "growth_factor must be > 1"),
        ({"backoff_factor": 1.5}, ValueError, r"backoff_factor must be in \(0, 1\)"),
        ({"growth_interval": 0}, ValueError, "growth_interval must be a positive int"),
        ({"growth_interval": 2.5}, ValueError, "growth_interval must be a positive int"),
    ],
)
def test_bad_loss_scale_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ft.DynamicLossScale(**kwargs)


def test_a_foreign_loss_scale_state_is_named():
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        lambda p, b: (p["w"] * b).mean(), tx, loss_scale=ft.DynamicLossScale()
    )
    state = ft.TrainState.create(params={"w": torch.ones(2)}, tx=tx, extra={"loss_scale": 1.0})
    with pytest.raises(TypeError, match=r"state.extra\['loss_scale'\] must be a LossScaleState"):
        step(state, torch.ones(2))
    with pytest.raises(TypeError, match="expected a LossScaleState"):
        ft.DynamicLossScale.unscale(2.0, [torch.ones(1)])


def test_an_apply_if_finite_policy_in_the_optimizer_instead_of_the_step():
    # The other configurable policy: the step lets non-finite gradients through
    # (nonfinite="ignore") and ft.apply_if_finite decides, optax-style: skip, but apply the
    # update once more than max_consecutive_errors non-finite steps came in a row.
    params, buffers, loss_fn = _bn_problem(dropout=False)
    inner = ft.adam(1e-2)
    tx = ft.apply_if_finite(inner, max_consecutive_errors=2)
    step = ft.make_train_step(loss_fn, tx, nonfinite="ignore", donate=False)
    good, bad = _batches(2, {1: "nan_input"})
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx)
    state, _ = step(state, good)
    kept = state
    for count in (1, 2):  # skipped: params and the inner Adam state exactly as before
        state, _ = step(state, bad)
        assert_bitwise_equal(state.params, kept.params)
        assert_bitwise_equal(state.opt_state.inner_state, kept.opt_state.inner_state)
        assert int(state.opt_state.notfinite_count) == count
    state, _ = step(state, bad)  # the third in a row is applied: NaN reaches the params
    assert not bool(ft.all_finite(state.params))

    # and a good batch after skips continues exactly like one that never saw the NaNs
    skipped, _ = step(step(kept, bad)[0], good)
    direct, _ = step(kept, good)
    assert_bitwise_equal(skipped.params, direct.params)
    assert_bitwise_equal(skipped.opt_state.inner_state, direct.opt_state.inner_state)
