"""``noise_scale_hook(cosine=True)`` in the eager autograd loop, where backward sums the
micro-batch gradients in place and the running sum of unit gradients is formed from the
gradients backward produces (``GradStatsHook.accumulates_unit_gradients``).

References: the mean pairwise cosine of micro-batch mean gradients taken one by one with
``torch.func.grad`` in float64, and the ``"func"`` backend (which calls ``accumulate``)."""

import itertools
import math

import pytest
import torch

import functrain as ft

F64 = torch.float64


def _problem(n, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, generator=g, dtype=F64).to(dtype),
        "b": torch.randn(3, generator=g, dtype=F64).to(dtype),
        "extra": torch.randn(3, generator=g, dtype=F64).to(dtype),
    }
    batch = {
        "x": torch.randn(n, 4, generator=g, dtype=F64).to(dtype),
        "y": torch.randn(n, 3, generator=g, dtype=F64).to(dtype),
    }
    return params, batch


def _residual(p, b):
    return (b["x"] @ p["w"] + p["b"] - b["y"]) ** 2


def _by_hand(mean_loss, params, micro_batches):
    """Mean cosine over pairs of the non-zero micro-batch mean gradients (float64)."""
    flat = []
    for mb in micro_batches:
        grads = torch.func.grad(mean_loss)(params, mb)
        vec = torch.cat([grads[k].reshape(-1).to(F64) for k in sorted(grads)])
        if vec.norm() > 0:
            flat.append(vec)
    pairs = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(flat, 2)]
    return sum(pairs) / len(pairs)


def _split(batch, sizes):
    out, start = [], 0
    for size in sizes:
        out.append({k: v[start : start + size] for k, v in batch.items()})
        start += size
    return out


def _metrics(loss_fn, params, batch, sizes, backend="autograd", **options):
    """One SGD step with ``noise_scale_hook(cosine=True)`` (``grad_stats=None``: without it)."""
    tx = ft.sgd(0.1)
    options.setdefault("grad_stats", ft.noise_scale_hook(cosine=True))
    step = ft.make_train_step(
        loss_fn, tx, micro_batches=sizes, grad_backend=backend, donate=False, **options
    )
    state, metrics = step(ft.TrainState.create(params=params, tx=tx), batch)
    return state, metrics, step


def test_the_autograd_loop_sums_in_place_and_forms_the_unit_sum():
    params, batch = _problem(9)
    _, metrics, step = _metrics(lambda p, b: _residual(p, b).mean(), params, batch, [4, 2, 3])
    assert step.grad_stage.accumulates_in_place
    expected = _by_hand(lambda p, b: _residual(p, b).mean(), params, _split(batch, [4, 2, 3]))
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)


def test_the_update_is_the_same_bit_for_bit_with_the_cosine_hook():
    params, batch = _problem(8, dtype=torch.float32)

    def loss_fn(p, b):
        return _residual(p, b).mean()

    tx = ft.adamw(0.01)
    states = []
    for hook in (None, ft.noise_scale_hook(cosine=True)):
        step = ft.make_train_step(loss_fn, tx, micro_batches=4, grad_stats=hook, donate=False)
        state = ft.TrainState.create(params=params, tx=tx)
        for _ in range(3):
            state, _ = step(state, batch)
        states.append(state)
    ft.testing.assert_trees_all_equal(states[0].params, states[1].params)
    ft.testing.assert_trees_all_equal(states[0].opt_state, states[1].opt_state)


def test_a_parameter_first_used_in_a_later_micro_batch():
    """Backward gives ``extra`` no gradient in the first micro-batch: its ``.grad`` is made by
    a later one, whose gradient the record holds."""
    params, batch = _problem(6)
    batch["use"] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)

    def loss_fn(p, b):
        loss = _residual(p, b).mean()
        if bool(b["use"][0]):  # a Python branch: "extra" is not in the first graph at all
            loss = loss + (p["extra"] * b["x"][:, :3]).sum(1).square().mean()
        return loss

    _, metrics, _ = _metrics(loss_fn, params, batch, [2, 2, 2])
    expected = _by_hand(loss_fn, params, _split(batch, [2, 2, 2]))
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)


def test_a_token_less_micro_batch_is_left_out_even_when_its_sum_has_a_gradient():
    """The step defines a ``LossSum`` micro-batch that counts no token as having no mean
    gradient; here its sum still depends on the params (a penalty), so backward gives it a
    non-zero gradient that must not count as a unit vector."""
    params, batch = _problem(6)
    batch["mask"] = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0], dtype=F64)

    def token_loss(p, b):
        per = _residual(p, b).sum(1) * b["mask"]
        return ft.LossSum(per.sum() + 1e-3 * p["w"].square().sum(), b["mask"].sum())

    def mean_loss(p, b):
        return _residual(p, b).sum(1).mean() + 1e-3 * p["w"].square().sum() / b["x"].shape[0]

    _, metrics, _ = _metrics(token_loss, params, batch, [2, 2, 2])
    kept = [mb for i, mb in enumerate(_split(batch, [2, 2, 2])) if i != 1]
    expected = _by_hand(mean_loss, params, kept)
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)
    _, func_metrics, _ = _metrics(token_loss, params, batch, [2, 2, 2], backend="func")
    torch.testing.assert_close(
        metrics["noise_scale/mean_cosine"], func_metrics["noise_scale/mean_cosine"]
    )


def test_a_gradient_penalty_inside_loss_fn_does_not_count():
    params, batch = _problem(6)

    def loss_fn(p, b):
        loss = _residual(p, b).mean()
        (gw,) = torch.autograd.grad(loss, p["w"], create_graph=True)
        return loss + 0.1 * gw.square().sum()

    def loss_by_func(p, b):  # the same objective, its penalty by torch.func
        grads = torch.func.grad(lambda w: _residual({**p, "w": w}, b).mean())(p["w"])
        return _residual(p, b).mean() + 0.1 * grads.square().sum()

    _, metrics, _ = _metrics(loss_fn, params, batch, [2, 2, 2])
    expected = _by_hand(loss_by_func, params, _split(batch, [2, 2, 2]))
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_scaling_and_low_precision_agree_with_the_func_backend(dtype):
    params, batch = _problem(8, dtype=dtype)
    scale = ft.DynamicLossScale(init_scale=2.0**10)

    def loss_fn(p, b):
        return _residual(p, b).float().mean()

    got = _metrics(loss_fn, params, batch, [2, 2, 4], loss_scale=scale)[1]
    ref = _metrics(loss_fn, params, batch, [2, 2, 4], backend="func", loss_scale=scale)[1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        got["noise_scale/mean_cosine"], ref["noise_scale/mean_cosine"], rtol=tol, atol=tol
    )
    assert got["noise_scale/mean_cosine"].dtype == torch.float32
