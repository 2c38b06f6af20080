"""TensorBoard event files through ``torch.utils.tensorboard``, one run directory per writer.

Compared with calling ``SummaryWriter`` directly:

- hyperparameters go into the same run as the curves (``SummaryWriter.add_hparams`` writes them
  into a new timestamped sub-run, so the HParams dashboard shows a run with no curves);
- histograms use a fixed number of equal-width bins between the finite minimum and maximum
  (cheap for large tensors, readable in the dashboard) instead of ~1,500 exponential buckets;
- text keeps the exact tag it was given (no ``/text_summary`` suffix);
- events go through a buffered file writer with fast checksums instead of TensorBoard's
  per-event open/append/close thread (see ``functrain.logging._event_file``); all scalars of one
  call share one event, encoded without building protobuf messages;
- values may be tensors on any device, and the step may be a tensor.

Resuming: pass ``purge_step=k`` when restarting from a checkpoint taken at step ``k``. The writer
opens a new event file in the same directory that starts with a ``SessionLog.START`` at ``k``;
TensorBoard then drops every event with step ``>= k`` written before the restart, so the curves
show each step once, with the values of the resumed run.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from functrain.logging import _event_file
from functrain.logging.base import (
    Array,
    HParam,
    MetricWriter,
    Scalar,
    step_to_int,
    to_float,
    to_numpy,
)

__all__ = ["TensorBoardWriter"]

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Below this bin width (in ulps of the data, or subnormal) NumPy's equal-width binning, which
# computes each bucket index arithmetically, is no longer exact: buckets get explicit edges.
_MIN_BIN_ULPS = 64
_TINY = sys.float_info.min

_INSTALL_HINT = (
    "TensorBoardWriter needs the `tensorboard` package; install it with "
    "`pip install functrain[tensorboard]` (or `pip install tensorboard`)"
)


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # tensorboard missing, or older than torch accepts
        raise ImportError(f"{_INSTALL_HINT}: {err}") from err
    return SummaryWriter


def _check_names(mapping: Mapping[str, Any], what: str) -> None:
    if type(mapping) is not dict and not isinstance(mapping, Mapping):
        raise TypeError(f"{what} must be a mapping of names to values, got {type(mapping)}")
    for key in mapping:
        if not isinstance(key, str) or not key:
            raise TypeError(f"{what} names must be non-empty strings, got {key!r}")


def _histogram(values: np.ndarray, bins: int) -> dict[str, Any] | None:
    """Summarises finite values into ``bins`` equal-width buckets (TensorBoard's layout).

    Returns ``None`` when there is no finite value. ``bucket_limits[i]`` is the right edge of
    bucket ``i``; the left edge of the first bucket is ``min``. NaN and infinities are left out.
    """
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return None
    values = values.astype(np.float64, copy=False)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        limits, counts = np.array([hi]), np.array([values.size])
    else:
        width = (hi - lo) / bins
        if math.isfinite(width * bins * 4) and width >= max(
            _MIN_BIN_ULPS * math.ulp(max(abs(lo), abs(hi))), _TINY
        ):
            counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
        else:
            # NumPy computes each bucket index arithmetically, which fails at both extremes: a
            # span near float64's limit (-1e308..1e308) overflows, and a span of a few ulps (a
            # float64 parameter that barely moved) has fewer than ``bins`` distinct edges
            # (NumPy refuses it) or, among subnormals, is counted into the wrong buckets.
            # Explicit edges are compared, not computed. They are spaced in values scaled down
            # by a power of two (exact, undone after) and kept distinct and inside [lo, hi].
            scale = 1.0
            while not math.isfinite((hi * scale - lo * scale) * bins * 4):
                scale *= 2.0**-16
            edges = np.linspace(lo * scale, hi * scale, bins + 1) / scale
            edges[0], edges[-1] = lo, hi
            edges = np.unique(np.clip(edges, lo, hi))
            counts, edges = np.histogram(values, bins=edges)
        limits = edges[1:]
    with np.errstate(over="ignore"):  # sums of huge values are inf, as TensorBoard shows them
        total, squares = float(values.sum()), float(np.dot(values, values))
    return {
        "min": lo,
        "max": hi,
        "num": int(values.size),
        "sum": total,
        "sum_squares": squares,
        "bucket_limits": limits.tolist(),
        "bucket_counts": counts.tolist(),
    }


def _hparam_value(name: str, value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:  # the HParams proto holds numbers as float64: keep it as text
            return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.Tensor, np.generic, np.ndarray)):
        if _numel(value) == 1 and value.dtype in (torch.bool, np.dtype(bool)):
            return bool(value.item())  # a flag stays a flag, not the number 1.0
        if _numel(value) == 1 and not _is_complex(value):
            return to_float(value, name)
        return str(value.tolist())  # betas=torch.tensor([0.9, 0.999]) is shown as text
    return str(value)  # tuples such as betas=(0.9, 0.999) are shown as text


def _numel(value: torch.Tensor | np.generic | np.ndarray) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else int(np.size(value))


def _is_complex(value: torch.Tensor | np.generic | np.ndarray) -> bool:
    return value.is_complex() if isinstance(value, torch.Tensor) else value.dtype.kind == "c"


def _mark_bools(
    summary: Any, hparams: Mapping[str, Any], domains: Mapping[str, Sequence[Any]] | None
) -> None:
    """Rewrites the bool hyperparameters of one HParams summary as bools, in place.

    ``torch.utils.tensorboard.summary.hparams`` tests ``isinstance(v, (int, float))`` before
    ``bool``, so every bool reaches the dashboard as the number 1.0 or 0.0 of type FLOAT64.
    """
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    flags = {name: value for name, value in hparams.items() if isinstance(value, bool)}
    if not flags:
        return
    metadata = summary.value[0].metadata
    data = plugin_data_pb2.HParamsPluginData.FromString(metadata.plugin_data.content)
    if data.HasField("experiment"):
        for info in data.experiment.hparam_infos:
            if info.name in flags:
                info.type = api_pb2.DATA_TYPE_BOOL
                if domains is not None and info.name in domains:
                    del info.domain_discrete.values[:]
                    for flag in domains[info.name]:
                        info.domain_discrete.values.add().bool_value = bool(flag)
    if data.HasField("session_start_info"):
        for name, flag in flags.items():
            data.session_start_info.hparams[name].bool_value = flag
    metadata.plugin_data.content = data.SerializeToString()


class TensorBoardWriter(MetricWriter):
    """Writes scalars, histograms, text and hparams to one TensorBoard run directory.

    Args:
        logdir: the run directory (created if missing). Several runs side by side are sibling
            directories, e.g. ``runs/lr1e-3`` and ``runs/lr3e-3``.
        purge_step: when resuming from a checkpoint at this step, TensorBoard discards the
            events with ``step >= purge_step`` that the interrupted run wrote.
        histogram_bins: number of equal-width buckets per histogram.
        max_queue: events buffered before a write to disk (by ``SummaryWriter``'s own event
            writer, used only if the faster one cannot be installed).
        flush_secs: the longest time events stay in memory before reaching the file.
        filename_suffix: appended to the event file's name.

    Tensor values are copied to the host when written, which waits for the device: wrap the
    writer in :class:`~functrain.logging.AsyncWriter` to keep that off the training step.

    TensorBoard stores a scalar as a float32 (``simple_value``): float64 values are rounded to
    float32, integer counters above 2**24 lose their last digits, and finite values beyond
    float32's range (Python ints beyond float64's included) read back as ``±inf``. NaN and
    infinities are kept. A step is a Python int, NumPy integer or integer tensor; a bool step is
    refused with a ``TypeError`` (see :func:`~functrain.logging.step_to_int`). Histogram edges and
    sums are stored as float64.

    Example:
        >>> import tempfile, torch
        >>> from functrain.logging import TensorBoardWriter
        >>> with tempfile.TemporaryDirectory() as d, TensorBoardWriter(d) as w:
        ...     w.write_hparams({"lr": 1e-3, "optimizer": "adamw"}, {"train/loss": None})
        ...     for step in range(3):
        ...         w.write_scalars(step, {"train/loss": torch.tensor(1.0 / (step + 1))})
        ...     w.write_histograms(2, {"params/w": torch.randn(100)})
        ...     w.write_text(2, {"notes": "**bold** text"})
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        purge_step: int | None = None,
        histogram_bins: int = 64,
        max_queue: int = 10,
        flush_secs: float = 10,
        filename_suffix: str = "",
    ) -> None:
        if not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(f"logdir must be a path (str or os.PathLike), got {logdir!r}")
        if histogram_bins < 1:
            raise ValueError(f"histogram_bins must be >= 1, got {histogram_bins}")
        if purge_step is not None:
            purge_step = step_to_int(purge_step, "purge_step")
            if purge_step < 0:
                raise ValueError(f"purge_step must be >= 0, got {purge_step}")
        summary_writer = _summary_writer_class()
        self.logdir = os.fspath(logdir)
        self.histogram_bins = int(histogram_bins)
        self._writer = summary_writer(
            log_dir=self.logdir,
            purge_step=purge_step,
            max_queue=max_queue,
            flush_secs=flush_secs,
            filename_suffix=filename_suffix,
        )
        # Continue the event file on a buffered writer with fast checksums (see _event_file).
        self.fast_event_file = _event_file.install(self._writer, flush_secs, filename_suffix)
        self._last_step = -1
        self._closed = False

    @property
    def summary_writer(self) -> Any:
        """The underlying ``torch.utils.tensorboard.SummaryWriter`` (for images, graphs, ...)."""
        self._check_open()
        return self._writer

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TensorBoardWriter({self.logdir!r}) is closed")

    def _step(self, step: Any) -> int:
        self._check_open()
        value = step_to_int(step)
        if not _INT64_MIN <= value <= _INT64_MAX:
            # The fast scalar encoder would wrap it silently; protobuf refuses it less clearly.
            raise ValueError(
                f"step {value} does not fit TensorBoard's step, a signed 64-bit integer"
            )
        self._last_step = max(self._last_step, value)
        return value

    def write_scalars(self, step: int | torch.Tensor, scalars: Mapping[str, Scalar]) -> None:
        """Writes each scalar as a TensorBoard scalar event under its name.

        TensorBoard stores each value as a float32: float64 values and integers above 2**24 are
        rounded, finite values beyond float32's range (huge Python ints included) are written
        as ``±inf``, and NaN and infinities are kept.

        Args:
            step: the global step (a Python int, NumPy integer or integer tensor; not a bool).
            scalars: name -> Python number, NumPy scalar or one-element tensor on any device.
        """
        from tensorboard.compat.proto.summary_pb2 import Summary

        _check_names(scalars, "scalars")
        global_step = self._step(step)
        # One event holding every value: far less work per step than one add_scalar per name.
        tags = list(scalars)
        values = [to_float(v, k) for k, v in scalars.items()]
        if not values:
            return
        if self.fast_event_file:
            try:
                data = _event_file.encode_scalar_event(global_step, tags, values)
            except OverflowError:  # a finite value beyond float32: let protobuf round it to inf
                pass
            else:
                self._writer.file_writer.event_writer.add_serialized(data)
                return
        summary = Summary(
            value=[Summary.Value(tag=k, simple_value=v) for k, v in zip(tags, values)]
        )
        self._writer.file_writer.add_summary(summary, global_step)

    def write_histograms(self, step: int | torch.Tensor, arrays: Mapping[str, Array]) -> None:
        """Writes one histogram per array; arrays with no finite value are skipped."""
        _check_names(arrays, "arrays")
        global_step = self._step(step)
        for name, value in arrays.items():
            summary = _histogram(to_numpy(value, name), self.histogram_bins)
            if summary is not None:
                self._writer.add_histogram_raw(name, global_step=global_step, **summary)

    def write_text(self, step: int | torch.Tensor, texts: Mapping[str, str]) -> None:
        """Writes each string to TensorBoard's text dashboard under exactly its name."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.compat.proto.tensor_pb2 import TensorProto
        from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
        from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData

        _check_names(texts, "texts")
        global_step = self._step(step)
        metadata = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(
                plugin_name="text", content=TextPluginData(version=0).SerializeToString()
            )
        )
        values = []
        for name, text in texts.items():
            if not isinstance(text, str):
                raise TypeError(f"text {name!r} must be a str, got {type(text).__name__}")
            tensor = TensorProto(
                dtype="DT_STRING",
                string_val=[text.encode("utf-8")],
                tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
            )
            values.append(Summary.Value(tag=name, metadata=metadata, tensor=tensor))
        if values:
            self._writer.file_writer.add_summary(Summary(value=values), global_step)

    def write_hparams(
        self,
        hparams: Mapping[str, HParam],
        metrics: Mapping[str, Scalar | None] | None = None,
        *,
        step: int | torch.Tensor | None = None,
        hparam_domain_discrete: Mapping[str, Sequence[Any]] | None = None,
    ) -> None:
        """Writes the HParams plugin's experiment, session-start and session-end summaries.

        They go into this writer's own run, so the HParams dashboard links the hyperparameters
        to this run's curves. A metric with a value is also written as a scalar under its name;
        a metric given as ``None`` is only declared (its curve is logged during training).

        Args:
            hparams: name -> int, float, str, bool or one-element tensor (a bool tensor is a
                bool; other values, multi-element tensors included, are shown as text, as is
                an int beyond float64's range; ``None`` is left out).
            metrics: name -> final value or ``None``.
            step: step of the metric scalars; default: the last step written (0 if none).
            hparam_domain_discrete: name -> every value that hyperparameter takes across runs.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        _check_names(hparams, "hparams")
        metrics = {} if metrics is None else metrics
        _check_names(metrics, "metrics")
        self._check_open()
        hp = {name: _hparam_value(name, value) for name, value in hparams.items()}
        domains = None
        if hparam_domain_discrete is not None:
            domains = {name: list(values) for name, values in hparam_domain_discrete.items()}
        experiment, start, end = hparams_summaries(hp, dict.fromkeys(metrics, 0.0), domains)
        _mark_bools(experiment, hp, domains)
        _mark_bools(start, hp, domains)
        file_writer = self._writer.file_writer
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)
        if any(value is not None for value in metrics.values()):
            global_step = max(self._last_step, 0) if step is None else self._step(step)
            for name, value in metrics.items():
                if value is not None:
                    self._writer.add_scalar(name, to_float(value, name), global_step)

    def flush(self) -> None:
        """Writes buffered events to disk."""
        if not self._closed:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file; closing twice is allowed."""
        if not self._closed:
            self._closed = True
            self._writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardWriter({self.logdir!r})"
