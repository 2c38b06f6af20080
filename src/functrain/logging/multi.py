"""Fan one stream of metrics out to several writers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from functrain.logging.base import Array, HParam, MetricWriter, Scalar

__all__ = ["MultiWriter"]


class MultiWriter(MetricWriter):
    """Calls every wrapped writer in turn, e.g. TensorBoard and a console progress bar.

    Values are passed on as given (no host conversion here), so wrap the ``MultiWriter`` in an
    :class:`~functrain.logging.AsyncWriter` to convert tensors once, off the training step:
    ``AsyncWriter(MultiWriter([TensorBoardWriter(d), ConsoleWriter(total_steps=n)]))``.

    Every writer is called even when an earlier one raises; the first error is then re-raised.
    ``close`` closes them all.

    Args:
        writers: the writers, called in this order.

    Example:
        >>> from functrain.logging import MetricWriter, MultiWriter
        >>> class Echo(MetricWriter):
        ...     def __init__(self, name):
        ...         self.name = name
        ...     def write_scalars(self, step, scalars):
        ...         print(self.name, step, dict(scalars))
        >>> with MultiWriter([Echo("a"), Echo("b")]) as w:
        ...     w.write_scalars(1, {"loss": 0.5})
        a 1 {'loss': 0.5}
        b 1 {'loss': 0.5}
    """

    def __init__(self, writers: Iterable[MetricWriter]) -> None:
        self.writers = list(writers)
        for writer in self.writers:
            if not callable(getattr(writer, "write_scalars", None)):
                raise TypeError(f"{writer!r} is not a metric writer (no write_scalars method)")

    def _each(self, call: Callable[[MetricWriter], Any]) -> None:
        first: BaseException | None = None
        for writer in self.writers:
            try:
                call(writer)
            except Exception as err:
                first = first or err
        if first is not None:
            raise first

    def write_scalars(self, step: int | torch.Tensor, scalars: Mapping[str, Scalar]) -> None:
        """Passes the scalars to every writer."""
        self._each(lambda w: w.write_scalars(step, scalars))

    def write_histograms(self, step: int | torch.Tensor, arrays: Mapping[str, Array]) -> None:
        """Passes the arrays to every writer."""
        self._each(lambda w: w.write_histograms(step, arrays))

    def write_text(self, step: int | torch.Tensor, texts: Mapping[str, str]) -> None:
        """Passes the texts to every writer."""
        self._each(lambda w: w.write_text(step, texts))

    def write_hparams(
        self,
        hparams: Mapping[str, HParam],
        metrics: Mapping[str, Scalar | None] | None = None,
        *,
        step: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Passes the hparams, and writer-specific keywords if any, to every writer.

        Keywords such as ``TensorBoardWriter``'s ``hparam_domain_discrete`` come through an
        ``AsyncWriter`` wrapping this one; writers that do not take them ignore them by default.
        """
        self._each(lambda w: w.write_hparams(hparams, metrics, step=step, **kwargs))

    def flush(self) -> None:
        """Flushes every writer."""
        self._each(lambda w: w.flush())

    def close(self) -> None:
        """Closes every writer, even if some fail."""
        self._each(lambda w: w.close())

    def __repr__(self) -> str:
        return f"MultiWriter({self.writers!r})"
