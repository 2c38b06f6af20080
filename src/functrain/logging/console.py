"""A console writer: a progress bar with loss, learning rate, throughput and ETA.

On a terminal the bar is redrawn in place (at most every ``refresh_s`` seconds)::

     37%|████████▉               | 370/1000 [00:12<00:20, 30.1 it/s, 1.93k ex/s] loss=0.1234 lr=0.001

When the stream is not a terminal (a log file, CI) the same information is printed as plain
lines, one every ``line_every_s`` seconds, plus the first and the last step. Scalars whose names
start with one of ``line_prefixes`` (``eval/`` by default) are always printed on a line of their
own, so evaluation results stay in the scroll-back.

Throughput is measured by the writer from the wall clock between calls (steps per second), which
also works when the calls arrive in bursts from an :class:`~functrain.logging.AsyncWriter`.
Scalars named ``*examples_per_s`` / ``*tokens_per_s`` are shown as ``ex/s`` / ``tok/s``.
"""

from __future__ import annotations

import collections
import math
import numbers
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np
import torch

from functrain.logging.base import HParam, MetricWriter, Scalar, step_to_int, to_float

__all__ = ["ConsoleWriter"]


def _host_number(value: Any, name: str) -> float | int:
    """``value`` as a Python int when it is an integer (a counter), else as a float."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.numel() if isinstance(value, torch.Tensor) else value.size
        kind = "f" if isinstance(value, torch.Tensor) else value.dtype.kind
        if isinstance(value, torch.Tensor) and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        ):
            kind = "i"
        if size == 1 and kind in "iu":
            return int(value.reshape(-1)[0].item())
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # Python and NumPy integers
    return to_float(value, name)  # also raises the errors for non-scalars


def _fmt_value(value: float | int) -> str:
    # Integers (step counters such as skipped_total) keep every digit; ``.4g`` would show
    # 123456 as 1.235e+05.
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _fmt_hparam(value: Any) -> str:
    """A hyperparameter as written in code: ``3e-05``, not ``tensor(3.0000e-05)``."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return str(value.reshape(-1)[0])  # a NumPy scalar prints its shortest round trip
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        item = value.reshape(-1)[0].item()
        if value.is_floating_point():
            # The shortest string that reads back as the tensor's value: a float32 3e-5 is
            # 2.9999999242136255e-05 as a Python float.
            return str(_NUMPY_FLOAT.get(value.dtype, np.float64)(item))
        return str(item)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return str(value.tolist())
    return str(value)


# bfloat16 has no NumPy type; its values are float32 values.
_NUMPY_FLOAT = {torch.float16: np.float16, torch.bfloat16: np.float32, torch.float32: np.float32}


def _fmt_rate(value: float) -> str:
    if not math.isfinite(value):
        return str(value)  # "inf", not "infG"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ConsoleWriter(MetricWriter):
    """Shows training progress on a terminal (a bar) or in a log (plain lines).

    Args:
        total_steps: the step at which training ends; enables the bar, percentage and ETA.
        stream: where to write (default ``sys.stderr``).
        keys: scalar names to show (default: all except ``perf/*``). A leading ``train/`` is
            dropped from the displayed names.
        tty: force the bar (``True``) or plain lines (``False``); default: ``stream.isatty()``.
        refresh_s: the shortest time between two redraws of the bar.
        line_every_s: the shortest time between two plain lines (0 prints every call).
        line_prefixes: scalars with these prefixes are printed on their own line.
        bar_width: characters in the bar.

    Values are converted to Python numbers here (a device sync for accelerator tensors): wrap
    the writer in an :class:`~functrain.logging.AsyncWriter` to keep that off the step.

    Example:
        >>> import io, torch
        >>> from functrain.logging import ConsoleWriter
        >>> out = io.StringIO()
        >>> with ConsoleWriter(total_steps=2, stream=out, tty=False, line_every_s=0) as w:
        ...     w.write_scalars(1, {"train/loss": torch.tensor(0.5), "train/lr": 1e-3})
        ...     w.write_scalars(2, {"train/loss": torch.tensor(0.25), "train/lr": 1e-3})
        ...     w.write_scalars(2, {"eval/accuracy": 0.96})
        >>> lines = out.getvalue().splitlines()
        >>> print(lines[1].split(" | ")[0], "...", lines[1].split(" | ")[-1])
        step 2/2 (100%) ... loss=0.25 lr=0.001
        >>> print(lines[2])
        step 2 | eval/accuracy=0.96
    """

    def __init__(
        self,
        total_steps: int | None = None,
        *,
        stream: TextIO | None = None,
        keys: Sequence[str] | None = None,
        tty: bool | None = None,
        refresh_s: float = 0.1,
        line_every_s: float = 10.0,
        line_prefixes: Sequence[str] = ("eval/",),
        bar_width: int = 24,
    ) -> None:
        if total_steps is not None and int(total_steps) < 0:
            raise ValueError(f"total_steps must be a non-negative int or None, got {total_steps!r}")
        self.total_steps = None if total_steps is None else int(total_steps)
        self.stream = sys.stderr if stream is None else stream
        self.keys = None if keys is None else list(keys)
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.refresh_s = refresh_s
        self.line_every_s = line_every_s
        self.line_prefixes = tuple(line_prefixes)
        self.bar_width = bar_width
        self._clock = time.monotonic
        self._start: float | None = None
        self._points: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)
        self._latest: dict[str, float | int] = {}
        self._step = 0
        self._last_output = -math.inf
        self._bar_shown = False
        self._printed_step: int | None = None
        self._closed = False

    # -- measurements --------------------------------------------------------------------------
    def _record(self, step: int) -> None:
        now = self._clock()
        if self._start is None:
            self._start = now
        # Sparse points (>= 0.25 s apart) make the rate robust to bursts of calls.
        if not self._points or now - self._points[-1][0] >= 0.25:
            self._points.append((now, step))
        self._step = step

    def _rate(self) -> float | None:
        if not self._points:
            return None
        t0, s0 = self._points[0]
        dt = self._clock() - t0
        if dt <= 0 or self._step <= s0:
            return None
        return (self._step - s0) / dt

    # -- rendering -----------------------------------------------------------------------------
    def _status(self, bar: bool) -> str:
        now = self._clock()
        elapsed = 0.0 if self._start is None else now - self._start
        rate = self._rate()
        parts = [] if rate is None else [f"{_fmt_rate(rate)} it/s"]
        for name, value in self._latest.items():
            if name.endswith("examples_per_s"):
                parts.append(f"{_fmt_rate(value)} ex/s")
            elif name.endswith("tokens_per_s"):
                parts.append(f"{_fmt_rate(value)} tok/s")
        shown = " ".join(
            f"{name.removeprefix('train/')}={_fmt_value(value)}"
            for name, value in self._latest.items()
            if self._shown(name)
        )
        total = self.total_steps
        if total:
            remaining = max(total - self._step, 0)
            eta = 0.0 if remaining == 0 else (remaining / rate if rate else math.inf)
            times = f"{_fmt_time(elapsed)}<{_fmt_time(eta)}"
            frac = min(max(self._step / total, 0.0), 1.0)
            if bar:
                filled = frac * self.bar_width
                full = int(filled)
                partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < self.bar_width else ""
                bar_text = ("█" * full + partial).ljust(self.bar_width)
                head = (
                    f"{frac:4.0%}|{bar_text}| {self._step}/{total} [{', '.join([times, *parts])}]"
                )
            else:
                head = " | ".join([f"step {self._step}/{total} ({frac:.0%})", times, *parts])
        else:
            times = _fmt_time(elapsed)
            if bar:
                head = f"step {self._step} [{', '.join([times, *parts])}]"
            else:
                head = " | ".join([f"step {self._step}", times, *parts])
        sep = " " if bar else " | "
        return head + (sep + shown if shown else "")

    def _shown(self, name: str) -> bool:
        if self.keys is not None:
            return name in self.keys
        return not name.startswith("perf/")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _render(self, force: bool = False) -> None:
        now = self._clock()
        final = self.total_steps is not None and self._step >= self.total_steps
        if self.tty:
            if force or final or now - self._last_output >= self.refresh_s:
                width = max(shutil.get_terminal_size((100, 20)).columns - 1, 20)
                self._write("\r" + self._status(bar=True)[:width] + "\x1b[K")
                self._bar_shown = True
                self._last_output = now
        elif force or final or now - self._last_output >= self.line_every_s:
            if self._printed_step != self._step:  # each step's line is printed once
                self._write(self._status(bar=False) + "\n")
                self._printed_step = self._step
            self._last_output = now

    def _print_line(self, text: str) -> None:
        if self.tty and self._bar_shown:
            self._write("\r\x1b[K" + text + "\n")
            self._render(force=True)
        else:
            self._write(text + "\n")

    # -- writer protocol -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ConsoleWriter is closed")

    def write_scalars(self, step: int | torch.Tensor, scalars: Mapping[str, Scalar]) -> None:
        """Updates the bar (or prints a line); ``line_prefixes`` scalars get their own line."""
        self._check_open()
        host_step = step_to_int(step)
        values = {name: _host_number(value, name) for name, value in scalars.items()}
        own_line = {k: v for k, v in values.items() if k.startswith(self.line_prefixes)}
        progress = {k: v for k, v in values.items() if k not in own_line}
        if own_line:
            text = " ".join(f"{k}={_fmt_value(v)}" for k, v in own_line.items())
            self._print_line(f"step {host_step} | {text}")
        if progress:
            first = self._start is None
            self._record(host_step)
            self._latest.update(progress)
            self._render(force=first)

    def write_text(self, step: int | torch.Tensor, texts: Mapping[str, str]) -> None:
        """Prints each text on its own line."""
        self._check_open()
        host_step = step_to_int(step)
        for name, text in texts.items():
            self._print_line(f"step {host_step} | {name}: {text}")

    def write_hparams(
        self,
        hparams: Mapping[str, HParam],
        metrics: Mapping[str, Scalar | None] | None = None,
        *,
        step: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Prints the hyperparameters (and any final metric values) on one line."""
        del step, kwargs
        self._check_open()
        text = ", ".join(f"{k}={_fmt_hparam(v)}" for k, v in hparams.items())
        finals = {k: _host_number(v, k) for k, v in (metrics or {}).items() if v is not None}
        if finals:
            text += " | " + " ".join(f"{k}={_fmt_value(v)}" for k, v in finals.items())
        self._print_line(f"hparams: {text}")

    def flush(self) -> None:
        """Redraws the bar with the latest values and flushes the stream."""
        if self._closed:
            return
        if self._start is not None and self.tty:
            self._render(force=True)
        self.stream.flush()

    def close(self) -> None:
        """Draws the final state (ending the bar's line); the stream itself is left open."""
        if self._closed:
            return
        if self._start is not None:
            self._render(force=True)
        if self._bar_shown:
            self._write("\n")
        self._closed = True
