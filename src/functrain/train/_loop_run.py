"""The machinery of :func:`functrain.train.loop.train_loop` (internal): ``Run`` holds a run's
state, history, writer and checkpoint cadence and runs its steps, evaluations and saves;
``InterruptGuard`` defers a Ctrl-C to the end of a step.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from functrain.train._loop_data import epoch_iterable, leading_size, length_of, to_device
from functrain.train._loop_metrics import (
    History,
    Throughput,
    check_scalars,
    evaluate,
    metric_tags,
)
from functrain.train.state import TrainState

__all__ = ["InterruptGuard", "Run"]  # internal: used by train_loop


class InterruptGuard:
    """Defers a Ctrl-C that arrives during a step until the step has returned.

    A step may update donated parameter memory in place, so stopping it halfway could leave a
    state that is neither the old one nor the new one. The first Ctrl-C during a step is held
    until the step is done; a second one interrupts at once (and the loop neither saves nor
    returns that state).
    """

    def __init__(self) -> None:
        self.in_step = False
        self.holding = False  # inside :meth:`held`
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
        if (self.in_step or self.holding) and not self.pending:
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

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Holds a Ctrl-C until the block is done (recording a step's metrics: one that landed
        after the step was marked logged but before the writer had it lost that step's curves,
        the checkpoint then resuming after it). A second Ctrl-C stops the block at once."""
        if self.holding or self.in_step:
            yield
            return
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


class _Counted:
    """An iterable that counts the items its iterators yield (to spot one-shot iterators)."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self.iterable = iterable
        self.count = 0

    def __iter__(self) -> Any:
        for item in self.iterable:
            self.count += 1
            yield item


_END = object()


def _advance_past_end(iterator: Any, length: int | None) -> None:
    """Asks a sized epoch's iterator for one batch past its ``len()``, as a ``for`` loop does.

    A sampler may draw when its iterator runs out (``RandomSampler`` draws its remainder
    permutation then, even an empty one), so stopping at the last batch would leave a
    generator that outlives the epoch one draw behind a plain ``for batch in loader`` loop.
    A batch it does yield (a ``len()`` shorter than the iteration) is dropped, not trained on: the
    epoch is ``len()`` batches long, and an endless iterable with a ``len`` is not drained. That
    is warned about, since the batches past ``len()`` are never trained on.
    """
    if next(iterator, _END) is not _END:
        warnings.warn(
            f"batches yielded more than its len() = {length} batches in an epoch: the epoch "
            "ends after len() batches and the rest are not trained on (the batch read to end "
            "the epoch is dropped); make len() match the iteration",
            stacklevel=2,
        )


def _fetch(iterator: Any) -> tuple[Any, float] | None:
    """The iterator's next batch and the seconds spent waiting for it; ``None`` at its end."""
    start = time.perf_counter()
    try:
        batch = next(iterator)
    except StopIteration:
        return None
    return batch, time.perf_counter() - start


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
        resumed_evaluated: bool | None = None,
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
        # The resumed step's evaluation was written by the run that saved it (None: unknown).
        self.resumed_evaluated = resumed_evaluated
        self.eval_step_done = resumed_from if resumed_evaluated else None
        self.saved_step = resumed_from
        self.torn = False  # a step stopped halfway by Ctrl-C
        self.throughput = Throughput(device)

    def done(self) -> bool:
        return self.max_steps is not None and self.host_step >= self.max_steps

    # -- the loop ----------------------------------------------------------------------------
    def train(self, batches: Any, epochs: int, position: tuple[int, int], seed: int) -> None:
        epoch, skip = position
        self.position = position
        if self.resumed_evaluated is False and self.eval_due(end_of_epoch=skip == 0 < epoch):
            self.evaluate()  # a Ctrl-C held during that step stopped the run before its eval
        while epoch < epochs and not self.done():
            iterable = epoch_iterable(batches, epoch, seed)
            length = length_of(iterable)
            iterator = iter(iterable)
            consumed, exhausted = 0, False  # exhausted: the iterator raised StopIteration
            for _ in range(skip if length is None else min(skip, length)):
                try:
                    next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                consumed += 1
            if consumed < skip:  # the position lies beyond this epoch
                if not exhausted:  # skipped all len() batches: end it as a for loop does
                    _advance_past_end(iterator, length)
                skip -= consumed
                epoch += 1
                continue
            skip = 0
            self.position = (epoch, consumed)
            ended = length is not None and consumed >= length
            ahead = None  # the next batch, read ahead to learn whether an unsized epoch ends
            while not ended and not self.done():
                if ahead is None:
                    ahead = _fetch(iterator)
                    if ahead is None:
                        ended = exhausted = True
                        break
                (batch, data_s), ahead = ahead, None
                consumed += 1
                # At an epoch's last batch the next position is the next epoch's start.
                ended = length is not None and consumed >= length
                self.train_step(batch, data_s, (epoch + 1, 0) if ended else (epoch, consumed))
                if length is None and not self.done():
                    # Read before this step's checkpoint: at an unsized epoch's end the step
                    # is saved once, as the next epoch's start, with the epoch-end evaluation.
                    try:
                        ahead = _fetch(iterator)
                    except BaseException:
                        self.after_step()  # the step's log, eval and save come first
                        raise
                    ended = exhausted = ahead is None
                if not ended:
                    self.after_step()
            if ended and not exhausted and not self.done():
                # A sized epoch ran to its len(): advance its iterator past the end, as a for
                # loop does (a run stopped by max_steps, like a loop that breaks, does not).
                try:
                    _advance_past_end(iterator, length)
                except BaseException:
                    self.after_step()  # the step's log, eval and save come first
                    raise
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
        if self.metrics is None:  # no step yet: only the end of the epoch resumed into
            # A run that a held Ctrl-C stopped after an unsized epoch's last step saved it
            # mid-epoch and unevaluated; reading that epoch's end now, evaluate it (once).
            if self.resumed_evaluated is False and self.eval_due(end_of_epoch):
                self.evaluate()
            return
        if self.host_step % self.log_every == 0 and self.logged_step != self.host_step:
            self.log()
        if self.eval_due(end_of_epoch):
            self.evaluate()
        if self.checkpoint_every is not None and self.host_step % self.checkpoint_every == 0:
            self.save()

    def eval_due(self, end_of_epoch: bool) -> bool:
        if self.eval_every is None:
            return end_of_epoch
        return self.host_step % self.eval_every == 0

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
        check_scalars(scalars)
        with self.guard.held():
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
        check_scalars(eval_metrics)
        self.eval_metrics = eval_metrics
        self.eval_step_done = self.host_step
        self.history.record(self.host_step, self.eval_metrics)
        if self.writer is not None:
            self.writer.write_scalars(self.host_step, self.eval_metrics)

    def save(self) -> None:
        if self.manager is None or self.saved_step == self.host_step:
            return  # each step is saved once
        metrics = {}
        if self.metrics is not None and "loss" in self.metrics:
            metrics["train/loss"] = self.metrics["loss"]
        evaluated = self.eval_step_done == self.host_step
        if evaluated:
            metrics.update(self.eval_metrics)
        epoch, batch = self.position
        with self.throughput.paused():
            if self.writer is not None:
                self.writer.flush()  # the logs reach at least as far as the checkpoint
            self.manager.save(
                self.host_step,
                self.state,
                metrics=metrics,
                metadata={"train_loop": {"epoch": epoch, "batch": batch, "evaluated": evaluated}},
            )
        self.saved_step = self.host_step

    def on_interrupt(self) -> None:
        if self.guard.in_step:
            # A second Ctrl-C (or one the guard could not hold) stopped the step halfway: a
            # donating step may have written part of its update into its input's memory.
            self.torn = True
            print(
                "functrain: interrupted during a step; the state may be half-updated, so it "
                "is neither saved nor returned",
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
        """Hands the latest whole state to the caller through ``err`` (the given one was
        donated), or ``None`` where no whole state is left."""
        state: TrainState | None = self.state
        failed = self.host_step + 1
        if self.torn and getattr(self.step_fn, "donate", None) is not False:
            state = None
            last = "no checkpoint" if self.saved_step is None else f"step {self.saved_step}"
            what = (
                f"None: step {failed} was stopped halfway and may have half-written the "
                f"donated state in place; the latest checkpoint is {last}"
            )
        elif self.guard.in_step:
            what = f"the input of the failed step {failed} (a failed step keeps it)"
        else:
            what = f"the state after step {self.host_step}"
        if state is not None and state.consumed:  # a step that donated it, then failed
            state, what = None, f"None: the state after step {self.host_step} was consumed"
        try:
            err.train_state = state  # type: ignore[attr-defined]
        except AttributeError:  # an exception type that takes no attributes
            return
        err.add_note(f"functrain.train_loop: err.train_state is {what}")

    def finish_writer(self, owns: bool, suppress_errors: bool) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close() if owns else self.writer.flush()
        except Exception:
            if not suppress_errors:  # else an exception is already on its way out
                raise
