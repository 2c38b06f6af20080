"""Worker for ``test_resume``: trains, checkpoints and resumes in separate processes.

``python resume_worker.py first OUTDIR`` trains every configuration for ``N`` steps from scratch
and saves its state and metrics; ``python resume_worker.py second OUTDIR`` restores those
checkpoints into fresh targets and trains ``N`` more steps. The test compares the result with
an uninterrupted ``2N``-step run. The data order is a function of the seed and the step only,
and the dropout randomness comes from the state's key, so nothing else needs saving.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from functrain import checkpoint

N = 7  # mid-epoch: 6 batches per epoch
NUM_EXAMPLES, BATCH_SIZE, SEED = 96, 16, 1234
CONFIGS = ("plain", "faults")
NAN_STEPS = {"plain": (), "faults": (4, 9)}  # a NaN batch in each half of the run


def dataset() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(NUM_EXAMPLES, 5, generator=gen)
    return {"x": x, "y": (x @ torch.randn(5, generator=gen)).tanh()}


def batch_for(config: str, step: int, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch of ``step``: epoch order drawn from ``(SEED, epoch)``, position from ``step``."""
    per_epoch = NUM_EXAMPLES // BATCH_SIZE
    epoch, index = divmod(step, per_epoch)
    gen = ft.key_generator(ft.fold_in(ft.random_key(SEED), epoch))
    order = torch.randperm(NUM_EXAMPLES, generator=gen)
    rows = order[index * BATCH_SIZE : (index + 1) * BATCH_SIZE]
    batch = {k: v[rows] for k, v in data.items()}
    if step in NAN_STEPS[config]:
        batch["x"] = batch["x"].clone()
        batch["x"][0, 0] = float("nan")
    return batch


def build(config: str) -> tuple[ft.TrainStep, ft.TrainState]:
    """The train step and the initial state (also the restore target) of a configuration."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
    )
    model, params, buffers = ft.functionalize(net, copy=True)
    fp16 = config == "faults"

    def loss_fn(p: Any, batch: Any, buffers: Any) -> ft.LossOutput:
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            out, new_buffers = model.apply(p, buffers, batch["x"])
        loss = F.mse_loss(out.float().squeeze(-1), batch["y"])
        return ft.LossOutput(
            loss,
            aux={"mae": (out.float().squeeze(-1) - batch["y"]).abs().mean()},
            buffers=new_buffers,
        )

    schedule = ft.warmup_cosine_decay_schedule(0.0, 3e-2, 3, 2 * N)
    tx = ft.chain(
        ft.clip_by_global_norm(1.0),
        ft.inject_hyperparams(ft.adamw)(learning_rate=schedule, weight_decay=1e-2),
    )
    options: dict[str, Any] = {}
    if fp16:
        # A first scale large enough to overflow float16: the scale moves across the restart.
        options = {
            "loss_scale": ft.DynamicLossScale(init_scale=2.0**16, growth_interval=2),
            "max_consecutive_skips": 20,
        }
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, **options)
    state = ft.TrainState.create(params=params, buffers=buffers, tx=tx, seed=SEED)
    return step, step.prepare(state)


def run(config: str, state: ft.TrainState, step: ft.TrainStep, start: int, stop: int):
    """Steps ``start .. stop - 1``; returns the final state and each step's metrics."""
    data = dataset()
    metrics = []
    for i in range(start, stop):
        if int(state.step) != i:
            raise AssertionError(f"state.step is {int(state.step)}, expected {i}")
        state, m = step(state, batch_for(config, i, data))
        metrics.append(m)
    return state, metrics


def loop_setup() -> tuple[ft.TrainStep, ft.TrainState, Any]:
    """The ``train_loop`` variant: the same model, data from ``TensorBatches``."""
    step, state = build("plain")
    batches = ft.TensorBatches(dataset(), BATCH_SIZE, seed=SEED)
    return step, state, batches


def main(phase: str, outdir: str) -> None:
    # The thread count of the test process (tests/conftest.py): the reference run there must
    # compute as these phases do, bit for bit.
    torch.set_num_threads(int(os.environ.get("FUNCTRAIN_TEST_THREADS", "1")))
    for config in CONFIGS:
        step, state = build(config)
        path = os.path.join(outdir, f"{config}_{N}.safetensors")
        if phase == "first":
            state, metrics = run(config, state, step, 0, N)
        else:
            state = checkpoint.restore(path, target=state)
            state, metrics = run(config, state, step, N, 2 * N)
        out = os.path.join(outdir, f"{config}_{int(state.step)}.safetensors")
        checkpoint.save(out, state)
        checkpoint.save(os.path.join(outdir, f"{config}_metrics_{phase}.safetensors"), metrics)
    # The train_loop variant: resumes from its own CheckpointManager.
    step, state, batches = loop_setup()
    manager = checkpoint.CheckpointManager(os.path.join(outdir, "loop"))
    max_steps = N if phase == "first" else 2 * N
    result = ft.train_loop(
        step, state, batches, epochs=5, max_steps=max_steps, checkpoint_manager=manager
    )
    history = {  # every train metric (perf/* are timings)
        tag: [result.history.steps(tag), result.history.values(tag)]
        for tag in result.history.tags()
        if tag.startswith("train/")
    }
    checkpoint.save(os.path.join(outdir, f"loop_history_{phase}.safetensors"), history)
    print(f"{phase}: done, loop resumed from {result.resumed_from}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
