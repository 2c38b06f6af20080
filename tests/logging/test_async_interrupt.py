"""Ctrl-C while AsyncWriter replays buffered calls on the caller's thread stays a Ctrl-C."""

import torch

import functrain as ft
from functrain.logging import AsyncWriter, MetricWriter


class _InterruptedOnThirdWrite(MetricWriter):
    """Stands in for SIGINT arriving while the wrapped writer writes."""

    def __init__(self) -> None:
        self.calls = 0

    def write_scalars(self, step, scalars):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt


def test_ctrl_c_during_a_replayed_write_interrupts_train_loop_cleanly():
    # It was recorded as a writer failure and resurfaced as RuntimeError, so train_loop's
    # catch_interrupt=True crashed instead of returning an interrupted result.
    model, params, _ = ft.functionalize(torch.nn.Linear(4, 1))
    tx = ft.sgd(0.1)
    result = ft.train_loop(
        ft.make_train_step(lambda p, b: (model(p, b["x"]) ** 2).mean(), tx),
        ft.TrainState.create(params=params, tx=tx),
        ft.TensorBatches({"x": torch.randn(64, 4)}, 8, seed=0),
        epochs=2,
        writer=AsyncWriter(_InterruptedOnThirdWrite(), every_n=1),
        catch_interrupt=True,
    )
    assert result.interrupted


def test_ctrl_c_while_an_event_file_flushes_at_exit_prints_one_line(tmp_path, capsys):
    # The exit hook of an event file nobody closed let the KeyboardInterrupt of a second Ctrl-C
    # escape, which Python prints as "Exception ignored in atexit callback" with a traceback.
    import weakref

    from functrain.logging._event_file import EventFile, _flush_at_exit

    event_file = EventFile(str(tmp_path / "events.out.tfevents.test"), str(tmp_path), 120.0)

    def interrupted_flush() -> None:
        raise KeyboardInterrupt

    event_file.flush = interrupted_flush  # stands in for SIGINT during the exit's flush
    _flush_at_exit(weakref.ref(event_file))
    assert "interrupted while flushing" in capsys.readouterr().err
    del event_file.flush
    event_file.close()
