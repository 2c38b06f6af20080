"""Metrics of :func:`~functrain.train_loop`: TensorBoard tags, timings, eval means, history."""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import optree
import torch

from functrain.train._loop_data import to_device
from functrain.train.loss import LossSum
from functrain.train.state import TrainState

__all__ = ["History", "metric_tags"]

COUNTS = ("num_examples", "num_tokens")


def metric_tags(metrics: Mapping[str, Any], prefix: str = "train/") -> dict[str, Any]:
    """The TensorBoard tags of a step's metrics: ``loss`` -> ``train/loss`` and so on.

    Names that already hold a ``/`` (e.g. ``noise_scale/b_simple``) are kept as they are; the
    counts ``num_examples`` and ``num_tokens`` are left out (the loop turns them into
    ``perf/*`` throughputs); ``update_norm / param_norm`` is added as ``update_param_ratio``,
    the relative size of an update (around 1e-3 is typical for Adam at a good learning rate).
    Values are not converted: tensors stay tensors.

    Args:
        metrics: a step's metrics (name -> 0-d tensor or number).
        prefix: prepended to names without a ``/``.

    Returns:
        A new dict ``{tag: value}`` with the values of ``metrics`` (not copied), plus
        ``{prefix}update_param_ratio`` when both norms are present; ``metrics`` is not modified.

    Example:
        >>> import torch, functrain as ft
        >>> m = {"loss": torch.tensor(0.5), "update_norm": torch.tensor(0.01),
        ...      "param_norm": torch.tensor(10.0), "num_examples": torch.tensor(32)}
        >>> {k: round(float(v), 4) for k, v in ft.metric_tags(m).items()}
        {'train/loss': 0.5, 'train/update_norm': 0.01, 'train/param_norm': 10.0, 'train/update_param_ratio': 0.001}
    """
    out = {name if "/" in name else prefix + name: v for name, v in metrics.items()}
    for name in COUNTS:
        out.pop(prefix + name, None)
    if "update_norm" in metrics and "param_norm" in metrics:
        out[prefix + "update_param_ratio"] = metrics["update_norm"] / metrics["param_norm"]
    return out


def check_scalars(scalars: Mapping[str, Any]) -> None:
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


class History:
    """The scalars a :func:`train_loop` logged, kept as tensors until first read.

    Example:
        >>> import torch
        >>> from functrain.train.loop import History
        >>> h = History()
        >>> h.record(1, {"train/loss": torch.tensor(0.5)})
        >>> h.record(2, {"train/loss": torch.tensor(0.25), "eval/loss": 0.4})
        >>> h.steps("train/loss"), h.values("train/loss"), h.last("eval/loss")
        ([1, 2], [0.5, 0.25], 0.4)
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, list[str], list[Any]]] = []
        self._curves: dict[str, tuple[list[int], list[float]]] = {}

    def record(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Keeps a snapshot of ``scalars`` at ``step`` (tensors are copied, not read)."""
        names = list(scalars)
        values: list[Any] = list(scalars.values())
        groups: dict[torch.device, list[int]] = {}
        for i, v in enumerate(values):
            if isinstance(v, torch.Tensor):
                groups.setdefault(v.device, []).append(i)
            else:
                values[i] = float(v)
        for device, positions in groups.items():
            dtype = torch.float32 if device.type == "mps" else torch.float64
            # One stacked copy per device: a snapshot that later in-place updates cannot touch.
            stacked = torch.stack([values[i].detach().reshape(()).to(dtype) for i in positions])
            for j, i in enumerate(positions):
                values[i] = (stacked, j)
        self._pending.append((step, names, values))

    def _resolve(self) -> dict[str, tuple[list[int], list[float]]]:
        host: dict[int, list[float]] = {}
        for step, names, values in self._pending:
            for name, v in zip(names, values):
                if isinstance(v, tuple):
                    stacked, j = v
                    if id(stacked) not in host:
                        host[id(stacked)] = stacked.cpu().tolist()
                    v = host[id(stacked)][j]
                steps, vals = self._curves.setdefault(name, ([], []))
                steps.append(step)
                vals.append(v)
        self._pending = []
        return self._curves

    def tags(self) -> list[str]:
        """Every tag recorded, sorted."""
        return sorted(self._resolve())

    def steps(self, tag: str) -> list[int]:
        """The steps at which ``tag`` was recorded."""
        return list(self._curve(tag)[0])

    def values(self, tag: str) -> list[float]:
        """The values of ``tag``, as Python floats (reading them waits for the device)."""
        return list(self._curve(tag)[1])

    def last(self, tag: str) -> float:
        """The latest value of ``tag``."""
        return self._curve(tag)[1][-1]

    def _curve(self, tag: str) -> tuple[list[int], list[float]]:
        curves = self._resolve()
        if tag not in curves:
            raise KeyError(f"no scalar {tag!r} was recorded; have {sorted(curves)}")
        return curves[tag]

    def __repr__(self) -> str:
        return f"History(tags={self.tags()})"


class Throughput:
    """Timings between log points, excluding :meth:`paused` sections (evaluation, checkpoints).

    On the CPU the clock is read at each :meth:`mark`. On CUDA each mark records a timing event;
    an interval is measured once its closing event has completed (``query()``, never a wait,
    except at the final mark), so a mark returns the latest *completed* measurement.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.latest: dict[str, Any] = {}
        self.pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self.last_time = time.perf_counter()
        self.last_event: Any = self._event() if self.cuda else None
        self._reset()

    def _reset(self) -> None:
        self.steps = self.examples = 0
        self.data_s = self.paused_s = 0.0
        self.paused_events: list[tuple[Any, Any]] = []
        self.tokens: torch.Tensor | None = None

    def _event(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def add(self, examples: int, tokens: torch.Tensor | None, data_s: float) -> None:
        """Counts one step (``tokens`` stays a tensor: summed on the device)."""
        self.steps += 1
        self.examples += examples
        self.data_s += data_s
        if tokens is not None:
            self.tokens = tokens if self.tokens is None else self.tokens + tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leaves the enclosed work out of the current interval's time."""
        start = self._event() if self.cuda else time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                self.paused_events.append((start, self._event()))
            else:
                self.paused_s += time.perf_counter() - start

    def _measure(
        self, elapsed: float, steps: int, examples: int, tokens: Any, data_s: float
    ) -> None:
        elapsed = max(elapsed, 1e-9)
        self.latest = {
            "perf/step_time_s": elapsed / steps,
            "perf/examples_per_s": examples / elapsed,
            "perf/data_time_s": data_s / steps,
        }
        if tokens is not None:
            self.latest["perf/tokens_per_s"] = tokens / elapsed

    def mark(self, final: bool = False) -> dict[str, Any]:
        """Closes the current interval; returns the latest completed measurement."""
        if self.steps:
            interval = (self.steps, self.examples, self.tokens, self.data_s)
            if not self.cuda:
                now = time.perf_counter()
                self._measure(now - self.last_time - self.paused_s, *interval)
                self.last_time = now
            else:
                end = self._event()
                self.pending.append((self.last_event, end, self.paused_events, interval))
                self.last_event = end
            self._reset()
        while self.pending and (final or self.pending[0][1].query()):
            start, end, paused, interval = self.pending.popleft()
            end.synchronize()  # already complete unless final
            elapsed = start.elapsed_time(end) - sum(a.elapsed_time(b) for a, b in paused)
            self._measure(elapsed / 1000.0, *interval)
        return dict(self.latest)


def _eval_examples(batch: Any) -> int:
    """The leading size of ``batch``: 0 for an empty batch, 1 for one with no batched tensor."""
    for leaf in optree.tree_leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1  # a batch without a batch dimension counts as one example


def evaluate(
    eval_step: Callable[[TrainState, Any], Mapping[str, Any]],
    state: TrainState,
    batches: Iterable[Any],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Example-weighted means of the eval metrics over ``batches`` (``loss``: token-weighted).

    A :class:`~functrain.LossSum` value is combined as ``Σ total / Σ count``. A batch of weight
    0 (an empty batch, whose mean is NaN) adds nothing, decided on the device (no host read).
    """
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            metrics = eval_step(state, batch)
            examples = metrics.get("num_examples")
            if examples is None:
                examples = _eval_examples(batch)
            tokens = metrics.get("num_tokens")
            for name, value in metrics.items():
                if name in COUNTS:
                    continue
                if isinstance(value, LossSum):
                    value, weight = _as(value.total, device, dtype), _as(value.count, device, dtype)
                    total = value
                else:
                    weight = tokens if name == "loss" and tokens is not None else examples
                    weight = _as(weight, device, dtype)
                    total = _as(value, device, dtype) * weight
                # 0 * NaN is NaN: an empty batch's NaN mean must not poison the average.
                total = torch.where(weight == 0, torch.zeros_like(total), total)
                sums[name] = total + sums[name] if name in sums else total
                weights[name] = weight + weights[name] if name in weights else weight
    return {f"eval/{name}": sums[name] / weights[name] for name in sums}


def _as(value: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(value, device=device).detach().to(dtype)
