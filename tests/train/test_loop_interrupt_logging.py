"""A Ctrl-C that lands while ``train_loop`` records a step's metrics (in the writer, say) is
held until the step is recorded everywhere. Before, the step was marked logged first: the
writer never got it, the checkpoint saved on the interrupt included it, and the resumed run's
curves lacked that step (seen as a flaky examples test: step 98 missing from the loss curve)."""

from __future__ import annotations

import signal

import pytest
import torch

import functrain as ft
from functrain.checkpoint import CheckpointManager

pytestmark = pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
    reason="needs Python's default SIGINT handler",
)


class _InterruptingWriter:
    """Records every step it is given; sends itself SIGINT while writing step ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.steps = at, []

    def write_scalars(self, step: int, scalars: dict) -> None:
        if step == self.at and step not in self.steps:
            signal.raise_signal(signal.SIGINT)
        self.steps.append(step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _run(tmp_path, at: int):
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    tx = ft.sgd(0.1)
    step = ft.make_train_step(lambda p, b: ((b["x"] @ p["w"] - b["y"]) ** 2).mean(), tx)
    gen = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(40, 3, generator=gen).double(), "y": torch.randn(40).double()}
    writer = _InterruptingWriter(at)
    manager = CheckpointManager(tmp_path)
    result = ft.train_loop(
        step,
        ft.TrainState.create(params=params, tx=tx),
        ft.TensorBatches(data, 4, seed=1),
        epochs=3,
        writer=writer,
        checkpoint_manager=manager,
        catch_interrupt=True,
    )
    return result, writer, manager


def test_a_ctrl_c_inside_the_writer_still_records_the_step(tmp_path):
    result, writer, manager = _run(tmp_path, at=5)
    assert result.interrupted and int(result.state.step) == 5
    assert writer.steps == [1, 2, 3, 4, 5]  # the old code: [1, 2, 3, 4]
    assert result.history.steps("train/loss") == [1, 2, 3, 4, 5]
    assert manager.all_steps() == [5]  # the checkpoint and the curves end at the same step
