"""A second Ctrl-C after the one that stopped ``train_loop``: while the final checkpoint is
written, or while the exit waits for an ``AsyncWriter``'s last writes. It must end the program
at once with a plain ``KeyboardInterrupt``, no "Exception ignored in atexit callback" traceback,
and leave only whole checkpoints and readable event files behind.

Each case runs a small script in a subprocess (the exit path is what is tested) that sends
itself SIGINT twice with ``os.kill``: once during step 3, once at the moment under test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain.checkpoint import CheckpointManager
from functrain.logging import read_scalars

pytestmark = pytest.mark.skipif(os.name != "posix", reason="sends itself SIGINT with os.kill")

_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    torch.set_num_threads(int(os.environ.get("FUNCTRAIN_TEST_THREADS", "1")))
    import functrain as ft
    from functrain.checkpoint import CheckpointManager, _file
    from functrain.logging import AsyncWriter, TensorBoardWriter

    where, root = sys.argv[1], sys.argv[2]
    tx = ft.sgd(0.1)
    base = ft.make_train_step(lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean(), tx)
    first_sent = False

    def step(state, batch):
        global first_sent
        out = base(state, batch)
        if int(out[0].step) == 3:  # the first Ctrl-C, held until the step returns
            first_sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return out

    host_bytes = _file.host_bytes
    def interrupting_host_bytes(t):  # the second Ctrl-C, in the middle of the final save
        if where == "save" and first_sent:
            os.kill(os.getpid(), signal.SIGINT)
        return host_bytes(t)
    _file.host_bytes = interrupting_host_bytes

    class Tb(TensorBoardWriter):
        def close(self):  # runs in the AsyncWriter's thread, from its atexit close
            if where == "exit":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)  # the main thread is waiting in join() meanwhile
            super().close()

    gen = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(40, 3, generator=gen), "y": torch.randn(40)}
    writer = AsyncWriter(Tb(os.path.join(root, "tb")))  # closed at exit: never closed here
    ft.train_loop(
        step,
        ft.TrainState.create(params={"w": torch.zeros(3)}, tx=tx),
        ft.TensorBatches(data, 4, seed=1),
        epochs=3,
        writer=writer,
        checkpoint_manager=CheckpointManager(os.path.join(root, "ckpt")),
        checkpoint_every=2,
    )
    """
)


def _run(tmp_path: Path, where: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("FUNCTRAIN_TEST_THREADS", "1")}
    return subprocess.run(
        [sys.executable, str(script), where, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _assert_plain_interrupt(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == -signal.SIGINT, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert "atexit" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") <= 2, proc.stderr[-3000:]  # the two Ctrl-Cs, chained
    assert "\nKeyboardInterrupt\n" in proc.stderr, proc.stderr[-3000:]


def _restore(tmp_path: Path) -> tuple[CheckpointManager, ft.TrainState]:
    tx = ft.sgd(0.1)
    manager = CheckpointManager(tmp_path / "ckpt")
    state = manager.restore_latest(target=ft.TrainState.create(params={"w": torch.zeros(3)}, tx=tx))
    return manager, state


def test_a_second_ctrl_c_while_the_exit_closes_the_writer_is_quiet(tmp_path):
    # The old code: "Exception ignored in atexit callback: functools.partial(<function
    # _close_at_exit ...>)" and a second traceback ending in threading's join().
    proc = _run(tmp_path, "exit")
    _assert_plain_interrupt(proc)
    assert "AsyncWriter: interrupted at exit" in proc.stderr
    # The first Ctrl-C's checkpoint is whole, and the logs it flushed first are readable.
    manager, state = _restore(tmp_path)
    assert manager.all_steps() == [2, 3] and int(state.step) == 3
    steps, losses = read_scalars(tmp_path / "tb")["."]["train/loss"]
    assert steps == [1, 2, 3] and all(v == v for v in losses)


def test_a_second_ctrl_c_during_the_final_save_keeps_the_last_whole_checkpoint(tmp_path):
    proc = _run(tmp_path, "save")
    _assert_plain_interrupt(proc)
    assert "checkpoint saved" not in proc.stderr  # the save of step 3 was stopped
    # No half-written step 3 (nor its temporary file): a resume starts from step 2.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "checkpoint_00000002.safetensors"
    ]
    manager, state = _restore(tmp_path)
    assert manager.skipped == [] and int(state.step) == 2
    steps, _ = read_scalars(tmp_path / "tb")["."]["train/loss"]
    assert steps == [1, 2, 3]  # flushed before the save began
