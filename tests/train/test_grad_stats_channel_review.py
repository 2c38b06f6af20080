"""Review of the grad_stats backward channel: half-precision parameters under loss scaling.

A float16 micro-batch gradient of a mean loss is the scaled, weighted ``S·wᵢ·∇Lᵢ``. The hook
must see ``∇Lᵢ``; dividing by ``wᵢ`` before the scale came off overflowed float16 (``S·∇Lᵢ``
above 65504) and the hook got inf for micro-batches whose gradients were finite. References
are computed by hand in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft

# Four micro-batches of two rows; every row of micro-batch i is ROWS[i] (both columns).
ROWS = (1.5, 1.25, 1.75, 1.0)


def _batch() -> torch.Tensor:
    x = torch.tensor([[r, r] for r in ROWS for _ in range(2)], dtype=torch.float64)
    return x.to(torch.float16)


def _loss(p: dict, x: torch.Tensor) -> torch.Tensor:
    # ∇_w of the mean of x @ w is the mean row: micro-batch i's gradient is (rᵢ, rᵢ).
    return (x @ p["w"]).float().mean()


def _recording_hook(seen: list) -> ft.GradStatsHook:
    base = ft.noise_scale_hook(decay=0.5)

    def per_micro_batch(grad, size):
        out = base.per_micro_batch(grad, size)
        seen.append(out["sq_norm"].double())
        return out

    def per_micro_batch_sq_norm(sq_norm, size):
        seen.append(sq_norm.double())
        return base.per_micro_batch_sq_norm(sq_norm, size)

    hook = base._replace(per_micro_batch=per_micro_batch)
    if "per_micro_batch_sq_norm" in ft.GradStatsHook._fields:  # absent before the channel
        hook = hook._replace(per_micro_batch_sq_norm=per_micro_batch_sq_norm)
    return hook


@pytest.mark.parametrize(
    ("strategy", "backend"), [("loop", "autograd"), ("loop", "func"), ("vmap", "func")]
)
def test_half_params_under_loss_scaling_hand_the_hook_finite_unscaled_norms(strategy, backend):
    seen: list = []
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        _loss,
        tx,
        micro_batches=4,
        strategy=strategy,
        grad_backend=backend,
        grad_stats=_recording_hook(seen),
        loss_scale=ft.DynamicLossScale(),  # 2**16: S·wᵢ·rᵢ fits float16, S·rᵢ does not
    )
    state = ft.TrainState.create(params={"w": torch.zeros(2, dtype=torch.float16)}, tx=tx)
    step(state, _batch())
    expected = [2 * r * r for r in ROWS]  # ‖(rᵢ, rᵢ)‖², exact in float16
    assert len(seen) == 4
    for got, want in zip(seen, expected):
        assert math.isfinite(float(got))
        assert float(got) == pytest.approx(want, rel=1e-3)


def test_a_combined_gradient_that_overflowed_has_a_nan_diversity():
    # The float16 sum S·Σ wᵢ·rᵢ = 65536·1.375 overflows: the step is skipped, and the
    # documented diversity of a step with a non-finite gradient is NaN (not finite/inf = 0).
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        _loss,
        tx,
        micro_batches=4,
        grad_backend="autograd",
        grad_stats=ft.noise_scale_hook(decay=0.5),
        loss_scale=ft.DynamicLossScale(),
    )
    state = ft.TrainState.create(params={"w": torch.zeros(2, dtype=torch.float16)}, tx=tx)
    _, metrics = step(state, _batch())
    assert int(metrics["skipped"]) == 1
    assert torch.isnan(metrics["noise_scale/gradient_diversity"])
