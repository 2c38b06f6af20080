"""A buffered event-file writer that replaces TensorBoard's per-event file path.

TensorBoard's own writer (used by ``SummaryWriter`` when TensorFlow is absent) hands every event
to a second thread, which opens, appends to and closes the file for each event and computes the
record checksums (CRC32C) byte by byte in Python: about 100 µs of GIL-holding work per event,
more than the 3% budget of a few-millisecond step. This writer keeps the file open, buffers
writes, flushes every ``flush_secs``, computes the checksum with ``google_crc32c`` when its C
extension is installed (a tighter pure-Python loop otherwise) and writes from the calling thread,
so under an ``AsyncWriter`` all event work happens on one background thread. Only the flush of
events that no later write comes to flush is left to a timer thread.

The record framing is TFRecord's: ``uint64 length, uint32 masked_crc(length), data,
uint32 masked_crc(data)``, little-endian.

Scalar events, the ones written every step, skip protobuf objects altogether:
:func:`encode_scalar_event` writes the ``Event{wall_time, step, summary{value{tag,
simple_value}}}`` wire bytes directly from per-tag prefixes cached once, about a tenth of the
cost of building and serializing the messages.
"""

from __future__ import annotations

import atexit
import functools
import os
import struct
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

_MASK = 0xFFFFFFFF
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack
_U64 = 0xFFFFFFFFFFFFFFFF
_BYTE = tuple(bytes((i,)) for i in range(128))


def _make_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # CRC32C (Castagnoli), reflected
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def crc32c_python(data: bytes, table: tuple[int, ...] = _TABLE) -> int:
    """CRC32C of ``data`` in pure Python (table-driven, one byte per iteration)."""
    crc = _MASK
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _MASK


def _crc32c_function() -> Callable[[bytes], int]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns when falling back to pure Python
            import google_crc32c
    except ImportError:
        return crc32c_python
    if getattr(google_crc32c, "implementation", None) != "c":
        return crc32c_python
    return google_crc32c.value


crc32c = _crc32c_function()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data``."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & _MASK


def frame_record(data: bytes) -> bytes:
    """Frames ``data`` as one TFRecord."""
    header = struct.pack("<Q", len(data))
    return b"".join(
        (
            header,
            struct.pack("<I", masked_crc32c(header)),
            data,
            struct.pack("<I", masked_crc32c(data)),
        )
    )


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer below 2**64."""
    if value < 0x80:
        return _BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.lru_cache(maxsize=4096)
def _value_prefix(tag: str) -> bytes:
    """Wire bytes of ``Summary.value`` entry ``{tag, simple_value}`` up to the float itself."""
    name = tag.encode("utf-8")
    body = b"\x0a" + _varint(len(name)) + name + b"\x15"  # tag = 1, simple_value = 2 (fixed32)
    return b"\x0a" + _varint(len(body) + 4) + body  # Summary.value = 1


def encode_scalar_event(step: int, tags: Sequence[str], values: Sequence[float]) -> bytes:
    """Serialized ``Event`` holding one ``simple_value`` per tag at ``step``, stamped now.

    The same message as ``Event(wall_time=time.time(), step=step, summary=Summary(value=[
    Summary.Value(tag=t, simple_value=v) ...]))`` serialized by protobuf. Raises
    ``OverflowError`` for a finite value beyond float32's range (protobuf would store inf).
    """
    summary = b"".join([_value_prefix(t) + _FLOAT(v) for t, v in zip(tags, values)])
    head = b"\x09" + _DOUBLE(time.time())  # wall_time = 1 (fixed64)
    if step:  # proto3 leaves a zero step out
        head += b"\x10" + _varint(step & _U64)  # step = 2 (varint, two's complement)
    return head + b"\x2a" + _varint(len(summary)) + summary  # summary = 5


def _flush_at_exit(ref: weakref.ref[EventFile]) -> None:
    event_file = ref()
    if event_file is None:
        return
    try:
        event_file.flush()
    except KeyboardInterrupt:
        # A second Ctrl-C during the exit (as AsyncWriter's exit hook): one line rather than
        # "Exception ignored in atexit callback" and a traceback. Readers stop at a record the
        # interrupted write left incomplete; the records before it are whole.
        print(
            f"functrain: interrupted while flushing {event_file.path} at exit; "
            "its last buffered events may be missing",
            file=sys.stderr,
        )


class EventFile:
    """Appends events to one file; the interface of TensorBoard's ``EventFileWriter``.

    Args:
        path: the event file, opened for appending (it may already hold events).
        logdir: returned by :meth:`get_logdir`.
        flush_secs: the longest time written events stay in the buffer.
    """

    def __init__(self, path: str, logdir: str, flush_secs: float) -> None:
        self.path = path
        self._logdir = logdir
        self._flush_secs = flush_secs
        self._lock = threading.Lock()  # SummaryWriter may be shared between threads
        self._file: Any = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._next_flush = time.monotonic() + flush_secs
        # Flushes events that no later write would flush: the last steps before a long
        # evaluation, or before a hang, must reach TensorBoard within flush_secs all the same.
        self._timer: threading.Timer | None = None
        self._dirty = False  # written since the last flush
        # Buffered events of a writer nobody closed still reach the file at exit.
        self._exit_hook = functools.partial(_flush_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    def get_logdir(self) -> str:
        return self._logdir

    def add_event(self, event: Any) -> None:
        self.add_serialized(event.SerializeToString())

    def add_serialized(self, data: bytes) -> None:
        """Appends one already serialized ``Event``."""
        record = frame_record(data)
        with self._lock:
            if self._file is None:
                raise OSError(f"event file {self.path!r} is closed")
            self._file.write(record)
            self._dirty = True
            now = time.monotonic()
            if now >= self._next_flush:
                self._flush_locked()
            elif self._timer is None:
                self._arm(self._next_flush - now)

    def _arm(self, delay: float) -> None:
        # A flush does not cancel the timer (a new thread after every flush() cost 0.5% of a
        # small model's step when a caller flushes often); it re-checks when it fires, so at
        # most one thread is started per flush interval.
        self._timer = threading.Timer(delay, self._timed_flush)
        self._timer.daemon = True
        self._timer.start()

    def _timed_flush(self) -> None:
        with self._lock:
            self._timer = None
            if self._file is None or not self._dirty:
                return
            now = time.monotonic()
            if now >= self._next_flush:
                self._flush_locked()
            else:
                self._arm(self._next_flush - now)

    def _flush_locked(self) -> None:
        if self._file is not None:
            self._file.flush()
        self._dirty = False
        self._next_flush = time.monotonic() + self._flush_secs

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        atexit.unregister(self._exit_hook)

    def reopen(self) -> None:
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
                atexit.register(self._exit_hook)


def _ordered_name(path: str, suffix: str) -> str:
    """``path`` with its writer number zero-padded, so names sort in creation order.

    TensorBoard names files ``events.out.tfevents.<time>.<host>.<pid>.<n><suffix>`` and reads
    a run's files in name order. Two writers opened by one process in the same second differ
    only in ``n``, and as text ``...10`` sorts before ``...9``: a resumed run's file (holding
    the purge of the steps it repeats) was then read *first*, and the crashed run's repeated
    steps showed up again.
    """
    directory, name = os.path.split(path)
    if suffix and not name.endswith(suffix):
        return path
    stem = name[: len(name) - len(suffix)] if suffix else name
    head, _, number = stem.rpartition(".")
    if not head.startswith("events.out.tfevents.") or not number.isdigit():
        return path
    return os.path.join(directory, f"{head}.{number.zfill(10)}{suffix}")


def install(summary_writer: Any, flush_secs: float, filename_suffix: str = "") -> bool:
    """Moves ``summary_writer``'s open event file onto :class:`EventFile`.

    TensorBoard's writer is flushed and closed first (it wrote the file-version and any purge
    events), then the same file is continued, renamed so that a run's files sort in the order
    they were opened (:func:`_ordered_name`). Returns False, leaving the writer untouched, when
    its internals are not the expected ones.
    """
    file_writer = getattr(summary_writer, "file_writer", None)
    stock = getattr(file_writer, "event_writer", None)
    path = getattr(stock, "_file_name", None)
    if not isinstance(path, str) or not callable(getattr(stock, "close", None)):
        return False
    stock.close()
    ordered = _ordered_name(path, filename_suffix)
    if ordered != path and not os.path.exists(ordered):
        os.replace(path, ordered)
        path = ordered
    file_writer.event_writer = EventFile(path, stock.get_logdir(), flush_secs)
    return True
