"""Adversarial review: what a demanding user or a fuzzer hands the writers and the readback."""

import threading

import pytest
import torch
from tb_helpers import load_run, scalars
from tensorboard.compat.proto.event_pb2 import Event

from functrain.logging import AsyncWriter, MetricWriter, TensorBoardWriter, read_scalars


class FailingRecorder(MetricWriter):
    """Records scalar writes; the write of step ``fail_at`` raises."""

    def __init__(self, fail_at):
        self.fail_at = fail_at
        self.steps = []

    def write_scalars(self, step, scalars):
        if step == self.fail_at:
            raise OSError(f"disk full at step {step}")
        self.steps.append(step)


@pytest.mark.parametrize("host_inline", [True, False])
@pytest.mark.parametrize("on_tensor", [False, True], ids=["float", "tensor"])
def test_call_that_reports_a_background_error_keeps_its_values(host_inline, on_tensor):
    # The error is about *earlier* values; the values of the call that reports it must still be
    # written, or a loop that logs the error and goes on silently loses a step.
    inner = FailingRecorder(fail_at=3)
    writer = AsyncWriter(inner, every_n=2, host_inline=host_inline, max_delay_s=None)
    reported = []
    for step in range(8):
        value = torch.tensor(float(step)) if on_tensor else float(step)
        try:
            writer.write_scalars(step, {"x": value})
        except RuntimeError as err:
            assert isinstance(err.__cause__, OSError)
            reported.append(step)
        if step == 3:
            writer._queue.join()  # let the worker fail before the next call
    writer.close()
    assert len(reported) == 1
    assert inner.steps == [0, 1, 2, 4, 5, 6, 7]


def test_flush_writes_buffered_values_before_reporting_an_error():
    release = threading.Event()

    class SlowFailing(FailingRecorder):
        def write_scalars(self, step, scalars):
            release.wait(10)
            super().write_scalars(step, scalars)

    inner = SlowFailing(fail_at=0)
    writer = AsyncWriter(inner, every_n=1, host_inline=False, max_delay_s=None)
    writer.write_scalars(0, {"x": 0.0})  # handed to the worker, which waits
    writer.every_n = 100
    writer.write_scalars(1, {"x": 1.0})  # buffered before anything failed
    release.set()
    writer._queue.join()  # step 0 has now failed in the background
    with pytest.raises(RuntimeError, match="disk full at step 0"):
        writer.flush()
    assert inner.steps == [1]  # flushed before the error was reported
    writer.close()


def test_read_scalars_takes_a_single_pattern_string(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        writer.write_scalars(1, {"loss": 0.5, "l": 2.0, "s": 3.0})
    expected = {"loss": ([1], [0.5])}
    assert read_scalars(tmp_path, tags=["loss"])["."] == expected
    assert read_scalars(tmp_path, tags="loss")["."] == expected


@pytest.mark.parametrize("step", [2**63, 2**64, -(2**63) - 1])
def test_step_beyond_int64_is_an_error_not_a_wrapped_step(tmp_path, step):
    with pytest.raises(ValueError):
        Event(step=step)  # the reference: TensorBoard's Event.step is an int64
    with TensorBoardWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=rf"step {step} .*64-bit"):
            writer.write_scalars(step, {"x": 1.0})
        writer.write_scalars(2**63 - 1, {"x": 2.0})
    assert scalars(load_run(tmp_path), "x") == [(2**63 - 1, 2.0)]
