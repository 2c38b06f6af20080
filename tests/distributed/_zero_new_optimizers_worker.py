"""One rank of test_zero_new_optimizers.py's job (not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python
_zero_new_optimizers_worker.py OUT``.

For each optimizer of ``TXS`` every rank runs ``STEPS`` data-parallel steps on its half of a
fixed float64 batch with the sharded (ZeRO-1) optimizer state, and records the parameters and
the full optimizer state. Writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

from collections.abc import Callable

import gloo_jobs
import torch

import functrain as ft
from functrain import distributed as dist

STEPS = 5
TXS: dict[str, Callable[[], ft.GradientTransformation]] = {
    "schedule_free_adamw": lambda: ft.schedule_free_adamw(0.05, warmup_steps=2, weight_decay=0.1),
    "schedule_free_sgd": lambda: ft.schedule_free_sgd(0.1, weight_decay=0.01),
    # A rate too small to lower the loss beyond rtol: the scale halves at every step after the first.
    "adam_reduce_on_plateau": lambda: ft.chain(
        ft.adam(1e-9), ft.reduce_on_plateau(factor=0.5, patience=1)
    ),
}


def params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(5, generator=gen, dtype=torch.float64),
    }


def batch() -> dict[str, torch.Tensor]:
    """The global batch of 8 examples; rank r takes rows 4r .. 4r + 3."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    return {"x": x, "y": torch.randn(8, 5, generator=gen, dtype=torch.float64)}


def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return ((torch.tanh(b["x"] @ p["w"].T + p["b"]) - b["y"]) ** 2).mean()


def run(rank: int) -> dict:
    mine = {k: v[4 * rank : 4 * rank + 4] for k, v in batch().items()}
    out = {}
    for name, make in TXS.items():
        step = dist.make_data_parallel_train_step(loss, make(), shard_optimizer=True)
        state = step.init_state(params())
        for _ in range(STEPS):
            state, _ = step(state, mine)
        full = step.full_state(state)
        out[name] = {
            "params": {k: v.tolist() for k, v in full.params.items()},
            "opt_state": [t.tolist() for t in ft.tree.leaves(full.opt_state)],
        }
    return out


if __name__ == "__main__":
    gloo_jobs.run_worker(run)
