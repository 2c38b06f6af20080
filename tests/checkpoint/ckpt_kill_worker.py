"""Fork server for ``test_checkpoint_sigkill``: its children save checkpoints until killed.

Run as ``python ckpt_kill_worker.py DIRECTORY``. For every ``go`` line on stdin it forks a child
that resumes from the latest valid checkpoint in DIRECTORY and saves steps ``n+1, n+2, ...``
forever, appending each step to ``progress.log`` after its save returned. The server prints the
child's pid, waits for it (the test kills it with SIGKILL) and prints ``dead <status>``. Forking
from a process that already imported torch makes each round start in microseconds.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import torch


class Moments(NamedTuple):
    mu: torch.Tensor
    count: torch.Tensor


def state_for(step: int) -> dict[str, Any]:
    """Deterministic content for each step (about 3 MB, so a save takes some milliseconds)."""
    return {
        "step": step,
        "note": f"state of step {step}",
        "tensors": {
            "params": {
                "w": torch.arange(512 * 1024, dtype=torch.float32).reshape(512, 1024) + step,
                "b": torch.full((1024,), float(step), dtype=torch.float64),
            },
            "opt_state": (
                Moments(
                    torch.full((512, 1024), float(step % 256), dtype=torch.bfloat16),
                    torch.tensor(step, dtype=torch.int32),
                ),
            ),
            "rng": torch.Generator().manual_seed(step).get_state(),
        },
    }


def run_child(directory: str) -> None:
    from functrain.checkpoint import CheckpointManager

    mgr = CheckpointManager(directory, max_to_keep=3)
    step = 0
    if mgr.latest_step() is not None:
        restored = mgr.restore_latest(target=state_for(0))
        step = mgr.restored_step
        if restored["step"] != step:
            raise AssertionError(f"restored step {restored['step']} from checkpoint {step}")
    with open(os.path.join(directory, "progress.log"), "a") as log:
        while True:
            step += 1
            mgr.save(step, state_for(step), metrics={"loss": 1.0 / step})
            log.write(f"{step}\n")
            log.flush()


def main(directory: str) -> None:
    torch.set_num_threads(1)
    import functrain.checkpoint  # noqa: F401 - imported once, before forking

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
