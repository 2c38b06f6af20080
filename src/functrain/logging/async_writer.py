"""A writer that keeps device->host copies and event writing off the training step.

The step hands :class:`AsyncWriter` its metric tensors and goes on. At the call the writer only
*snapshots* them without waiting for the device: scalars on an accelerator are stacked into one
tensor per (device, dtype); on CUDA that tensor (and each histogram tensor) is copied with
``non_blocking=True`` into pinned host memory and a CUDA event is recorded behind the copies; on
the CPU the snapshot is ``item()`` for scalars and a fresh copy for arrays. Every ``every_n`` writes (or ``max_delay_s`` seconds) the
buffered writes go to a background thread, which waits for the events, turns the host copies into
Python numbers and calls the wrapped writer. The caller only waits in :meth:`~AsyncWriter.flush`,
:meth:`~AsyncWriter.close`, or when ``max_pending`` batches are already queued (back-pressure).

On the CPU there is nothing to wait for: by default (``host_inline=True``) a batch whose
values are all on the host is written by the calling thread at hand-over, since a background
thread doing Python work only competes with the training loop for the GIL.

Snapshots are taken in stream order at the call, so the values written are those the tensors held
at that moment even if their memory is reused afterwards (donated buffers, CUDA graphs).

An exception raised by the wrapped writer in the background thread is re-raised (as a
``RuntimeError`` whose ``__cause__`` is the original) by the next call to any method, after
that call's own values are buffered; ``flush`` and ``close`` first write everything buffered.

Scalars reach the wrapped writer as Python numbers (a float64 or integer tensor keeps its
precision), so the stored precision is the wrapped writer's: float32 for
:class:`~functrain.logging.TensorBoardWriter`. The step is checked at the call with the rule of
:func:`~functrain.logging.step_to_int` (a bool step, tensor or not, is a ``TypeError``), so a bad
step fails in the caller rather than later in the background thread.

The snapshot machinery (``_Snapshot``, ``_host_copy``, ``_Deferred``) lives in
``functrain.logging._snapshot`` and is re-exported here.
"""

from __future__ import annotations

import atexit
import functools
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from functrain.logging._snapshot import _Deferred, _host_copy, _Snapshot  # noqa: F401
from functrain.logging.base import Array, HParam, MetricWriter, Scalar, _check_step

_MAIN = threading.main_thread()

__all__ = ["AsyncWriter"]

_FLUSH = object()
_CLOSE = object()


def _check_names(mapping: Mapping[str, Any], what: str) -> list[str]:
    if type(mapping) is not dict and not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping of names to values, got {type(mapping)}")
    names = list(mapping)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{what} names must be non-empty strings, got {name!r}")
    return names


def _write_host_scalars(
    step: int, names: tuple[str, ...], values: list[Any], writer: MetricWriter
) -> None:
    writer.write_scalars(step, dict(zip(names, values)))


def _close_at_exit(ref: weakref.ref[AsyncWriter]) -> None:
    writer = ref()
    if writer is None:
        return
    try:
        writer.close()
    except KeyboardInterrupt:
        # A second Ctrl-C while the exit waits for the last writes (the first one is what
        # ended the program): stop waiting, quietly. Raised here, Python prints it as
        # "Exception ignored in atexit callback" with a traceback, after the traceback of the
        # first Ctrl-C. The event file takes whole records under its lock and flushes them at
        # exit, so it stays readable; the writes still queued are lost.
        print(
            "functrain: AsyncWriter: interrupted at exit; its last buffered values may be missing",
            file=sys.stderr,
        )


class AsyncWriter(MetricWriter):
    """Wraps a writer so that logging every step does not wait for the device or the disk.

    Args:
        writer: the writer that does the writing (e.g. a ``TensorBoardWriter`` or a
            ``MultiWriter``); it is only called from the background thread.
        every_n: buffered write calls handed to the background thread at a time.
        max_delay_s: also hand them over when this many seconds passed since the last hand-over
            (keeps a progress bar fresh when steps are slow); when no write call comes, the
            background thread writes them itself after that long, so the last steps before a
            long evaluation or a hang still reach the wrapped writer. ``None`` disables both.
        max_pending: batches queued for the background thread before writes block.
        host_inline: write a batch whose values are all on the host already (numbers, CPU
            tensors) in the calling thread at hand-over, when the background thread is idle.
            There is nothing to wait for in that case, and a second thread doing Python work
            would only compete with the training loop for the GIL. ``False`` sends every batch
            to the background thread (for a wrapped writer with slow I/O).

    Unclosed writers are closed (and their data written) when the interpreter exits.

    Example:
        >>> import tempfile, torch
        >>> from functrain.logging import AsyncWriter, TensorBoardWriter
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with AsyncWriter(TensorBoardWriter(d), every_n=4) as writer:
        ...         for step in range(10):
        ...             loss = torch.tensor(1.0 / (step + 1))  # stays a tensor: no sync here
        ...             writer.write_scalars(step, {"train/loss": loss})
    """

    def __init__(
        self,
        writer: MetricWriter,
        *,
        every_n: int = 10,
        max_delay_s: float | None = 2.0,
        max_pending: int = 64,
        host_inline: bool = True,
    ) -> None:
        if not callable(getattr(writer, "write_scalars", None)):
            raise TypeError(f"writer must be a metric writer, got {type(writer).__name__}")
        if every_n < 1:
            raise ValueError(f"every_n must be >= 1, got {every_n}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.writer = writer
        self.every_n = int(every_n)
        self.max_delay_s = max_delay_s
        self.host_inline = host_inline
        self._buffer: list[tuple[_Snapshot | None, Callable[[MetricWriter], None]]] = []
        self._scalar_names: tuple[str, ...] = ()  # names already checked by write_scalars
        self._lock = threading.Lock()
        self._dispatch_lock = threading.Lock()  # keeps batches in order; the worker only tries it
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._closed = False
        self._last_dispatch = time.monotonic()
        self._thread = threading.Thread(
            target=self._work, name="functrain-AsyncWriter", daemon=True
        )
        self._thread.start()
        self._exit_hook = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    # -- background thread ---------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            delay = self.max_delay_s
            try:
                # Wakes up to hand over writes that no later call comes to hand over.
                item = self._queue.get(timeout=None if delay is None else max(delay, 0.05))
            except queue.Empty:
                self._hand_over_idle()
                continue
            try:
                if item is _FLUSH:
                    self._guard(self.writer.flush)
                elif item is _CLOSE:
                    self._guard(self.writer.close)
                    return
                else:
                    for snapshot, call in item:
                        self._guard(functools.partial(self._replay, snapshot, call))
            finally:
                self._queue.task_done()

    def _hand_over_idle(self) -> None:
        """Writes the buffer when no call handed it over for ``max_delay_s`` seconds.

        Without this, the last steps before a long evaluation (or a hang) would only reach
        TensorBoard at the next write call.
        """
        delay = self.max_delay_s
        if not self._buffer or delay is None or time.monotonic() - self._last_dispatch < delay:
            return
        # Never wait for the dispatch lock: a caller holding it may be blocked putting into
        # the full queue, which only this thread drains. Holding it keeps callers from writing
        # inline meanwhile; an empty queue means nothing older is still waiting to be written.
        if not self._dispatch_lock.acquire(blocking=False):
            return
        try:
            if self._queue.unfinished_tasks:
                return
            with self._lock:
                batch, self._buffer = self._buffer, []
                self._last_dispatch = time.monotonic()
            for snapshot, call in batch:
                self._guard(functools.partial(self._replay, snapshot, call))
        finally:
            self._dispatch_lock.release()

    def _replay(self, snapshot: _Snapshot | None, call: Callable[[MetricWriter], None]) -> None:
        if snapshot is not None:
            snapshot.wait()
        call(self.writer)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as err:  # surfaced in the caller's thread, see _raise_pending
            if not isinstance(err, Exception) and threading.current_thread() is _MAIN:
                # Ctrl-C (or exit) while the caller's thread replays buffered calls belongs to
                # the caller: recorded, it came back later as a "write failure" RuntimeError.
                raise
            with self._lock:
                if self._error is None:
                    self._error = err

    # -- caller thread -------------------------------------------------------------------------
    def _raise_pending(self) -> None:
        if self._error is None:  # a plain read: the lock is only needed to take the error
            return
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise RuntimeError(
                f"AsyncWriter: the wrapped {type(self.writer).__name__} failed while writing "
                f"earlier values: {type(err).__name__}: {err}"
            ) from err

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("AsyncWriter is closed")

    def _submit(self, snapshot: _Snapshot | None, call: Callable[[MetricWriter], None]) -> None:
        """Buffers a write; ``snapshot`` is ``None`` when its values are host values already."""
        if snapshot is not None:
            snapshot.seal()
        with self._lock:
            self._buffer.append((snapshot, call))
            due = len(self._buffer) >= self.every_n or (
                self.max_delay_s is not None
                and time.monotonic() - self._last_dispatch >= self.max_delay_s
            )
        if due:
            self._dispatch()
        # After buffering: the error is about earlier values, and this call's must not be lost.
        self._raise_pending()

    def _dispatch(self) -> None:
        with self._dispatch_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
                self._last_dispatch = time.monotonic()
            if not batch:
                return
            # unfinished_tasks == 0: the worker is idle, so writing here keeps the order.
            if (
                self.host_inline
                and self._queue.unfinished_tasks == 0
                and all(snapshot is None or snapshot.on_host for snapshot, _ in batch)
            ):
                for _, call in batch:
                    self._guard(functools.partial(call, self.writer))
            else:
                self._queue.put(batch)

    def write_scalars(self, step: int | torch.Tensor, scalars: Mapping[str, Scalar]) -> None:
        """Snapshots the scalars (and a tensor step) without waiting; written later."""
        if self._closed:
            self._check_open()
        if type(step) is torch.Tensor and step.is_cpu:
            _check_step(step)
            step = step.item()
        if type(step) is int and type(scalars) is dict:
            # The every-step case on the CPU: a dict of numbers and CPU tensors, the same names
            # as last time. The snapshot is one item() per tensor (cheaper than a stack), and
            # the call is buffered as plain data; events are encoded at hand-over.
            names = tuple(scalars)
            if names != self._scalar_names:
                _check_names(scalars, "scalars")
                self._scalar_names = names
            host: list[Any] = []
            for value in scalars.values():
                kind = type(value)
                if kind is torch.Tensor and value.is_cpu:
                    try:
                        host.append(value.item())
                    except RuntimeError:  # not one element: the general path explains
                        break
                elif kind is float or kind is int:
                    host.append(value)
                else:  # accelerator tensors, NumPy, subclasses: the general path
                    break
            else:
                self._submit(None, functools.partial(_write_host_scalars, step, names, host))
                return
        self._check_open()
        _check_step(step)
        names = _check_names(scalars, "scalars")
        snapshot = _Snapshot()
        resolve = snapshot.scalars(["step", *names], [step, *scalars.values()])

        def call(writer: MetricWriter) -> None:
            host_step, *values = resolve()
            writer.write_scalars(host_step, dict(zip(names, values)))

        self._submit(snapshot, call)

    def write_histograms(self, step: int | torch.Tensor, arrays: Mapping[str, Array]) -> None:
        """Snapshots the arrays without waiting (a private copy each); written later."""
        self._check_open()
        _check_step(step)
        names = _check_names(arrays, "arrays")
        snapshot = _Snapshot()
        resolve_step = snapshot.scalars(["step"], [step])
        gets = [snapshot.array(name, value) for name, value in arrays.items()]

        def call(writer: MetricWriter) -> None:
            (host_step,) = resolve_step()
            writer.write_histograms(host_step, {n: get() for n, get in zip(names, gets)})

        self._submit(snapshot, call)

    def write_text(self, step: int | torch.Tensor, texts: Mapping[str, str]) -> None:
        """Queues the texts; written later in order with the other writes."""
        self._check_open()
        _check_step(step)
        names = _check_names(texts, "texts")
        for name, text in texts.items():
            if not isinstance(text, str):
                raise TypeError(f"text {name!r} must be a str, got {type(text).__name__}")
        snapshot = _Snapshot()
        resolve_step = snapshot.scalars(["step"], [step])
        texts = dict(zip(names, texts.values()))
        self._submit(snapshot, lambda writer: writer.write_text(resolve_step()[0], texts))

    def write_hparams(
        self,
        hparams: Mapping[str, HParam],
        metrics: Mapping[str, Scalar | None] | None = None,
        *,
        step: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Queues the hparams (tensor values are snapshotted); extra keywords are passed on."""
        self._check_open()
        hp_names = _check_names(hparams, "hparams")
        metric_names = [] if metrics is None else _check_names(metrics, "metrics")
        if step is not None:
            _check_step(step)
        snapshot = _Snapshot()
        hp_values = list(hparams.values())
        # One-element tensors become numbers like the metrics; others (betas as a tensor, shown
        # as text by TensorBoardWriter) and NumPy arrays are copied whole: the caller may change
        # them in place before the write happens.
        for i, value in enumerate(hp_values):
            if isinstance(value, torch.Tensor) and value.numel() != 1:
                get = snapshot.tensor(value)
                hp_values[i] = _Deferred(get)
            elif isinstance(value, np.ndarray):
                hp_values[i] = value.copy()
        tensor_hp = [i for i, value in enumerate(hp_values) if isinstance(value, torch.Tensor)]
        resolve = snapshot.scalars(
            [*(hp_names[i] for i in tensor_hp), *metric_names, "step"],
            [
                *(hp_values[i] for i in tensor_hp),
                *([] if metrics is None else metrics.values()),
                step,
            ],
            allow_none=True,
        )

        def call(writer: MetricWriter) -> None:
            values = resolve()
            host_hp = [v.get() if isinstance(v, _Deferred) else v for v in hp_values]
            for i, value in zip(tensor_hp, values):
                host_hp[i] = value
            host_metrics = None
            if metrics is not None:
                host_metrics = dict(zip(metric_names, values[len(tensor_hp) : -1]))
            writer.write_hparams(
                dict(zip(hp_names, host_hp)), host_metrics, step=values[-1], **kwargs
            )

        self._submit(snapshot, call)

    def flush(self) -> None:
        """Waits until every earlier write reached the wrapped writer, then flushes it."""
        if self._closed:
            raise RuntimeError("AsyncWriter is closed")
        # A pending error is raised after the flush, so the buffered writes still reach the file.
        self._dispatch()
        self._queue.put(_FLUSH)
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        """Writes everything still buffered, closes the wrapped writer and stops the thread.

        Raises the background thread's pending error, if any, after everything is closed.
        Closing twice is allowed.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        self._dispatch()
        self._queue.put(_CLOSE)
        self._thread.join()
        self._raise_pending()

    def __repr__(self) -> str:
        return f"AsyncWriter({self.writer!r}, every_n={self.every_n})"
