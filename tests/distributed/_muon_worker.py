"""One rank of test_muon_dp_review.py's job (not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _muon_worker.py OUT``.

Every rank trains three replicated data-parallel steps of ``ft.muon`` on its half of a fixed
float64 batch, then asks for a sharded (ZeRO-1) step with the same optimizer and records the
error. Writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import gloo_jobs
import torch

import functrain as ft
from functrain import distributed as dist


def params() -> dict[str, torch.Tensor]:
    """Two matrices (Muon) and a bias (AdamW), fixed by a seed."""
    gen = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(6, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(6, generator=gen, dtype=torch.float64),
        "w2": torch.randn(3, 6, generator=gen, dtype=torch.float64),
    }


def batch() -> dict[str, torch.Tensor]:
    """The global batch of 8 examples; rank r takes rows 4r .. 4r + 3."""
    gen = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(8, 4, generator=gen, dtype=torch.float64),
        "y": torch.randn(8, 3, generator=gen, dtype=torch.float64),
    }


def loss(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    h = torch.tanh(b["x"] @ p["w1"].T + p["b"])
    return ((h @ p["w2"].T - b["y"]) ** 2).mean()


def tx() -> ft.GradientTransformation:
    return ft.muon(0.05, weight_decay=0.01)


def run(rank: int) -> dict:
    step = dist.make_data_parallel_train_step(loss, tx(), donate=False)
    state = step.init_state(params())
    mine = {k: v[4 * rank : 4 * rank + 4] for k, v in batch().items()}
    for _ in range(3):
        state, _ = step(state, mine)
    try:
        dist.make_data_parallel_train_step(loss, tx(), shard_optimizer=True)
        sharded = {"type": None}
    except Exception as err:  # the test checks the type and message
        sharded = {"type": type(err).__name__, "message": str(err)}
    return {
        "params": {k: v.tolist() for k, v in state.params.items()},
        "sharded": sharded,
    }


if __name__ == "__main__":
    gloo_jobs.run_worker(run)
