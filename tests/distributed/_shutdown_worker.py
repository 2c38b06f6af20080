"""A torchrun-like worker for ``test_shutdown_releases_the_process_group``.

Takes one data-parallel step (whose ``torch.func.grad`` imports ``torch._dynamo`` for the first
time), shuts down, and writes the names of the native threads still running to
``<out>/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import functrain as ft
from functrain import distributed as dist


def _threads() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks))


def main() -> None:
    out = Path(sys.argv[1])
    dist.init(timeout=60)
    model, params, _ = ft.functionalize(torch.nn.Linear(4, 2))

    def loss_fn(p, batch):
        return ((model(p, batch["x"]) - batch["y"]) ** 2).mean()

    step = dist.make_data_parallel_train_step(loss_fn, ft.adamw(1e-3))
    state = step.init_state(params)
    state, _ = step(state, {"x": torch.randn(8, 4), "y": torch.randn(8, 2)})
    rank, during = dist.rank(), _threads()
    dist.shutdown()
    result = {"during": during, "after": _threads()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
