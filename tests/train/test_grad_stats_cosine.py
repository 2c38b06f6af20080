"""The step-local accumulator of ``GradStatsHook`` and ``noise_scale_hook(cosine=True)``."""

import itertools
import math

import pytest
import torch

import functrain as ft

F64 = torch.float64


def _problem(n=10, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(d, 3, generator=g, dtype=F64), "b": torch.randn(3, dtype=F64)}
    batch = {"x": torch.randn(n, d, generator=g, dtype=F64), "y": torch.randn(n, 3, dtype=F64)}

    def loss_fn(p, b):
        return ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).mean()

    return params, batch, loss_fn


def _mean_cosine_by_hand(loss_fn, params, batch, sizes):
    """Mean of cos(ĝᵢ, ĝⱼ) over pairs of micro-batch mean gradients, in float64."""
    flat, start = [], 0
    for size in sizes:
        mb = {k: v[start : start + size] for k, v in batch.items()}
        grads = torch.func.grad(loss_fn)(params, mb)
        flat.append(torch.cat([grads[k].reshape(-1) for k in sorted(grads)]))
        start += size
    cosines = [float(a @ b / (a.norm() * b.norm())) for a, b in itertools.combinations(flat, 2)]
    return sum(cosines) / len(cosines)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("sizes", [[5, 5], [3, 1, 4, 2], [4, 4, 2]])
def test_mean_cosine_equals_the_pairs_by_hand(strategy, sizes):
    params, batch, loss_fn = _problem(n=sum(sizes))
    hook = ft.noise_scale_hook(cosine=True)
    step = ft.make_train_step(
        loss_fn,
        ft.sgd(0.1),
        micro_batches=sizes,
        strategy=strategy,
        grad_stats=hook,
        donate=False,
    )
    state = ft.TrainState.create(params=params, tx=ft.sgd(0.1))
    _, metrics = step(state, batch)
    expected = _mean_cosine_by_hand(loss_fn, params, batch, sizes)
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)
    assert metrics["noise_scale/mean_cosine"].shape == ()


def test_a_micro_batch_without_tokens_is_left_out_of_the_pairs():
    params, batch, _ = _problem(n=6)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0], dtype=F64)  # micro-batch 2 is padding
    batch["mask"] = mask

    def token_loss(p, b):
        per = ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).sum(1) * b["mask"]
        return ft.LossSum(per.sum(), b["mask"].sum())

    def mean_loss(p, b):
        return ((b["x"] @ p["w"] + p["b"] - b["y"]) ** 2).sum(1).mean()

    step = ft.make_train_step(
        token_loss,
        ft.sgd(0.1),
        micro_batches=3,
        grad_stats=ft.noise_scale_hook(cosine=True),
        donate=False,
    )
    _, metrics = step(ft.TrainState.create(params=params, tx=ft.sgd(0.1)), batch)
    kept = {k: torch.cat([v[:2], v[4:]]) for k, v in batch.items()}
    expected = _mean_cosine_by_hand(mean_loss, params, kept, [2, 2])
    assert math.isclose(float(metrics["noise_scale/mean_cosine"]), expected, rel_tol=1e-12)


def test_without_cosine_the_hook_adds_no_metric_and_no_accumulator():
    hook = ft.noise_scale_hook()
    assert hook.accumulate is None and hook.accumulator_init is None
    params, batch, loss_fn = _problem()
    step = ft.make_train_step(loss_fn, ft.sgd(0.1), micro_batches=2, grad_stats=hook)
    _, metrics = step(ft.TrainState.create(params=params, tx=ft.sgd(0.1)), batch)
    assert "noise_scale/mean_cosine" not in metrics


def test_a_custom_accumulator_sees_every_micro_batch_gradient_once():
    params, batch, loss_fn = _problem(n=9)
    sizes = [4, 2, 3]
    seen_sizes = []

    def accumulate(acc, g, b):
        seen_sizes.append(float(b))
        return ft.tree.add_scale(acc[0], b, g), acc[1] + 1

    def update(stats, grads, state):
        total, count = stats.accumulated
        return {"count": torch.tensor(float(count))}, total  # kept as the hook's state

    hook = ft.GradStatsHook(
        init=ft.tree.zeros_like,
        per_micro_batch=lambda g, b: {},
        update=update,
        name="probe",
        accumulator_init=lambda params: (ft.tree.zeros_like(params), 0),
        accumulate=accumulate,
    )
    step = ft.make_train_step(loss_fn, ft.sgd(0.1), micro_batches=sizes, grad_stats=hook)
    grads = torch.func.grad(loss_fn)(params, batch)
    new_state, metrics = step(ft.TrainState.create(params=params, tx=ft.sgd(0.1)), batch)
    assert sorted(seen_sizes) == sorted(map(float, sizes)) and int(metrics["count"]) == 3
    # Σ bᵢ ĝᵢ = B · ĝ: the size-weighted sum of the micro-batch means is B times the gradient.
    for k in grads:
        torch.testing.assert_close(new_state.extra["probe"][k], 9 * grads[k], rtol=1e-12, atol=0)


def test_accumulate_without_its_init_is_refused():
    hook = ft.GradStatsHook(
        init=lambda p: None,
        per_micro_batch=lambda g, b: {},
        update=lambda s, g, st: ({}, st),
        accumulate=lambda acc, g, b: acc,
    )
    with pytest.raises(TypeError, match="accumulator_init"):
        ft.make_train_step(lambda p, b: p["w"].sum() * b.sum(), ft.sgd(0.1), grad_stats=hook)


def test_the_compiled_step_reports_the_same_cosine():
    params, batch, loss_fn = _problem(n=8)
    hook = ft.noise_scale_hook(cosine=True)
    metrics = {}
    for compile in (False, True):
        step = ft.make_train_step(
            loss_fn, ft.sgd(0.1), micro_batches=4, grad_stats=hook, compile=compile
        )
        _, metrics[compile] = step(ft.TrainState.create(params=params, tx=ft.sgd(0.1)), batch)
    expected = _mean_cosine_by_hand(loss_fn, params, batch, [2, 2, 2, 2])
    for compile in (False, True):
        got = float(metrics[compile]["noise_scale/mean_cosine"])
        assert math.isclose(got, expected, rel_tol=1e-12), (compile, got, expected)
