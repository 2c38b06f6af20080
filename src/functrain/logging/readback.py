"""Reading scalar curves back from TensorBoard run directories (for plots and reports)."""

from __future__ import annotations

import fnmatch
import os
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
    # size_guidance 0 keeps every event (the default samples 1,000 points per tag).
    return EventAccumulator(path, size_guidance={"scalars": 0})


def find_runs(logdir: str | os.PathLike[str]) -> list[str]:
    """Lists the run directories under ``logdir`` (itself included) that hold event files.

    Returns paths relative to ``logdir``, sorted; ``"."`` is ``logdir`` itself.

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

    Resumed runs read as TensorBoard shows them: points purged by a restart's ``purge_step``
    are gone. A step written more than once without a purge (a run resumed without
    ``purge_step``) keeps every value, in the order the event files hold them, as TensorBoard
    does; the steps of a curve are therefore not always increasing.

    Args:
        logdir: a run directory or a directory of runs.
        tags: keep only tags matching one of these shell patterns (``["train/*"]``); a single
            string is one pattern.

    Returns:
        ``{run: {tag: (steps, values)}}`` with runs named as by :func:`find_runs`.

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
        acc = _event_accumulator(os.path.join(os.fspath(logdir), run))
        acc.Reload()
        curves = {}
        for tag in sorted(acc.Tags()["scalars"]):
            if tags is not None and not any(fnmatch.fnmatchcase(tag, p) for p in tags):
                continue
            events = acc.Scalars(tag)
            curves[tag] = ([e.step for e in events], [e.value for e in events])
        if curves:
            out[run] = curves
    return out
