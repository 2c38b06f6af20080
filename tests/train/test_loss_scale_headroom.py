"""A scaled float16 loss keeps the headroom of the weighted sum on every gradient path."""

import pytest
import torch

import functrain as ft


@pytest.mark.parametrize(
    ("strategy", "backend"), [("loop", "autograd"), ("loop", "func"), ("vmap", "func")]
)
def test_micro_batch_gradients_are_weighted_before_they_can_overflow(strategy, backend):
    # The first of 4 micro-batches has a gradient of 4 per coordinate, the others 0: scaled by
    # 2**14 it overflows float16 (max 65504), while weighted by its share of the batch (1/4)
    # first, as the classic loop's (loss / K).backward() does, it is 16384, and so is the sum.
    # The func paths used to scale the unweighted gradient and skipped the step.
    params = {"w": torch.ones(3, dtype=torch.float16)}
    batch = torch.zeros(8, 3, dtype=torch.float16)
    batch[:2] = 4.0
    tx = ft.sgd(0.5)
    step = ft.make_train_step(
        lambda p, b: (b * p["w"]).sum(-1).mean(),
        tx,
        micro_batches=4,
        strategy=strategy,
        grad_backend=backend,
        loss_scale=ft.DynamicLossScale(init_scale=2.0**14),
    )
    state, metrics = step(ft.TrainState.create(params=params, tx=tx), batch)
    assert int(metrics["skipped"]) == 0
    # the gradient of the mean loss is 1 per coordinate: w = 1 - 0.5 * 1
    assert torch.equal(state.params["w"], torch.full((3,), 0.5, dtype=torch.float16))
    assert float(metrics["loss"]) == 3.0
