"""Second review of the non-finite check and loss scaling against GradScaler's documented rules.

References are by-hand float64 loops that follow ``torch.amp.GradScaler``'s policy: back off on
any inf/NaN gradient and skip the update, grow after ``growth_interval`` finite steps.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain.train import faults

INT32_MAX = 2**31 - 1


def _rounds_to_inf(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to inf in ``dtype``: max plus half an ulp."""
    info = torch.finfo(dtype)
    below = torch.nextafter(torch.tensor(info.max, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    return info.max + (info.max - below.item()) / 2


@pytest.mark.parametrize(
    ("dtype", "init_scale", "growth_interval"),
    [(torch.float16, 2.0**20, 3), (torch.bfloat16, 2.0**124, 2)],
)
@pytest.mark.parametrize("backend", ["func", "autograd"])
def test_low_precision_params_follow_grad_scaler_rules_over_many_steps(
    dtype, init_scale, growth_interval, backend
):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    w0 = torch.randn(4, generator=gen, dtype=torch.float64).to(dtype)
    lr, n_steps = 0.01, 30

    def loss_fn(p, batch):  # float32 maths; the backward casts the gradient to ``dtype``
        return (batch @ p["w"].float()).square().mean()

    policy = ft.DynamicLossScale(init_scale=init_scale, growth_interval=growth_interval)
    tx = ft.sgd(lr)
    step = ft.make_train_step(loss_fn, tx, loss_scale=policy, grad_backend=backend)
    state = ft.TrainState.create(params={"w": w0.clone()}, tx=tx)

    # The reference, in float64, rounding where the step stores ``dtype`` values.
    limit, loss_limit = _rounds_to_inf(dtype), _rounds_to_inf(torch.float32)
    w, scale, tracker = w0.double(), init_scale, 0
    ref_scales, ref_skips = [], []
    for _ in range(n_steps):
        state, metrics = step(state, x.float())
        grad = 2.0 / x.shape[0] * x.T @ (x @ w)
        scaled = grad * scale
        ref_scales.append(scale)
        loss = float((x @ w).square().mean())
        # GradScaler: an inf gradient skips and backs off. The step also checks the scaled
        # float32 loss (a documented difference; it only matters near float32's limit).
        if bool((scaled.abs() >= limit).any()) or loss * scale >= loss_limit:
            ref_skips.append(1)
            scale, tracker = scale * 0.5, 0
        else:
            ref_skips.append(0)
            g_low = scaled.to(dtype).double() * (1.0 / scale)
            w = (w - lr * g_low.to(dtype).double()).to(dtype).double()
            tracker += 1
            if tracker == growth_interval:  # grows only to a finite float32 scale
                scale, tracker = (scale * 2.0 if scale * 2.0 < loss_limit else scale), 0
        assert float(metrics["loss_scale"]) == ref_scales[-1]
        assert int(metrics["skipped"]) == ref_skips[-1]
    assert 3 <= sum(ref_skips) <= n_steps - 10  # both overflows and updates happened
    assert int(metrics["skipped_total"]) == sum(ref_skips)
    assert float(state.extra["loss_scale"].scale) == scale
    assert int(state.extra["loss_scale"].growth_tracker) == tracker
    assert state.params["w"].dtype == dtype
    torch.testing.assert_close(state.params["w"].double(), w, rtol=2e-2, atol=1e-3)


def _linear_loss(p, batch):
    return (batch * p["w"]).sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["func", "autograd"])
@pytest.mark.parametrize("scaled", [False, True])
def test_negative_zero_and_subnormal_gradients_are_finite(dtype, backend, scaled):
    tiny = torch.finfo(dtype).smallest_normal / 4  # a subnormal gradient
    batch = torch.tensor([-0.0, tiny, -tiny, 0.0], dtype=dtype)  # the gradient is the batch
    tx = ft.sgd(1.0)
    scale = ft.DynamicLossScale(init_scale=1.0) if scaled else None
    step = ft.make_train_step(_linear_loss, tx, grad_backend=backend, loss_scale=scale)
    state = ft.TrainState.create(params={"w": torch.ones(4, dtype=dtype)}, tx=tx)
    state, metrics = step(state, batch)
    assert int(metrics["skipped"]) == 0
    torch.testing.assert_close(state.params["w"], 1 - batch, rtol=0, atol=0)


def test_skip_counters_are_int32_and_saturate():
    tx = ft.sgd(0.1)
    step = ft.make_train_step(_linear_loss, tx, max_consecutive_skips=INT32_MAX)
    state = step.prepare(ft.TrainState.create(params={"w": torch.ones(3)}, tx=tx))
    near = torch.tensor(INT32_MAX - 1, dtype=torch.int32)
    state = state.replace(extra={"nonfinite": faults.NonFiniteState(near, near.clone())})
    nan = torch.full((3,), float("nan"))
    for expect in (INT32_MAX, INT32_MAX):  # no wrap to a negative count
        state, metrics = step(state, nan)
        counts = state.extra["nonfinite"]
        assert counts.consecutive.dtype == counts.total.dtype == torch.int32
        assert int(counts.consecutive) == int(counts.total) == expect
        assert metrics["skipped_total"].dtype == torch.int32


@pytest.mark.parametrize(
    ("strategy", "backend"), [("loop", "func"), ("loop", "autograd"), ("vmap", "func")]
)
def test_nan_in_one_micro_batch_backs_off_then_raises_naming_the_count(strategy, backend):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    good = x
    bad = x.clone()
    bad[5, 1] = float("nan")  # in micro-batch 2 of 4 only

    def loss_fn(p, batch):
        return (batch @ p["w"]).square().mean()

    tx = ft.adam(0.1)
    policy = ft.DynamicLossScale(init_scale=8.0, growth_interval=2)
    kwargs = dict(micro_batches=4, strategy=strategy, grad_backend=backend, loss_scale=policy)
    step = ft.make_train_step(loss_fn, tx, max_consecutive_skips=1, **kwargs)
    state = step.prepare(
        ft.TrainState.create(params={"w": torch.ones(3, dtype=torch.float64)}, tx=tx)
    )
    state, _ = step(state, good)
    kept = ft.tree.map(torch.clone, (state.params, state.opt_state))
    scales = []
    for _ in range(2):
        state, metrics = step(state, bad)
        scales.append(float(metrics["loss_scale"]))
        assert int(metrics["skipped"]) == 1
    assert scales == [8.0, 4.0]  # GradScaler: every inf/NaN backs off
    assert float(state.extra["loss_scale"].scale) == 2.0
    ft.testing.assert_trees_all_equal((state.params, state.opt_state), kept, bitwise=True)
    with pytest.raises(ft.NonFiniteError, match=r"^2 consecutive .*max_consecutive_skips=1"):
        step(state, good)
    # The state handed to the raising call is intact: with the counter reset it trains on.
    extra = dict(state.extra)
    extra["nonfinite"] = extra["nonfinite"]._replace(consecutive=torch.zeros((), dtype=torch.int32))
    state, metrics = step(state.replace(extra=extra), good)
    assert int(metrics["skipped"]) == 0
    assert float(metrics["loss_scale"]) == 2.0


def test_the_check_reads_nothing_on_the_host(monkeypatch):
    check = faults.StepFaults("skip", 3, ft.DynamicLossScale(4.0))
    params = {"w": torch.ones(3), "h": torch.ones(2, dtype=torch.float16)}
    extra = check.init_extra(params)
    grads = {"w": torch.tensor([1.0, float("nan"), 0.0]), "h": torch.ones(2, dtype=torch.float16)}

    def refuse(*args, **kwargs):
        raise AssertionError("host read in the non-finite check")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    result = check.check({"loss": torch.tensor(2.0)}, grads, extra, params)
    monkeypatch.undo()
    assert not bool(result.ok)
    assert int(result.extra["nonfinite"].consecutive) == 1
    assert float(result.extra["loss_scale"].scale) == 2.0
