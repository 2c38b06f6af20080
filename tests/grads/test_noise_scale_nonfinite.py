"""Noise-scale moving averages leave out steps whose estimates are not finite.

Under ``make_train_step(..., nonfinite="ignore")`` a NaN or inf gradient reaches the gradient
statistics hook; its estimates used to turn ``trace_sigma`` and ``grad_sq`` NaN for good. Now
such a step is left out (averages and count kept), so the state equals that of the same run
without the step. References: the closed-form EMA over the finite estimates, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from grad_problems import mlp_problem

import functrain as ft
from functrain import tree

F64 = torch.float64
NAN, INF = float("nan"), float("inf")


def _ema(values: list[float], decay: float) -> float:
    """``Σₖ (1 − d)·d^(n−k)·xₖ`` over the given (finite) values: the zero-started EMA."""
    n = len(values)
    return sum((1 - decay) * decay ** (n - k) * x for k, x in enumerate(values, 1))


def _estimate(s: float, g: float) -> ft.NoiseScaleEstimate:
    return ft.NoiseScaleEstimate(torch.tensor(s, dtype=F64), torch.tensor(g, dtype=F64))


STREAM = [(5.0, 1.0), (NAN, 2.0), (7.0, 2.0), (3.0, INF), (-INF, -INF), (3.0, 0.5), (NAN, NAN)]


@pytest.mark.parametrize("decay", [0.9, torch.tensor(0.75, dtype=F64)], ids=["float", "tensor"])
def test_update_leaves_out_nonfinite_estimates(decay) -> None:
    d = float(decay)
    state = ft.noise_scale_init(dtype=F64)
    kept: list[tuple[float, float]] = []
    for s, g in STREAM:
        before = state
        state, metrics = ft.noise_scale_metrics(state, _estimate(s, g), decay=decay)
        if math.isfinite(s) and math.isfinite(g):
            kept.append((s, g))
        else:  # the step changes nothing, bit for bit
            ft.testing.assert_trees_all_equal(state, before)
        ema_s, ema_g = _ema([x for x, _ in kept], d), _ema([y for _, y in kept], d)
        assert int(state.count) == len(kept)
        assert math.isclose(float(state.trace_sigma), ema_s, rel_tol=1e-12)
        assert math.isclose(float(state.grad_sq), ema_g, rel_tol=1e-12)
        correction = 1 - d ** len(kept)
        assert math.isclose(
            float(metrics["noise_scale/trace_sigma"]), ema_s / correction, rel_tol=1e-12
        )
        assert math.isclose(
            float(metrics["noise_scale/grad_sq"]), ema_g / correction, rel_tol=1e-12
        )
        assert math.isclose(float(metrics["noise_scale/b_simple"]), ema_s / ema_g, rel_tol=1e-12)
    # The same run without the bad steps gives the same state.
    clean = ft.noise_scale_init(dtype=F64)
    for s, g in kept:
        clean = ft.noise_scale_update(clean, _estimate(s, g), decay=decay)
    ft.testing.assert_trees_all_equal(state, clean)


def test_nonfinite_first_step_leaves_the_state_fresh() -> None:
    state = ft.noise_scale_update(ft.noise_scale_init(dtype=F64), _estimate(NAN, 1.0), decay=0.5)
    ft.testing.assert_trees_all_equal(state, ft.noise_scale_init(dtype=F64))


def test_update_reads_nothing_on_the_host() -> None:
    # Meta tensors hold no values: any host read (.item(), bool(), float()) raises.
    meta = torch.device("meta")
    state = ft.noise_scale_init(device=meta, dtype=F64)
    estimate = ft.NoiseScaleEstimate(
        torch.empty((), dtype=F64, device=meta), torch.empty((), dtype=F64, device=meta)
    )
    state, metrics = ft.noise_scale_metrics(state, estimate, decay=0.9)
    assert state.count.device.type == "meta" and state.count.dtype == torch.int32
    assert all(v.device.type == "meta" for v in metrics.values())


# ------------------------------------------------------------------------- in a train step

SIZES = [4, 6]
DECAY = 0.5


def _poisoned(batch: dict, value: float) -> dict:
    """``batch`` with one input of the second micro-batch set to ``value``."""
    x = batch["x"].clone()
    x[SIZES[0] + 1, 2] = value
    return {**batch, "x": x}


def _estimates_by_hand(loss_fn, params, batch) -> tuple[float, float]:
    """``tr(Σ)`` and ``|G|²`` from each micro-batch's gradient by plain autograd."""
    starts = [sum(SIZES[:i]) for i in range(len(SIZES))]
    micro = [
        torch.func.grad(loss_fn)(params, tree.map(lambda x, s=s, b=b: x[s : s + b], batch))
        for s, b in zip(starts, SIZES)
    ]
    total = sum(SIZES)
    combined = tree.scale(
        1.0 / total, tree.add(*[tree.scale(float(b), g) for b, g in zip(SIZES, micro)])
    )
    c2 = float(tree.norm(combined, squared=True))
    sq = [float(tree.norm(g, squared=True)) for g in micro]
    trace = (sum(b * s for b, s in zip(SIZES, sq)) - total * c2) / (len(SIZES) - 1)
    return trace, c2 - trace / total


def _run(batches: list[dict]):
    loss_fn, params, _ = mlp_problem(sum(SIZES))
    # apply_if_finite keeps the parameters finite across the bad step, so the steps after it
    # see the parameters the run without it sees; the step itself checks nothing ("ignore").
    tx = ft.apply_if_finite(ft.sgd(0.05), 10)
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=SIZES,
        nonfinite="ignore",
        grad_stats=ft.noise_scale_hook(decay=DECAY),
    )
    state = ft.TrainState.create(params=params, tx=tx)
    out = []
    for batch in batches:
        by_hand = _estimates_by_hand(loss_fn, state.params, batch)
        state, metrics = step(state, batch)
        out.append((by_hand, state.extra["noise_scale"], metrics))
    return out


@pytest.mark.parametrize("bad_at", [0, 2])
@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
def test_train_step_ignore_leaves_out_the_bad_step(bad_at: int, value: float) -> None:
    _, _, batch = mlp_problem(sum(SIZES))
    gen = torch.Generator().manual_seed(5)
    clean = [
        {**batch, "x": batch["x"] + 0.3 * torch.randn(batch["x"].shape, generator=gen, dtype=F64)}
        for _ in range(4)
    ]
    with_bad = [*clean[:bad_at], _poisoned(clean[bad_at], value), *clean[bad_at:]]
    got, want = _run(with_bad), _run(clean)
    assert not math.isfinite(got[bad_at][0][0])  # the bad step's estimate really is not finite
    # After every step, the state equals the clean run's state at the same point.
    for i, (_, state, metrics) in enumerate(got):
        j = i - (i >= bad_at)  # the clean step this one corresponds to (the one before if bad)
        if j < 0:
            ft.testing.assert_trees_all_equal(state, ft.noise_scale_init(dtype=F64))
            assert not math.isfinite(float(metrics["noise_scale/gradient_diversity"]))
            continue
        ft.testing.assert_trees_all_equal(state, want[j][1])
        if i == bad_at:
            assert not math.isfinite(float(metrics["noise_scale/gradient_diversity"]))
            for name in ("b_simple", "trace_sigma", "grad_sq"):
                key = f"noise_scale/{name}"
                ft.testing.assert_trees_all_equal(metrics[key], want[j][2][key])
    # And the clean run's averages are the closed-form EMA of the hand-computed estimates.
    traces = [est[0] for est, _, _ in want]
    grads = [est[1] for est, _, _ in want]
    for t, (_, state, metrics) in enumerate(want, 1):
        ema_s, ema_g = _ema(traces[:t], DECAY), _ema(grads[:t], DECAY)
        assert int(state.count) == t
        assert math.isclose(float(state.trace_sigma), ema_s, rel_tol=1e-9)
        assert math.isclose(float(state.grad_sq), ema_g, rel_tol=1e-9)
        assert math.isclose(float(metrics["noise_scale/b_simple"]), ema_s / ema_g, rel_tol=1e-9)
