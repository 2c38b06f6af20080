"""kill -9 at random moments while a process saves checkpoints in a loop.

After every kill the directory must hold no invalid checkpoint under a final name, the newest
checkpoint must be at least the last one the process reported as saved, and every checkpoint
must restore with exactly the content of its step. The next round resumes from it.

Two savers: one writes synthetic states of many dtypes and node types; the other is a real
training run (``ft.train_loop`` with a ``CheckpointManager``, saving every step), whose latest
checkpoint after each kill must equal the uninterrupted run's state at that step, bit for bit,
so every resume was exact.
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
TRAIN_WORKER = Path(__file__).with_name("train_kill_worker.py")
ROUNDS = 15
TRAIN_ROUNDS = 10


def load_worker(path: Path = WORKER) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
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


class ForkServer:
    """Drives a worker's fork server: each round forks one child and SIGKILLs it."""

    def __init__(self, worker: Path, directory: Path, stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with open(stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(worker), str(directory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )

    def kill_after_progress(self, directory: Path, past: int, seconds: float) -> None:
        """Starts a child, waits until it logged a save of a step above ``past`` (so every
        round makes progress, however loaded the machine), then kills it ``seconds`` later."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        pid = int(self.proc.stdout.readline())
        deadline = time.monotonic() + 120
        while last_reported(directory) <= past and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(seconds)
        os.kill(pid, signal.SIGKILL)
        status = int(self.proc.stdout.readline().split()[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the child died on its own: {self.stderr_path.read_text()}"
        )

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_saves_never_loses_or_corrupts(tmp_path: Path) -> None:
    worker = load_worker()
    directory = tmp_path / "ckpts"
    directory.mkdir()
    target = worker.state_for(0)
    rng = random.Random(1234)
    server = ForkServer(WORKER, directory, tmp_path / "worker.err")
    killed_mid_write = 0
    latest = None
    try:
        for round_ in range(ROUNDS):
            server.kill_after_progress(directory, latest or 0, rng.uniform(0.0, 0.03))
            killed_mid_write += any(n.endswith(".tmp") for n in os.listdir(directory))
            reported = last_reported(directory)
            mgr = checkpoint.CheckpointManager(directory, max_to_keep=3)
            assert mgr.skipped == [], f"round {round_}: invalid file under a final name"
            assert not any(n.endswith(".tmp") for n in os.listdir(directory))
            previous, latest = latest, mgr.latest_step()
            if reported == 0 and latest is None:
                continue  # killed before the first save of the run completed
            # Each save is logged once it returned; a kill may land between the two, so the
            # newest checkpoint is the last logged one or the one after it, whichever child
            # (this round's or the previous one's) wrote it.
            upper = max(reported, previous or 0) + 1
            assert reported <= latest <= upper, (round_, reported, previous, latest)
            for step in mgr.all_steps():
                assert_step_content(mgr.restore(step, target), worker.state_for(step))
            assert_step_content(mgr.restore_latest(target), worker.state_for(latest))
    finally:
        server.close()
    assert latest is not None and latest > ROUNDS  # every round resumed and made progress
    assert killed_mid_write > 0  # some kills really landed inside a save


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_training_saves_resumes_bit_for_bit(tmp_path: Path) -> None:
    import torch

    worker = load_worker(TRAIN_WORKER)
    directory = tmp_path / "run"
    directory.mkdir()
    rng = random.Random(4321)
    server = ForkServer(TRAIN_WORKER, directory, tmp_path / "worker.err")
    killed_mid_write = 0
    latest = None
    restored: dict[int, Any] = {}
    try:
        for round_ in range(TRAIN_ROUNDS):
            server.kill_after_progress(directory, latest or 0, rng.uniform(0.0, 0.05))
            killed_mid_write += any(n.endswith(".tmp") for n in os.listdir(directory))
            reported = last_reported(directory)
            mgr = checkpoint.CheckpointManager(directory, max_to_keep=3)
            assert mgr.skipped == [], f"round {round_}: invalid file under a final name"
            previous, latest = latest, mgr.latest_step()
            if reported == 0 and latest is None:
                continue  # killed before the first save completed
            upper = max(reported, previous or 0) + 1  # see the test above
            assert reported <= latest <= upper, (round_, reported, previous, latest)
            _, target, _ = worker.setup()
            restored[latest] = mgr.restore_latest(target=target)
            assert int(restored[latest].step) == latest
            for step in mgr.all_steps():  # the older ones load as well
                assert int(mgr.restore(step, target).step) == step
    finally:
        server.close()
    assert latest is not None and latest > TRAIN_ROUNDS  # the rounds resumed and progressed
    # Params, optimizer state, key: exactly the uninterrupted run's at every round, so each
    # resume (from whatever checkpoint the previous kill left) was exact.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's setting: the same kernels, the same bits
    try:
        expected = worker.reference(set(restored))
    finally:
        torch.set_num_threads(threads)
    for step, state in restored.items():
        assert_bitwise_equal(state, expected[step])
    assert killed_mid_write > 0  # some kills really landed inside a save


def assert_bitwise_equal(a: Any, b: Any) -> None:
    """Equal values, and equal bits for floats (``-0.0`` vs ``0.0``, NaN payloads)."""
    import torch

    import functrain as ft

    assert_trees_all_equal(a, b)
    views = {torch.float32: torch.int32, torch.float64: torch.int64}
    for x, y in zip(ft.tree.leaves(a), ft.tree.leaves(b)):
        if isinstance(x, torch.Tensor) and x.dtype in views:
            assert torch.equal(x.view(views[x.dtype]), y.view(views[y.dtype]))
