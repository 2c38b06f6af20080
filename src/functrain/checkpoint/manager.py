"""``CheckpointManager``: numbered checkpoints in a directory, keep-last-N and keep-best.

Each checkpoint is one atomic file ``<prefix>_<step:08d>.safetensors`` whose metadata records the
step and the metrics passed to :meth:`CheckpointManager.save`. On construction the manager
scans the directory, removes temporary files left by interrupted saves (they never carry a
final name, so they were never valid; files of a process that still runs are saves in flight
and are left alone), and skips files that fail validation, logging each one
on the ``functrain.checkpoint`` logger and listing it in :attr:`CheckpointManager.skipped`.
One process writes to a directory at a time (its threads may share one manager: saves are
serialised); any number may read. Steps may be ints, NumPy integers or integer 0-d tensors
such as ``state.step``, in :meth:`CheckpointManager.save` and in every look-up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import operator
import os
import re
import threading
from typing import Any

import torch

from functrain.checkpoint import _file, io
from functrain.checkpoint.errors import InvalidCheckpointError

__all__ = ["CheckpointManager"]

logger = logging.getLogger("functrain.checkpoint")


def _metric_to_json(name: str, value: Any) -> float | int | str:
    if not isinstance(name, str):
        # JSON stores keys as strings: a rescan would index {0: v} as {"0": v}.
        raise TypeError(f"metric names must be strings, got {name!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    # numbers.Real also admits NumPy scalars (np.float32 is not a float subclass).
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"metric {name!r} must be a number or a 1-element tensor, got {value!r}")
    if isinstance(value, numbers.Integral):
        # Any int is finite and exact in JSON; math.isfinite would overflow past 1e308.
        return operator.index(value)
    value = float(value)
    # JSON has no NaN/inf; keep them as strings so a diverged run's metrics are still recorded.
    return value if math.isfinite(value) else repr(float(value))


def _as_step(step: Any) -> int:
    """``step`` as a plain non-negative int: ints, NumPy integers and integer 1-element tensors.

    Shared by :meth:`CheckpointManager.save` and the look-ups, so ``mgr.restore(state.step)``
    finds what ``mgr.save(state.step, ...)`` wrote (a tensor never equals a dict's int key).
    """
    if isinstance(step, torch.Tensor):
        # bool converts to 0/1 and complex does not convert at all: neither is a step number.
        if step.numel() != 1 or step.is_floating_point() or step.is_complex():
            raise TypeError(f"step must be an int, got a tensor {step!r}")
        if step.dtype == torch.bool:
            raise TypeError(f"step must be an int, got a bool tensor {step!r}")
        step = int(step.item())
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        step = operator.index(step)  # NumPy integers: a plain int for the file name and JSON
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return step


def _writer_alive(temp_name: str) -> bool:
    """Whether the process that named temporary file ``temp_name`` still runs on this host.

    Its name is ``.<file>.<pid>.<hex>.tmp`` (see ``_file.temp_name``). A live writer's file is
    a save in flight, which a reading process must not delete from under it.
    """
    parts = temp_name.split(".")
    if os.name != "posix" or len(parts) < 4 or not parts[-3].isdigit():
        return False  # os.kill(pid, 0) is not a probe on Windows
    try:
        os.kill(int(parts[-3]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except (OSError, OverflowError):
        return False
    return True


def _metric_from_json(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # An int beyond float range ranks as infinite (never best) instead of raising
        # OverflowError, which made the directory scan crash.
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class CheckpointManager:
    """Saves numbered checkpoints, keeps the last ``max_to_keep`` and the best, finds the latest.

    Args:
        directory: where checkpoints live (created if needed).
        max_to_keep: how many of the most recent checkpoints to keep (``None``: all).
        best_metric: name of a metric passed to :meth:`save` to rank checkpoints by.
        mode: ``"min"`` or ``"max"``: whether lower or higher ``best_metric`` is better.
        keep_best: how many best checkpoints to keep in addition to the recent ones (default
            1 when ``best_metric`` is set, else 0). Checkpoints without a finite value of the
            metric never count as best.
        prefix: file name prefix.

    Example:
        >>> import tempfile, torch
        >>> from functrain import checkpoint
        >>> mgr = checkpoint.CheckpointManager(tempfile.mkdtemp(), max_to_keep=2,
        ...                                    best_metric="loss")
        >>> for step, loss in [(1, 0.5), (2, 0.9), (3, 0.8), (4, 0.7)]:
        ...     _ = mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": loss})
        >>> mgr.all_steps(), mgr.best_step(), mgr.latest_step()
        ([1, 3, 4], 1, 4)
        >>> mgr.restore_latest(target={"w": torch.zeros(2)})
        {'w': tensor([4., 4.])}
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int | None = 5,
        best_metric: str | None = None,
        mode: str = "min",
        keep_best: int | None = None,
        *,
        prefix: str = "checkpoint",
    ) -> None:
        if max_to_keep is not None and (type(max_to_keep) is not int or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best is None:
            keep_best = 1 if best_metric is not None else 0
        if type(keep_best) is not int or keep_best < 0:
            raise ValueError(f"keep_best must be a non-negative int, got {keep_best!r}")
        if keep_best and best_metric is None:
            raise ValueError("keep_best needs best_metric: the metric to rank checkpoints by")
        if not prefix or os.sep in prefix or prefix.startswith("."):
            raise ValueError(f"prefix must be a plain file name prefix, got {prefix!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.best_metric = best_metric
        self.mode = mode
        self.keep_best = keep_best
        self.prefix = prefix
        self.skipped: list[tuple[str, str]] = []
        """``(path, reason)`` of every checkpoint found invalid (scan or restore)."""
        self.restored_step: int | None = None
        """The step :meth:`restore_latest` last restored."""
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.safetensors$")
        self._temp_pattern = re.compile(
            rf"^\.{re.escape(prefix)}_\d+\.safetensors\..*{re.escape(_file.TEMP_SUFFIX)}$"
        )
        os.makedirs(self.directory, exist_ok=True)
        self._index: dict[int, dict[str, float | None]] = {}
        # Saves from several threads (e.g. a background saver and the loop) must not interleave
        # the keep check, the index update and the pruning.
        self._lock = threading.RLock()
        self._scan()

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({self.directory!r}, max_to_keep={self.max_to_keep}, "
            f"best_metric={self.best_metric!r}, mode={self.mode!r}, keep_best={self.keep_best}, "
            f"steps={self.all_steps()})"
        )

    def path(self, step: int | torch.Tensor) -> str:
        """The file of checkpoint ``step`` (whether or not it exists)."""
        return os.path.join(self.directory, f"{self.prefix}_{_as_step(step):08d}.safetensors")

    def _skip(self, path: str, reason: str) -> None:
        logger.warning("skipping invalid checkpoint %s: %s", path, reason)
        self.skipped.append((path, reason))

    def _scan(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            full = os.path.join(self.directory, name)
            if self._temp_pattern.match(name):
                if _writer_alive(name):
                    continue
                logger.info("removing %s left by an interrupted save", full)
                with contextlib.suppress(OSError):
                    os.unlink(full)
                continue
            match = self._pattern.match(name)
            if match is None:
                continue
            try:
                with _file.Reader(full) as reader:
                    if reader.description is None:
                        raise InvalidCheckpointError("no functrain tree description")
                    meta = reader.description.get("metadata") or {}
            except (InvalidCheckpointError, OSError) as err:
                self._skip(full, str(err))
                continue
            step = int(match.group(1))
            if name != os.path.basename(self.path(step)):
                continue  # e.g. checkpoint_5.safetensors: not the name save() gives step 5
            if not isinstance(meta, dict):
                self._skip(full, f"metadata is not a JSON object: {meta!r}")
                continue
            if meta.get("step") != step:
                self._skip(full, f"metadata step {meta.get('step')!r} does not match file name")
                continue
            metrics = meta.get("metrics")
            metrics = metrics if isinstance(metrics, dict) else {}
            self._index[step] = {
                k: _metric_from_json(v) for k, v in metrics.items() if isinstance(k, str)
            }

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk that passed validation, ascending."""
        return sorted(self._index)

    def latest_step(self) -> int | None:
        """The newest step, or ``None`` when there is no checkpoint."""
        return max(self._index, default=None)

    def metrics(self, step: int | torch.Tensor) -> dict[str, float | None]:
        """The metrics saved with ``step`` (non-numeric values read as ``None``)."""
        step = _as_step(step)
        if step not in self._index:
            raise KeyError(f"no checkpoint for step {step} in {self.directory}")
        return dict(self._index[step])

    def _ranked(self, index: dict[int, dict[str, float | None]] | None = None) -> list[int]:
        if self.best_metric is None:
            return []
        scored = []
        for step, metrics in (self._index if index is None else index).items():
            value = metrics.get(self.best_metric)
            if value is not None and math.isfinite(value):
                scored.append((value if self.mode == "min" else -value, -step, step))
        return [step for *_, step in sorted(scored)]  # ties: the newer step ranks first

    def best_step(self) -> int | None:
        """The step with the best ``best_metric``, or ``None``."""
        ranked = self._ranked()
        return ranked[0] if ranked else None

    def save(
        self,
        step: int | torch.Tensor,
        state: Any,
        metrics: dict[str, Any] | None = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Saves ``state`` as checkpoint ``step`` (replacing one with the same step), then prunes.

        Args:
            step: a non-negative int (or integer 0-d tensor).
            state: any pytree accepted by :func:`functrain.checkpoint.save`.
            metrics: numbers or 1-element tensors, used to rank by ``best_metric``.
            metadata: extra JSON-serializable information.

        Returns:
            The path written.
        """
        step = _as_step(step)
        encoded = {k: _metric_to_json(k, v) for k, v in (metrics or {}).items()}
        decoded = {k: _metric_from_json(v) for k, v in encoded.items()}
        with self._lock:
            if step not in self._kept({**self._index, step: decoded}):
                # Written, it would be pruned at once: save() would return a path to nothing.
                raise ValueError(
                    f"step {step} would be deleted as soon as it is saved: max_to_keep="
                    f"{self.max_to_keep} keeps the newest steps, and {self.directory} already "
                    f"holds steps up to {max(self._index)}. Remove the newer checkpoints first "
                    "(for example after restoring an older one), or save to another directory"
                )
            path = self.path(step)
            io.save(path, state, metadata={"step": step, "metrics": encoded, "user": metadata})
            self._index[step] = decoded
            self._prune()
        return path

    def _kept(self, index: dict[int, dict[str, float | None]]) -> set[int]:
        """The steps of ``index`` that pruning keeps: the newest, and the best ranked."""
        steps = sorted(index)
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep :])
        keep.update(self._ranked(index)[: self.keep_best])
        return keep

    def _prune(self) -> None:
        steps = self.all_steps()
        keep = self._kept(self._index)
        for step in steps:
            if step not in keep:
                del self._index[step]
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path(step))

    def restore(
        self,
        step: int | torch.Tensor,
        target: Any = None,
        *,
        device: str | torch.device | None = None,
        strict: bool = True,
    ) -> Any:
        """Restores checkpoint ``step``; see :func:`functrain.checkpoint.restore`.

        Raises:
            FileNotFoundError: no checkpoint for ``step`` (never saved, or pruned); the
                message lists the steps there are.
        """
        step = _as_step(step)
        if step not in self._index:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        return io.restore(self.path(step), target, device=device, strict=strict)

    def restore_latest(
        self,
        target: Any = None,
        *,
        device: str | torch.device | None = None,
        strict: bool = True,
    ) -> Any:
        """Restores the newest checkpoint that passes validation, skipping corrupt ones.

        A checkpoint whose file is damaged (checksum, truncation) is logged, recorded in
        :attr:`skipped` and dropped from :meth:`all_steps`; the next older one is tried. A
        :class:`~functrain.checkpoint.CheckpointMismatchError` (the target does not fit) is
        raised at once: it is a bug in the caller, not damage. The restored step is left in
        :attr:`restored_step`.

        Raises:
            FileNotFoundError: no valid checkpoint in the directory.
        """
        with self._lock:
            steps = sorted(self._index, reverse=True)
        for step in steps:
            try:
                state = io.restore(self.path(step), target, device=device, strict=strict)
            except (InvalidCheckpointError, FileNotFoundError) as err:
                with self._lock:
                    self._skip(self.path(step), str(err))
                    self._index.pop(step, None)
                continue
            self.restored_step = step
            return state
        raise FileNotFoundError(
            f"no valid checkpoint in {self.directory}"
            + (f" ({len(self.skipped)} invalid ones skipped)" if self.skipped else "")
        )
