"""The machinery of :func:`functrain.train.loop.train_loop` (internal): ``Run`` holds a run's
state, history, writer and checkpoint cadence and runs its steps, evaluations and saves;
``InterruptGuard`` defers a Ctrl-C to the end of a step; the scalar checks name a metric that
cannot be logged.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from functrain.train._loop_data import epoch_iterable, leading_size, length_of, to_device
from functrain.train._loop_metrics import History, Throughput, evaluate, metric_tags
from functrain.train.state import TrainState

__all__ = ["InterruptGuard", "Run"]  # internal: used by train_loop


class InterruptGuard:
    """Defers a Ctrl-C that arrives during a step until the step has returned.

    A step may update donated parameter memory in place, so stopping it halfway could leave a
    state that is neither the old one nor the new one. The first Ctrl-C during a step is held
    until the step is done; a second one interrupts at once (and no checkpoint is saved).
    """

    def __init__(self) -> None:
        self.in_step = False
        self.pending = False
        self._previous: Any = None

    def __enter__(self) -> InterruptGuard:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.in_step and not self.pending:
            self.pending = True
            print(
                "\nfunctrain: interrupt received, stopping after this step "
                "(Ctrl-C again to stop now, without a checkpoint)",
                file=sys.stderr,
            )
            return
        raise KeyboardInterrupt

    def step_done(self) -> None:
        self.in_step = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def _check_scalars(scalars: Mapping[str, Any]) -> None:
    """Raises unless every value is a one-element tensor or a real number (metadata only)."""
    for name, value in scalars.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"train_loop logs scalars, but metric {name!r} has shape "
                    f"{tuple(value.shape)}: reduce it (e.g. .mean()) or leave it out"
                )
        elif not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise TypeError(
                f"train_loop logs scalars, but metric {name!r} is a {type(value).__name__}"
            )


class _Counted:
    """An iterable that counts the items its iterators yield (to spot one-shot iterators)."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable
        self.count = 0

    def __iter__(self) -> Any:
        for item in self.iterable:
            self.count += 1
            yield item


class Run:
    """The mutable side of one :func:`train_loop` call (internal)."""

    def __init__(
        self,
        step_fn: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Any]]],
        state: TrainState,
        *,
        writer: Any,
        device: torch.device,
        max_steps: int | None,
        log_every: int,
        eval_step: Any,
        eval_batches: Any,
        eval_every: int | None,
        manager: Any,
        checkpoint_every: int | None,
        resumed_from: int | None,
    ) -> None:
        self.step_fn = step_fn
        self.state = state
        self.writer = writer
        self.device = device
        self.max_steps = max_steps
        self.log_every = log_every
        self.eval_step = eval_step
        self.eval_batches = eval_batches
        self.eval_every = eval_every
        self.manager = manager
        self.checkpoint_every = checkpoint_every
        self.history = History()
        self.guard = InterruptGuard()
        self.host_step = int(state.step)
        self.position = (0, 0)
        self.metrics: Mapping[str, Any] | None = None  # the latest step's
        self.logged_step: int | None = None
        self.eval_metrics: dict[str, Any] = {}
        self.eval_step_done: int | None = None
        self.saved_step = resumed_from
        self.throughput = Throughput(device)

    def done(self) -> bool:
        return self.max_steps is not None and self.host_step >= self.max_steps

    # -- the loop ----------------------------------------------------------------------------
    def train(self, batches: Any, epochs: int, position: tuple[int, int], seed: int) -> None:
        epoch, skip = position
        self.position = position
        while epoch < epochs and not self.done():
            iterable = epoch_iterable(batches, epoch, seed)
            length = length_of(iterable)
            iterator = iter(iterable)
            consumed = 0
            for _ in range(skip if length is None else min(skip, length)):
                try:
                    next(iterator)
                except StopIteration:
                    break
                consumed += 1
            if consumed < skip:  # the position lies beyond this epoch
                skip -= consumed
                epoch += 1
                continue
            skip = 0
            self.position = (epoch, consumed)
            ended = length is not None and consumed >= length
            while not ended and not self.done():
                start = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    ended = True
                    break
                consumed += 1
                ended = length is not None and consumed >= length
                # At an epoch's last batch the next position is the next epoch's start.
                position = (epoch + 1, 0) if ended else (epoch, consumed)
                self.train_step(batch, time.perf_counter() - start, position)
                if not ended:
                    self.after_step()
            del iterator  # shuts a DataLoader's workers down now
            if ended and consumed == 0:
                raise ValueError(
                    f"batches yielded no batch in epoch {epoch}: pass something that can be "
                    "iterated once per epoch (a list, ft.TensorBatches, a DataLoader) or a "
                    "function epoch -> batches, not a one-shot iterator or generator"
                )
            if not ended:
                break  # stopped by max_steps
            epoch += 1
            self.position = (epoch, 0)
            self.after_step(end_of_epoch=True)
        self.finish()

    def train_step(self, batch: Any, data_s: float, position: tuple[int, int]) -> None:
        batch = to_device(batch, self.device)
        self.guard.in_step = True
        result = self.step_fn(self.state, batch)
        if not (
            isinstance(result, tuple)
            and len(result) == 2
            and isinstance(result[0], TrainState)
            and isinstance(result[1], Mapping)
        ):
            raise TypeError(
                "step must return (new_state, metrics): a ft.TrainState and a dict of scalars, "
                f"got {type(result).__name__}"
            )
        state, metrics = result
        self.state, self.metrics = state, metrics
        self.host_step += 1
        self.position = position
        self.throughput.add(leading_size(batch), metrics.get("num_tokens"), data_s)
        self.guard.step_done()  # raises a Ctrl-C held during the step, now that it is done

    def after_step(self, end_of_epoch: bool = False) -> None:
        """Logging, evaluation and checkpoint of the step just taken (in this order)."""
        if self.metrics is None:
            return
        if self.host_step % self.log_every == 0 and self.logged_step != self.host_step:
            self.log()
        if (self.eval_every is None and end_of_epoch) or (
            self.eval_every is not None and self.host_step % self.eval_every == 0
        ):
            self.evaluate()
        if self.checkpoint_every is not None and self.host_step % self.checkpoint_every == 0:
            self.save()

    def finish(self) -> None:
        if self.metrics is not None and self.logged_step != self.host_step:
            self.log(final=True)
        if self.eval_step is not None and self.eval_step_done != self.host_step:
            self.evaluate()
        if self.manager is not None and self.saved_step != self.host_step:
            self.save()

    # -- actions -----------------------------------------------------------------------------
    def log(self, final: bool = False) -> None:
        assert self.metrics is not None
        scalars = {**metric_tags(self.metrics), **self.throughput.mark(final=final)}
        _check_scalars(scalars)
        self.logged_step = self.host_step
        self.history.record(self.host_step, scalars)
        if self.writer is not None:
            self.writer.write_scalars(self.host_step, scalars)

    def evaluate(self) -> None:
        if self.eval_step is None or self.eval_step_done == self.host_step:
            return
        batches = _Counted(self.eval_batches)
        with self.throughput.paused():
            eval_metrics = evaluate(self.eval_step, self.state, batches, self.device)
        if batches.count == 0:
            raise ValueError(
                f"eval_batches yielded no batch at step {self.host_step}: pass something that "
                "can be iterated once per evaluation (a list, ft.TensorBatches, a DataLoader), "
                "not a one-shot iterator or generator"
            )
        _check_scalars(eval_metrics)
        self.eval_metrics = eval_metrics
        self.eval_step_done = self.host_step
        self.history.record(self.host_step, self.eval_metrics)
        if self.writer is not None:
            self.writer.write_scalars(self.host_step, self.eval_metrics)

    def save(self) -> None:
        if self.manager is None:
            return
        metrics = {}
        if self.metrics is not None and "loss" in self.metrics:
            metrics["train/loss"] = self.metrics["loss"]
        if self.eval_step_done == self.host_step:
            metrics.update(self.eval_metrics)
        epoch, batch = self.position
        with self.throughput.paused():
            if self.writer is not None:
                self.writer.flush()  # the logs reach at least as far as the checkpoint
            self.manager.save(
                self.host_step,
                self.state,
                metrics=metrics,
                metadata={"train_loop": {"epoch": epoch, "batch": batch}},
            )
        self.saved_step = self.host_step

    def on_interrupt(self) -> None:
        if self.guard.in_step:
            print(
                "functrain: interrupted during a step; the state may be half-updated, so no "
                "checkpoint is saved",
                file=sys.stderr,
            )
            return
        if self.metrics is not None and self.logged_step != self.host_step:
            self.log(final=True)
        if self.manager is not None and self.saved_step != self.host_step:
            self.save()
            print(
                f"functrain: interrupted; checkpoint saved at step {self.host_step}",
                file=sys.stderr,
            )

    def attach_state(self, err: BaseException) -> None:
        """Hands the latest state to the caller through ``err`` (the given one was donated)."""
        try:
            err.train_state = self.state  # type: ignore[attr-defined]
        except AttributeError:  # an exception type that takes no attributes
            return
        if self.guard.in_step:
            what = f"the input of the failed step {self.host_step + 1} (a failed step keeps it)"
        else:
            what = f"the state after step {self.host_step}"
        err.add_note(f"functrain.train_loop: err.train_state holds {what}")

    def finish_writer(self, owns: bool, suppress_errors: bool) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close() if owns else self.writer.flush()
        except Exception:
            if not suppress_errors:  # else an exception is already on its way out
                raise
