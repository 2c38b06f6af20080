"""Fork server for the training variant of ``test_checkpoint_sigkill``.

Run as ``python train_kill_worker.py DIRECTORY``. For every ``go`` line on stdin it forks a child
that runs :func:`functrain.train_loop` with a :class:`~functrain.checkpoint.CheckpointManager`
in DIRECTORY, saving after every step, for ever: the loop resumes from the latest valid
checkpoint by itself. Each step is appended to ``progress.log`` once its save returned. The
server prints the child's pid, waits for it (the test kills it with SIGKILL) and prints
``dead <status>``. Forking from a process that already imported torch makes each round start at
once; the test compares every checkpoint with an uninterrupted run (:func:`reference`).
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

SEED = 7
NUM_EXAMPLES, BATCH_SIZE = 48, 8  # 6 steps per epoch: kills land mid-epoch and at its end
FOREVER = 10**9


def setup() -> tuple[ft.TrainStep, ft.TrainState, ft.TensorBatches]:
    """Step, initial state (also the restore target) and data; the same in every process.

    About 3 MB of state (a wide layer and its two Adam moments), so a save takes milliseconds
    and kills land inside saves; dropout makes the random key matter.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Dropout(0.25), nn.Linear(4096, 1))
    model, params, _ = ft.functionalize(net, copy=True)

    def loss_fn(p: Any, batch: Any) -> torch.Tensor:
        return F.mse_loss(model(p, batch["x"]).squeeze(-1), batch["y"])

    tx = ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-3, weight_decay=1e-2))
    step = ft.make_train_step(loss_fn, tx, micro_batches=2)
    state = ft.TrainState.create(params=params, tx=tx, seed=SEED)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(NUM_EXAMPLES, 64, generator=gen)
    data = {"x": x, "y": x[:, :3].sum(-1).tanh()}
    return step, state, ft.TensorBatches(data, BATCH_SIZE, seed=SEED)


def reference(steps: set[int]) -> dict[int, ft.TrainState]:
    """The uninterrupted run's states after each of ``steps`` steps (one run, copies kept)."""
    step, state, batches = setup()
    kept: dict[int, ft.TrainState] = {}

    def recording_step(state: ft.TrainState, batch: Any) -> tuple[ft.TrainState, Any]:
        new, metrics = step(state, batch)
        if int(new.step) in steps:  # a copy: the next step may reuse this state's memory
            kept[int(new.step)] = ft.tree.map(torch.clone, new)
        return new, metrics

    ft.train_loop(recording_step, state, batches, epochs=FOREVER, max_steps=max(steps))
    return kept


class LoggingManager(checkpoint.CheckpointManager):
    """Records each step after its save returned: the test's lower bound on the latest step."""

    def save(self, step: Any, state: Any, metrics: Any = None, **kwargs: Any) -> str:
        path = super().save(step, state, metrics, **kwargs)
        with open(os.path.join(self.directory, "progress.log"), "a") as log:
            log.write(f"{int(step)}\n")
        return path


def run_child(directory: str) -> None:
    step, state, batches = setup()
    manager = LoggingManager(directory, max_to_keep=3)
    ft.train_loop(
        step,
        state,
        batches,
        epochs=FOREVER,
        checkpoint_manager=manager,
        checkpoint_every=1,
    )


def main(directory: str) -> None:
    torch.set_num_threads(1)
    reference({1})  # warms torch.func up once, before forking, so each child starts at once
    for line in sys.stdin:
        if line.strip() != "go":
            break
        pid = os.fork()
        if pid == 0:
            try:
                run_child(directory)
            except BaseException as err:
                print(f"child failed: {err!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(1)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"dead {status}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
