"""One rank of test_zero_identity.py's job (not collected by pytest).

Usage: ``RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _zero_identity_worker.py OUT``.

Every rank trains two steps with a sharded Adam, saves its own shard (the whole ``TrainState``,
as a user checkpointing per rank would) to ``OUT/shard{r}.safetensors`` and then:

* restores its **own** shard and checks that one more step continues bit for bit as the
  unsaved state does;
* restores the **other** rank's shard (same shapes: both pieces are (2,) and (1, 3)) and
  records what the step and ``full_state`` do with it: they must refuse before any collective,
  on both ranks, so neither waits on the other.

Writes ``OUT/rank{r}.json``.
"""

from __future__ import annotations

import os

import gloo_jobs
import torch

import functrain as ft
from functrain import distributed as dist


def params() -> dict[str, torch.Tensor]:
    """Leaves whose two pieces have equal shapes, so a swapped shard restores without error."""
    return {
        "w": torch.tensor([0.5, -1.0, 2.0, 0.25]),
        "m": torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]),
        "s": torch.tensor(0.75),
    }


def loss(p: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    return ((batch * p["w"]).sum() + (p["m"] ** 2).sum() * p["s"]) ** 2


def batch(i: int, rank: int) -> torch.Tensor:
    return torch.full((4,), 0.1 * (i + 1) * (rank + 1))


def _error(fn) -> dict:
    try:
        fn()
    except Exception as err:  # the test checks the type and message
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": None}


def run(rank: int, out_dir: str) -> dict:
    step = dist.make_data_parallel_train_step(
        loss, ft.adam(0.1), shard_optimizer=True, donate=False
    )
    state = step.init_state(params())
    for i in range(2):
        state, _ = step(state, batch(i, rank))
    ft.checkpoint.save(os.path.join(out_dir, f"shard{rank}.safetensors"), state)
    dist.barrier()
    target = step.init_state(params())
    own = ft.checkpoint.restore(os.path.join(out_dir, f"shard{rank}.safetensors"), target=target)
    other = ft.checkpoint.restore(
        os.path.join(out_dir, f"shard{1 - rank}.safetensors"), target=target
    )
    shapes_equal = all(
        a.shape == b.shape
        for a, b in zip(ft.tree.leaves(own.opt_state), ft.tree.leaves(other.opt_state))
    )
    # Both ranks refuse before any collective; on the old code both ran the collective.
    step_error = _error(lambda: step(other, batch(2, rank)))
    gather_error = _error(lambda: step.full_state(other))
    dist.barrier()
    straight, _ = step(state, batch(2, rank))
    resumed, _ = step(own, batch(2, rank))
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            ft.tree.leaves((straight.params, straight.opt_state)),
            ft.tree.leaves((resumed.params, resumed.opt_state)),
        )
    )
    return {
        "identity": own.extra.get("zero_shard"),
        "other_identity": other.extra.get("zero_shard"),
        "shapes_equal": shapes_equal,
        "step_error": step_error,
        "gather_error": gather_error,
        "resumed_same": same,
        "full_extra": sorted(step.full_state(own).extra),
    }


if __name__ == "__main__":
    gloo_jobs.run_worker(run)
