"""``train_loop``: an optional helper that runs a pure train step over epochs of batches.

The pure step stays the core (``state, metrics = step(state, batch)``); this module is the
boilerplate around it that every script rewrites: epochs over any iterable of batches (a
``torch.utils.data.DataLoader`` with workers and pinned memory included), batches moved to the
params' device, default TensorBoard metrics and timings, periodic evaluation, checkpoints with an
exact resume, and a clean Ctrl-C.

**Metrics** (written with :meth:`~functrain.logging.MetricWriter.write_scalars`, as tensors: the
writer does the host conversion, so wrap it in :class:`~functrain.logging.AsyncWriter` to keep
that off the step). See :func:`metric_tags` for the names:

- ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/update_param_ratio``
  (``update_norm / param_norm``) and every other metric of the step;
- ``perf/step_time_s``, ``perf/examples_per_s``, ``perf/tokens_per_s`` (token losses),
  ``perf/data_time_s`` (host time waiting for the batch iterator, per step);
- ``eval/<name>`` for the eval step's metrics, averaged over the eval batches.

**Timing.** The loop never synchronizes inside a step. ``perf/*`` measure the wall-clock time
between log points, evaluation and checkpoint saves left out. On the CPU the clock is read at
every log point. On CUDA a timing event is recorded at each log point and an interval is reported
once its closing event has completed (queried, never waited for), so ``perf/*`` values may
describe an earlier log interval than the step they are written at.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch

from functrain import tree
from functrain.train._loop_data import (
    TensorBatches,
    epoch_iterable,
    leading_size,
    length_of,
    to_device,
)
from functrain.train._loop_metrics import History, Throughput, evaluate, metric_tags
from functrain.train.state import TrainState

__all__ = ["History", "LoopResult", "TensorBatches", "metric_tags", "train_loop"]


class LoopResult(NamedTuple):
    """What :func:`train_loop` returns.

    Attributes:
        state: the final train state.
        history: every scalar logged (train, perf and eval), see :class:`History`.
        interrupted: whether the loop stopped on Ctrl-C (only with ``catch_interrupt=True``).
        resumed_from: the checkpoint step the run resumed from, or ``None``.

    Example:
        >>> import torch, functrain as ft
        >>> tx = ft.sgd(0.5)
        >>> step = ft.make_train_step(lambda p, b: (p["w"] - b).square().mean(), tx)
        >>> state = ft.TrainState.create(params={"w": torch.zeros(())}, tx=tx)
        >>> result = ft.train_loop(step, state, [torch.ones(4)] * 3)
        >>> int(result.state.step), result.interrupted, result.history.values("train/loss")
        (3, False, [1.0, 0.0, 0.0])
    """

    state: TrainState
    history: History
    interrupted: bool = False
    resumed_from: int | None = None


# -- internals -----------------------------------------------------------------------------------


def _device_of(state: TrainState) -> torch.device:
    for leaf in tree.leaves(state.params):
        return leaf.device
    return torch.device("cpu")


class _InterruptGuard:
    """Defers a Ctrl-C that arrives during a step until the step has returned.

    A step may update donated parameter memory in place, so stopping it halfway could leave a
    state that is neither the old one nor the new one. The first Ctrl-C during a step is held
    until the step is done; a second one interrupts at once (and no checkpoint is saved).
    """

    def __init__(self) -> None:
        self.in_step = False
        self.pending = False
        self._previous: Any = None

    def __enter__(self) -> _InterruptGuard:
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


def _read_position(manager: Any, step: int) -> tuple[int, int]:
    from functrain.checkpoint import read_metadata

    user = (read_metadata(manager.path(step)).get("user") or {}).get("train_loop") or {}
    if isinstance(user.get("epoch"), int) and isinstance(user.get("batch"), int):
        return user["epoch"], user["batch"]
    # A checkpoint saved outside train_loop: one batch per step from the start of epoch 0.
    return 0, step


def train_loop(
    step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Any]]],
    state: TrainState,
    batches: Iterable[Any] | Callable[[int], Iterable[Any]],
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    eval_step: Callable[[TrainState, Any], Mapping[str, Any]] | None = None,
    eval_batches: Iterable[Any] | None = None,
    eval_every: int | None = None,
    writer: Any = None,
    log_every: int = 1,
    checkpoint_manager: Any = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    seed: int = 0,
    device: str | torch.device | None = None,
    catch_interrupt: bool = False,
) -> LoopResult:
    """Runs ``step`` over ``epochs`` of ``batches`` with logging, evaluation and checkpoints.

    Each batch is moved to ``device`` (``non_blocking``), then ``state, metrics = step(state,
    batch)``. Every ``log_every`` steps (and at the last one) the metrics go to ``writer`` under
    the tags of :func:`metric_tags`, with ``perf/*`` timings; they stay tensors, so the writer
    decides when to read them (an :class:`~functrain.logging.AsyncWriter` reads them off the
    step path). Steps are numbered by ``state.step`` after the step: the first is step 1.

    **Data order.** ``batches`` is an iterable read once per epoch (a list,
    :class:`TensorBatches`, a ``DataLoader``) or a function ``batches(epoch) -> iterable``. Before
    each epoch the loop calls ``batches.set_epoch(epoch)`` when it exists (and the sampler's, for
    ``DistributedSampler``), and reseeds a ``DataLoader``'s ``generator`` from ``(seed,
    epoch)``, so each epoch's order is reproducible. A shuffling ``DataLoader`` without a
    generator uses the global random generator and is warned about.

    **Checkpoints and resume.** With ``checkpoint_manager`` (a
    :class:`~functrain.checkpoint.CheckpointManager`) the state is saved every
    ``checkpoint_every`` steps, at the end, and on Ctrl-C, with the data position (epoch,
    batches consumed) in the checkpoint's metadata and the train loss and latest eval metrics
    as its metrics (``best_metric="eval/loss"`` works). With ``resume=True`` the loop first
    restores the latest valid checkpoint (``state`` is the restore target), skips the batches
    already consumed and continues, so a resumed run is bit-for-bit the uninterrupted one. The
    writer is flushed before each save, so the logs always cover the checkpoint.

    **Writer.** ``writer`` is a :class:`~functrain.logging.MetricWriter`, which the loop
    flushes at the end (closing it is yours, e.g. ``with writer:``), or a function
    ``writer(purge_step)`` that the loop calls once it knows whether it resumed (``purge_step``
    is the resumed step + 1, else ``None``) and closes at the end. Pass it on to
    ``TensorBoardWriter(logdir, purge_step=purge_step)`` so that a resumed run leaves no
    duplicate points behind.

    **Ctrl-C.** A ``KeyboardInterrupt`` raised between steps (in the batch iterator, say) or a
    Ctrl-C during a step (held until the step returns; a second Ctrl-C stops at once) saves a
    checkpoint when a manager is given, flushes the writer and is re-raised; with
    ``catch_interrupt=True`` the loop returns instead, with ``interrupted=True``.

    Args:
        step: a train step, ``step(state, batch) -> (new_state, metrics)``.
        state: the initial state (and the restore target when resuming).
        batches: an iterable of batches re-read each epoch, or ``epoch -> iterable``.
        epochs: passes over ``batches``.
        max_steps: stop once ``state.step`` reaches this (an absolute step, so a resumed run
            stops at the same place).
        eval_step: ``eval_step(state, batch) -> metrics`` (e.g. :func:`make_eval_step`); run
            under ``torch.no_grad`` over ``eval_batches``. Metrics are averaged with the batches'
            ``num_examples`` as weights (``num_tokens`` for ``loss`` when present) and written
            as ``eval/<name>``.
        eval_batches: an iterable of eval batches, read once per evaluation.
        eval_every: evaluate every this many steps; ``None``: at the end of every epoch. There
            is always an evaluation at the end.
        writer: a metric writer, a function ``purge_step -> writer``, or ``None``.
        log_every: write train metrics every this many steps.
        checkpoint_manager: a ``CheckpointManager`` or ``None``.
        checkpoint_every: save every this many steps (``None``: only at the end and on
            Ctrl-C).
        resume: restore the latest checkpoint of ``checkpoint_manager`` if there is one.
        seed: seeds each epoch's ``DataLoader`` shuffling (with the epoch number).
        device: where batches go; default: the device of ``state.params``.
        catch_interrupt: return on Ctrl-C instead of re-raising ``KeyboardInterrupt``.

    Returns:
        A :class:`LoopResult` ``(state, history, interrupted, resumed_from)``.

    Example:
        >>> import torch, functrain as ft
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(64, 3)
        >>> data = {"x": x, "y": x @ torch.tensor([1.0, -2.0, 0.5])}
        >>> def loss_fn(params, batch):
        ...     return (batch["x"] @ params["w"] - batch["y"]).square().mean()
        >>> tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.1)
        >>> result = ft.train_loop(
        ...     ft.make_train_step(loss_fn, tx, micro_batches=2),
        ...     ft.TrainState.create(params={"w": torch.zeros(3)}, tx=tx),
        ...     ft.TensorBatches(data, batch_size=16, seed=0),
        ...     epochs=10,
        ...     eval_step=ft.make_eval_step(loss_fn),
        ...     eval_batches=[data],
        ... )
        >>> int(result.state.step), result.history.last("eval/loss") < 1e-3
        (40, True)
        >>> {"train/loss", "train/lr", "train/grad_norm", "train/update_param_ratio",
        ...  "perf/step_time_s", "perf/examples_per_s"} <= set(result.history.tags())
        True
    """
    _check_positive_int("log_every", log_every)
    _check_positive_int("epochs", epochs, allow_zero=True)
    for name, value in (
        ("max_steps", max_steps),
        ("eval_every", eval_every),
        ("checkpoint_every", checkpoint_every),
    ):
        if value is not None:
            _check_positive_int(name, value, allow_zero=name == "max_steps")
    if (eval_step is None) != (eval_batches is None):
        raise ValueError("eval_step and eval_batches go together: give both or neither")
    if not isinstance(state, TrainState):
        raise TypeError(f"train_loop expects a ft.TrainState, got {type(state).__name__}")

    resumed_from = None
    position = (0, 0)
    if checkpoint_manager is not None and resume and checkpoint_manager.latest_step() is not None:
        state = checkpoint_manager.restore_latest(target=state)
        resumed_from = checkpoint_manager.restored_step
        position = _read_position(checkpoint_manager, resumed_from)
    owns_writer = writer is not None and not callable(getattr(writer, "write_scalars", None))
    if owns_writer:
        writer = writer(None if resumed_from is None else resumed_from + 1)
    run = _Run(
        step,
        state,
        writer=writer,
        device=torch.device(device) if device is not None else _device_of(state),
        max_steps=max_steps,
        log_every=log_every,
        eval_step=eval_step,
        eval_batches=eval_batches,
        eval_every=eval_every,
        manager=checkpoint_manager,
        checkpoint_every=checkpoint_every,
        resumed_from=resumed_from,
    )
    interrupted = False
    completed = False
    try:
        with run.guard:
            run.train(batches, epochs, position, seed)
        completed = True
    except KeyboardInterrupt:
        interrupted = True
        try:
            run.on_interrupt()
        finally:
            run.finish_writer(owns_writer, suppress_errors=False)
        if not catch_interrupt:
            raise
    finally:
        if not interrupted:
            run.finish_writer(owns_writer, suppress_errors=not completed)
    return LoopResult(run.state, run.history, interrupted, resumed_from)


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} int, got {value!r}")


class _Run:
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
        self.guard = _InterruptGuard()
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
        state, metrics = self.step_fn(self.state, batch)
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
        self.logged_step = self.host_step
        self.history.record(self.host_step, scalars)
        if self.writer is not None:
            self.writer.write_scalars(self.host_step, scalars)

    def evaluate(self) -> None:
        if self.eval_step is None or self.eval_step_done == self.host_step:
            return
        with self.throughput.paused():
            self.eval_metrics = evaluate(self.eval_step, self.state, self.eval_batches, self.device)
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

    def finish_writer(self, owns: bool, suppress_errors: bool) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close() if owns else self.writer.flush()
        except Exception:
            if not suppress_errors:  # else an exception is already on its way out
                raise
