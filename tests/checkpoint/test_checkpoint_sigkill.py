"""kill -9 at random moments while a process saves checkpoints in a loop.

After every kill the directory must hold no invalid checkpoint under a final name, the newest
checkpoint must be at least the last one the process reported as saved, and every checkpoint
must restore with exactly the content of its step. The next round resumes from it.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from functrain import checkpoint
from functrain.testing import assert_trees_all_equal

WORKER = Path(__file__).with_name("ckpt_kill_worker.py")
ROUNDS = 15


def load_worker() -> Any:
    spec = importlib.util.spec_from_file_location("ckpt_kill_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_reported(directory: Path) -> int:
    log = directory / "progress.log"
    if not log.exists():
        return 0
    lines = log.read_text().split("\n")[:-1]  # a kill may leave the last line incomplete
    return int(lines[-1]) if lines else 0


def assert_step_content(restored: Any, expected: Any) -> None:
    assert restored["step"] == expected["step"] and restored["note"] == expected["note"]
    assert_trees_all_equal(restored["tensors"], expected["tensors"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_saves_never_loses_or_corrupts(tmp_path: Path) -> None:
    worker = load_worker()
    directory = tmp_path / "ckpts"
    directory.mkdir()
    target = worker.state_for(0)
    rng = random.Random(1234)
    stderr_path = tmp_path / "worker.err"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    killed_mid_write = 0
    latest = None
    try:
        for round_ in range(ROUNDS):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.03, 0.25))
            os.kill(pid, signal.SIGKILL)
            status = int(proc.stdout.readline().split()[1])
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                f"round {round_}: the saver died on its own: {stderr_path.read_text()}"
            )

            killed_mid_write += any(n.endswith(".tmp") for n in os.listdir(directory))
            reported = last_reported(directory)
            mgr = checkpoint.CheckpointManager(directory, max_to_keep=3)
            assert mgr.skipped == [], f"round {round_}: invalid file under a final name"
            assert not any(n.endswith(".tmp") for n in os.listdir(directory))
            latest = mgr.latest_step()
            if reported == 0 and latest is None:
                continue  # killed before the first save of the run completed
            assert latest in (reported, reported + 1), (round_, reported, latest)
            for step in mgr.all_steps():
                assert_step_content(mgr.restore(step, target), worker.state_for(step))
            assert_step_content(mgr.restore_latest(target), worker.state_for(latest))
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert latest is not None and latest > ROUNDS  # every round resumed and made progress
    assert killed_mid_write > 0  # some kills really landed inside a save
