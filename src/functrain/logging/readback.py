"""Reading scalar curves back from TensorBoard run directories (for plots and reports)."""

from __future__ import annotations

import fnmatch
import os
import struct
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["find_runs", "read_scalars"]


def _event_accumulator(path: str) -> Any:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as err:
        raise ImportError(
            "reading TensorBoard runs needs the `tensorboard` package; install it with "
            f"`pip install functrain[tensorboard]`: {err}"
        ) from err
    # Size 0 keeps every event (the default samples 1,000 scalars per tag). Scalars written as
    # tensors (``tf.summary.scalar``, ``add_scalar(new_style=True)``) land in "tensors", so keep
    # those too. This accumulator, unlike the plugin one, purges at a resumed run's first
    # SessionLog.START, which is the only one ``purge_step`` writes.
    return EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})


def _damage(path: str) -> str | None:
    """Describes a truncated or corrupted record in TFRecord file ``path``; ``None`` if intact.

    TensorBoard stops reading a file at its first bad record and logs that only at debug level,
    so a crash mid-write would silently cut a curve short. This walks the record framing
    (``uint64 length, masked crc32c of length, data, masked crc32c of data``) checking every
    header's CRC, and the data CRC of the last record only (where a torn write lands), so it
    costs a small fraction of TensorBoard's own read.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    size = os.path.getsize(path)
    offset = count = 0
    with open(path, "rb") as f:
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                return f"a truncated record header at byte {offset} (after {count} records)"
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                return f"a corrupted record header at byte {offset} (after {count} records)"
            end = offset + 12 + length + 4
            if end > size:
                return f"a truncated record at byte {offset} (after {count} records)"
            if end == size:
                data = f.read(length)
                if struct.unpack("<I", f.read(4))[0] != masked_crc32c(data):
                    return f"a corrupted last record at byte {offset} (after {count} records)"
            f.seek(end)
            offset = end
            count += 1
    return None


def _warn_if_damaged(run_dir: str) -> None:
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        problem = _damage(path)
        if problem is not None:
            warnings.warn(
                f"event file {path!r} has {problem}: TensorBoard and read_scalars read only the "
                "records before it (the writer crashed mid-write, or is still writing)",
                RuntimeWarning,
                stacklevel=3,
            )


def _tensor_scalars(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """Scalars stored as tensors (``tf.summary.scalar``, ``add_scalar(new_style=True)``).

    The legacy accumulator keeps these but never purges them at a resumed run's
    ``SessionLog.START``, so they are read here, in TensorBoard's file order, with the purge
    applied as for ``simple_value`` scalars: a START at step ``s`` drops the points ``>= s``.
    """
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog
    from tensorboard.util.tensor_util import make_ndarray

    plugin: dict[str, str] = {}  # metadata comes with a tag's first value only
    curves: dict[str, tuple[list[int], list[float]]] = {}
    names = sorted(n for n in os.listdir(run_dir) if "tfevents" in n)
    for name in names:
        for event in EventFileLoader(os.path.join(run_dir, name)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for tag, (steps, values) in curves.items():
                    keep = [i for i, step in enumerate(steps) if step < event.step]
                    curves[tag] = ([steps[i] for i in keep], [values[i] for i in keep])
            for value in event.summary.value:
                if value.HasField("metadata"):
                    plugin.setdefault(value.tag, value.metadata.plugin_data.plugin_name)
                if value.HasField("tensor") and plugin.get(value.tag) == "scalars":
                    steps, values = curves.setdefault(value.tag, ([], []))
                    steps.append(event.step)
                    values.append(float(make_ndarray(value.tensor).item()))
    return curves


def _wanted(tag: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(tag, p) for p in patterns)


def find_runs(logdir: str | os.PathLike[str]) -> list[str]:
    """Lists the run directories under ``logdir`` (itself included) that hold event files.

    A run directory is any directory (symbolic links to directories are not followed) with a
    file whose name contains ``tfevents``.

    Args:
        logdir: the directory to search, recursively.

    Returns:
        The runs' paths relative to ``logdir``, sorted (``"."`` is ``logdir`` itself); an empty
        list when there are no event files.

    Raises:
        FileNotFoundError: ``logdir`` is not an existing directory.

    Example:
        >>> import os, tempfile
        >>> from functrain.logging import TensorBoardWriter, find_runs
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for name in ("b", "a"):
        ...         TensorBoardWriter(os.path.join(d, name)).close()
        ...     find_runs(d)
        ['a', 'b']
    """
    root = os.fspath(logdir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such run directory: {root!r}")
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any("tfevents" in name for name in filenames):
            runs.append(os.path.relpath(dirpath, root))
    return sorted(runs)


def read_scalars(
    logdir: str | os.PathLike[str], tags: Sequence[str] | None = None
) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Reads every scalar curve of every run under ``logdir``.

    Scalars written as ``simple_value`` (functrain, ``torch.utils.tensorboard``) and as scalar
    tensors (``tf.summary.scalar``, ``add_scalar(new_style=True)``) are both read. Resumed runs
    read as TensorBoard shows them: points purged by a restart's ``purge_step``
    are gone. A step written more than once without a purge (a run resumed without
    ``purge_step``) keeps every value, in the order the event files hold them, as TensorBoard
    does; the steps of a curve are therefore not always increasing.

    Args:
        logdir: a run directory or a directory of runs.
        tags: keep only tags matching one of these shell patterns (``["train/*"]``); a single
            string is one pattern.

    Returns:
        ``{run: {tag: (steps, values)}}`` with runs named as by :func:`find_runs`.

    Warns:
        RuntimeWarning: an event file ends in a truncated or corrupted record (a crash
            mid-write); the records before it are still read, as TensorBoard does.

    Example:
        >>> import tempfile
        >>> from functrain.logging import TensorBoardWriter, read_scalars
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with TensorBoardWriter(d) as w:
        ...         for step in range(3):
        ...             w.write_scalars(step, {"loss": 1.0 / (step + 1), "lr": 0.1})
        ...     read_scalars(d, tags=["lo*"])
        {'.': {'loss': ([0, 1, 2], [1.0, 0.5, 0.3333333432674408])}}
    """
    if isinstance(tags, str):  # not a sequence of one-character patterns
        tags = [tags]
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for run in find_runs(logdir):
        run_dir = os.path.join(os.fspath(logdir), run)
        acc = _event_accumulator(run_dir)
        acc.Reload()
        _warn_if_damaged(run_dir)
        found = acc.Tags()
        curves = {}
        for tag in sorted(found["scalars"]):
            if _wanted(tag, tags):
                events = acc.Scalars(tag)
                curves[tag] = ([e.step for e in events], [e.value for e in events])
        if found["tensors"]:
            for tag, curve in _tensor_scalars(run_dir).items():
                if tag not in curves and _wanted(tag, tags):
                    curves[tag] = curve
        curves = dict(sorted(curves.items()))
        if curves:
            out[run] = curves
    return out
