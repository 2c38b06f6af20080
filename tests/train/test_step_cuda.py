"""CUDA: tensors follow the params' device and a step never synchronizes with the host."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_cuda_step_has_no_host_sync_and_matches_cpu(strategy):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8) if strategy == "loop" else nn.LayerNorm(8)
    net = nn.Sequential(nn.Linear(4, 8, bias=False), norm, nn.ReLU(), nn.Linear(8, 3))
    results = {}
    for device in ("cpu", "cuda"):
        model, params, buffers = ft.functionalize(net.to(device), copy=True)

        def loss_fn(p, b, buffers, model=model):
            out, buffers = model.apply(p, buffers, b["x"])
            labels = b["y"]
            total = F.cross_entropy(out, labels, reduction="sum", ignore_index=-1)
            return ft.LossOutput(
                ft.LossSum(total, (labels != -1).sum()),
                buffers=buffers if strategy == "loop" else None,
            )

        # SGD keeps CPU/CUDA rounding differences at rounding level (Adam would amplify them).
        tx = ft.chain(ft.clip_by_global_norm(1.0), ft.sgd(0.1, momentum=0.9))
        step = ft.make_train_step(loss_fn, tx, micro_batches=(3, 3, 4), strategy=strategy)
        state = ft.TrainState.create(params=params, tx=tx, buffers=buffers, seed=0)
        gen = torch.Generator().manual_seed(0)
        batch = {
            "x": torch.randn(10, 4, generator=gen),
            "y": torch.randint(-1, 3, (10,), generator=gen),
        }
        batch = {k: v.to(device) for k, v in batch.items()}
        state, _ = step(state, batch)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                state, metrics = step(state, batch)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        assert all(t.device.type == device for t in ft.tree.leaves((state.params, state.opt_state)))
        assert all(t.device.type == device for t in metrics.values())
        assert state.key.device.type == "cpu"
        results[device] = (state.params, metrics["loss"])
    ft.testing.assert_trees_all_close(results["cuda"], results["cpu"], rtol=1e-4, atol=1e-5)


def test_cuda_dropout_is_reproducible():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 1)).cuda()
    model, params, _ = ft.functionalize(net)
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        lambda p, b: model(p, b).square().mean(), tx, micro_batches=2, donate=False
    )
    state = ft.TrainState.create(params=params, tx=tx, seed=3)
    x = torch.ones(4, 4, device="cuda")
    cuda_rng = torch.cuda.get_rng_state()
    a, _ = step(state, x)
    b, _ = step(state, x)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    ft.testing.assert_trees_all_equal(a.params, b.params)


@pytest.mark.parametrize("compile_options", [False, {"backend": "aot_eager"}])
def test_cuda_max_consecutive_skips_raises_eager_and_compiled(compile_options):
    """The skip counter is read from a pinned copy behind an event (no sync in the step); a
    compiled step records it after the compiled core, so both raise from the next call."""
    torch.manual_seed(0)
    model, params, _ = ft.functionalize(nn.Linear(4, 2).cuda())
    tx = ft.sgd(0.1)
    step = ft.make_train_step(
        lambda p, b: (model(p, b["x"]) - b["y"]).square().mean(),
        tx,
        max_consecutive_skips=1,
        compile=compile_options,
    )
    state = ft.TrainState.create(params=params, tx=tx)
    good = {"x": torch.ones(3, 4, device="cuda"), "y": torch.zeros(3, 2, device="cuda")}
    bad = {"x": torch.full((3, 4), float("nan"), device="cuda"), "y": good["y"]}
    state, _ = step(state, good)
    state, _ = step(state, bad)  # 1 in a row: allowed
    state, _ = step(state, bad)  # 2 in a row: returned, raised by the next call
    torch.cuda.synchronize()  # the event has completed: the next call can read the counter
    with pytest.raises(ft.NonFiniteError, match="max_consecutive_skips=1"):
        step(state, good)
    assert not state.consumed
