"""Only rank 0 of a ``torch.distributed`` job writes metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from functrain.logging.base import Array, HParam, MetricWriter, Scalar

__all__ = ["RankZeroWriter", "is_rank_zero", "rank_zero_only"]


def is_rank_zero() -> bool:
    """True outside a distributed job, or on the process of global rank 0.

    Returns:
        ``True`` when ``torch.distributed`` is unavailable or not initialised, else whether
        this process's rank in the default group is 0. Read at each call (no caching).

    Example:
        >>> from functrain.logging import is_rank_zero
        >>> is_rank_zero()  # no process group here
        True
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class RankZeroWriter(MetricWriter):
    """Forwards to a writer on rank 0 and does nothing on the other ranks.

    The rank is read at each call, so a writer made before ``dist.init_process_group`` is still
    silenced afterwards. Given a factory instead of a writer, the writer is only built, on first
    use, on rank 0: other ranks never create its files or directories.

    Args:
        writer: a writer, or a function of no arguments returning one.

    Example:
        >>> import tempfile
        >>> from functrain.logging import RankZeroWriter, TensorBoardWriter
        >>> logdir = tempfile.mkdtemp()
        >>> with RankZeroWriter(lambda: TensorBoardWriter(logdir)) as writer:
        ...     writer.write_scalars(0, {"train/loss": 1.0})
    """

    def __init__(self, writer: MetricWriter | Callable[[], MetricWriter]) -> None:
        if isinstance(writer, MetricWriter) or callable(getattr(writer, "write_scalars", None)):
            self._writer: MetricWriter | None = writer  # type: ignore[assignment]
            self._factory: Callable[[], MetricWriter] | None = None
        elif callable(writer):
            self._writer, self._factory = None, writer
        else:
            raise TypeError(f"expected a metric writer or a function returning one, got {writer!r}")

    @property
    def writer(self) -> MetricWriter | None:
        """The wrapped writer on rank 0 (built from the factory if needed), else ``None``."""
        if not is_rank_zero():
            return None
        if self._writer is None and self._factory is not None:
            self._writer = self._factory()
        return self._writer

    def write_scalars(self, step: int | torch.Tensor, scalars: Mapping[str, Scalar]) -> None:
        """Writes on rank 0 only."""
        if (writer := self.writer) is not None:
            writer.write_scalars(step, scalars)

    def write_histograms(self, step: int | torch.Tensor, arrays: Mapping[str, Array]) -> None:
        """Writes on rank 0 only."""
        if (writer := self.writer) is not None:
            writer.write_histograms(step, arrays)

    def write_text(self, step: int | torch.Tensor, texts: Mapping[str, str]) -> None:
        """Writes on rank 0 only."""
        if (writer := self.writer) is not None:
            writer.write_text(step, texts)

    def write_hparams(
        self,
        hparams: Mapping[str, HParam],
        metrics: Mapping[str, Scalar | None] | None = None,
        *,
        step: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Writes on rank 0 only."""
        if (writer := self.writer) is not None:
            writer.write_hparams(hparams, metrics, step=step, **kwargs)

    def flush(self) -> None:
        """Flushes on rank 0 only."""
        if (writer := self.writer) is not None:
            writer.flush()

    def close(self) -> None:
        """Closes the wrapped writer if it exists (on any rank, so nothing is left open)."""
        if self._writer is not None:
            self._writer.close()

    def __repr__(self) -> str:
        inner = self._writer if self._writer is not None else self._factory
        return f"RankZeroWriter({inner!r})"


def rank_zero_only(writer: MetricWriter | Callable[[], MetricWriter]) -> RankZeroWriter:
    """Makes ``writer`` write only on rank 0 of a ``torch.distributed`` job.

    Pass a factory (``lambda: TensorBoardWriter(logdir)``) so that other ranks do not even
    create the run directory; pass a writer to silence an existing one.

    Args:
        writer: a writer, or a function of no arguments returning one.

    Returns:
        A :class:`RankZeroWriter` wrapping ``writer``: it forwards every write to it on rank 0
        (and when ``torch.distributed`` is not initialised) and does nothing on other ranks,
        checking the rank at each call.

    Raises:
        TypeError: ``writer`` is neither a writer nor callable.

    Example:
        >>> import tempfile
        >>> from functrain.logging import TensorBoardWriter, rank_zero_only
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with rank_zero_only(lambda: TensorBoardWriter(d)) as writer:
        ...         writer.write_scalars(0, {"loss": 1.0})  # written: not distributed here
    """
    return RankZeroWriter(writer)
