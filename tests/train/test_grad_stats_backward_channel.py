"""``GradStatsHook.per_micro_batch_sq_norm``: the eager autograd loop forms each micro-batch's
``‖ĝᵢ‖²`` from the gradients backward hands each parameter (no micro-batch gradient kept). Its
metrics must equal those of the ``"func"`` loop, which hands the hook whole gradients, and its
update must equal a step without the hook, bit for bit; the squared norms are checked against
micro-batch gradients computed by hand."""

from __future__ import annotations

import pytest
import torch
from micro_batch_reference import micro_batch_grads

import functrain as ft
from functrain import _sq_norms


def _data(dtype, n=11):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen, dtype=dtype)
    y = torch.randn(n, 2, generator=gen, dtype=dtype)
    mask = (torch.rand(n, generator=gen) > 0.3).to(dtype)
    return {"x": x, "y": y, "mask": mask}


def _params(dtype, tied=False):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4, 2, generator=gen, dtype=dtype)
    params = {"w": w, "b": torch.zeros(2, dtype=dtype), "unused": torch.ones(3, dtype=dtype)}
    if tied:
        params["v"] = torch.randn(2, 2, generator=gen, dtype=dtype)
    return params


def _mean_loss(p, b):
    out = b["x"] @ p["w"] + p["b"]
    if "v" in p:  # one parameter used twice: its gradient sums both uses
        out = out @ p["v"] @ p["v"]
    return ((out - b["y"]) ** 2).mean()


def _sum_loss(p, b):
    per_row = ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).sum(1) * b["mask"]
    return ft.LossSum(per_row.sum(), b["mask"].sum())


def _hook_with_records(seen):
    hook = ft.noise_scale_hook(decay=0.5)

    def record(sq_norm, size):
        seen.append((sq_norm.clone(), size.clone()))
        return hook.per_micro_batch_sq_norm(sq_norm, size)

    return hook._replace(per_micro_batch_sq_norm=record)


@pytest.mark.parametrize(
    ("loss_fn", "tied"), [(_mean_loss, False), (_mean_loss, True), (_sum_loss, False)]
)
def test_the_backward_channel_equals_the_func_loop_and_the_plain_update(loss_fn, tied):
    dtype = torch.float64
    params, batch = _params(dtype, tied), _data(dtype)
    tx = ft.adamw(0.05)
    seen: list = []
    steps = {
        "channel": ft.make_train_step(
            loss_fn,
            tx,
            micro_batches=4,
            grad_backend="autograd",
            grad_stats=_hook_with_records(seen),
        ),
        "func": ft.make_train_step(
            loss_fn, tx, micro_batches=4, grad_backend="func", grad_stats=ft.noise_scale_hook(0.5)
        ),
        "plain": ft.make_train_step(loss_fn, tx, micro_batches=4, grad_backend="autograd"),
    }
    states = {k: ft.TrainState.create(params=params, tx=tx) for k in steps}
    for _ in range(3):
        metrics = {}
        for k, step in steps.items():
            states[k], metrics[k] = step(states[k], batch)
        for name, value in metrics["func"].items():
            torch.testing.assert_close(metrics["channel"][name], value, rtol=1e-10, atol=1e-12)
    for a, b in zip(ft.tree.leaves(states["channel"]), ft.tree.leaves(states["plain"])):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            assert torch.equal(a, b)  # the hook leaves the update bit for bit as it was
    assert any(k.startswith("noise_scale/") for k in metrics["channel"])


def test_squared_norms_equal_micro_batch_gradients_by_hand():
    dtype = torch.float64
    params, batch = _params(dtype, tied=True), _data(dtype)
    seen: list = []
    tx = ft.sgd(0.0)  # the parameters stay put: every step sees gradients at `params`
    step = ft.make_train_step(_mean_loss, tx, micro_batches=4, grad_stats=_hook_with_records(seen))
    step(ft.TrainState.create(params=params, tx=tx), batch)
    sizes = [int(size) for _, size in seen]
    assert sizes == [3, 3, 3, 2]
    for (sq_norm, _), grads in zip(seen, micro_batch_grads(_mean_loss, params, batch, sizes)):
        expected = sum(float(g.square().sum()) for g in grads)
        assert abs(float(sq_norm) - expected) <= 1e-12 * expected


def _assert_backends_agree(loss_fn, params, batch, rtol, **options):
    """The noise-scale metrics of one step: the autograd channel against the func loop."""
    tx = ft.sgd(0.01)
    out = {}
    for backend in ("autograd", "func"):
        step = ft.make_train_step(
            loss_fn,
            tx,
            micro_batches=4,
            grad_backend=backend,
            grad_stats=ft.noise_scale_hook(0.5),
            **options,
        )
        _, out[backend] = step(ft.TrainState.create(params=params, tx=tx), batch)
    for name in ("noise_scale/trace_sigma", "noise_scale/grad_sq", "noise_scale/b_simple"):
        torch.testing.assert_close(out["autograd"][name], out["func"][name], rtol=rtol, atol=0)


def test_loss_scaling_is_taken_out_of_the_squared_norms():
    dtype = torch.float32
    scale = ft.DynamicLossScale(init_scale=2.0**10)
    _assert_backends_agree(_mean_loss, _params(dtype), _data(dtype), rtol=1e-5, loss_scale=scale)


def test_the_hook_fields_are_optional_and_checked_as_before():
    hook = ft.noise_scale_hook()
    assert hook.per_micro_batch_sq_norm is not None and hook.accumulate is None
    cosine = ft.noise_scale_hook(cosine=True)  # its unit-gradient sum is formed in backward
    assert cosine.per_micro_batch_sq_norm is not None and cosine.accumulates_unit_gradients
    plain = ft.GradStatsHook(init=lambda p: None, per_micro_batch=lambda g, b: {}, update=None)
    assert plain.per_micro_batch_sq_norm is None and not plain.accumulates_unit_gradients


def test_gradients_taken_inside_loss_fn_do_not_count_as_the_micro_batch_gradient():
    """A loss with a gradient penalty differentiates with respect to the parameters itself;
    only the step's own backward pass may feed the leaf hooks."""
    dtype = torch.float64

    def penalised(p, b):
        fit = _mean_loss(p, b)
        (g,) = torch.autograd.grad(fit, [p["w"]], create_graph=True)
        return fit + 0.1 * g.square().sum()

    _assert_backends_agree(penalised, _params(dtype), _data(dtype), rtol=1e-10)


@pytest.fixture
def two_threads():
    """Large leaves are reduced by rows with several threads (the suite runs on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_middle_and_small_leaves_all_count(dtype):
    """A leaf above ``ROWS_MIN_NUMEL`` is reduced by rows in its hook, the others by one
    vector norm each (``_SqNormRecord``): together they must give the by-hand squared norms."""
    gen = torch.Generator().manual_seed(2)
    wide = _sq_norms.ROWS_MIN_NUMEL // 128 + 1  # w: 128 x wide, reduced by rows
    params = {
        "w": torch.randn(128, wide, generator=gen, dtype=dtype) / 30,
        "b": torch.randn(wide, generator=gen, dtype=dtype),  # small
        "head": torch.randn(wide, 2, generator=gen, dtype=dtype) / 30,  # small (2 * wide)
        "mid": torch.randn(64, 600, generator=gen, dtype=dtype) / 10,  # 38400: middle
    }
    batch = {
        "x": torch.randn(10, 128, generator=gen, dtype=dtype),
        "y": torch.randn(10, 2, generator=gen, dtype=dtype),
    }

    def loss_fn(p, b):
        out = torch.tanh(b["x"] @ p["w"] + p["b"]) @ p["head"]
        out = out + torch.tanh(b["x"][:, :64] @ p["mid"]).mean(1, keepdim=True)
        return ((out - b["y"]) ** 2).mean()

    seen: list = []
    tx = ft.sgd(0.0)
    step = ft.make_train_step(loss_fn, tx, micro_batches=3, grad_stats=_hook_with_records(seen))
    step(ft.TrainState.create(params=params, tx=tx), batch)
    sizes = [int(size) for _, size in seen]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for (sq_norm, _), grads in zip(seen, micro_batch_grads(loss_fn, params, batch, sizes)):
        expected = sum(float(g.double().square().sum()) for g in grads)
        assert abs(float(sq_norm) - expected) <= tol * expected
