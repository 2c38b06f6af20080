"""The metric-writer protocol and the host conversions every writer shares.

A train step returns its metrics as tensors (principle 3: no host syncs inside a step). Writers
are where those tensors become numbers: a writer receives mappings of names to values and turns
them into TensorBoard events, console lines, or anything else. Every method takes values that may
be Python numbers, NumPy values or tensors on any device; the writer converts them to the host.

Methods of :class:`MetricWriter`:

- ``write_scalars(step, scalars)`` — one number per name (0-d or one-element tensors);
- ``write_histograms(step, arrays)`` — a distribution per name (any shape);
- ``write_text(step, texts)`` — a string per name;
- ``write_hparams(hparams, metrics=None, *, step=None)`` — a run's hyperparameters and the metrics
  they should be compared on;
- ``flush()``, ``close()``, and ``with writer: ...`` (closes on exit).

``step`` may be a Python int, a NumPy integer or an integer tensor (such as ``TrainState.step``);
every writer refuses a bool step with a ``TypeError`` (:func:`step_to_int` is the shared rule).
How precisely a scalar is kept is up to the writer: TensorBoard stores float32, so a float64
value is rounded and a value beyond float32's range reads back as ``±inf``.

Example:
    >>> import torch
    >>> from functrain.logging import MetricWriter, step_to_int, to_float
    >>> class PrintWriter(MetricWriter):
    ...     def write_scalars(self, step, scalars):
    ...         print(step_to_int(step), {k: round(to_float(v), 3) for k, v in scalars.items()})
    >>> with PrintWriter() as w:
    ...     w.write_scalars(torch.tensor(3), {"loss": torch.tensor(0.25), "lr": 1e-3})
    3 {'loss': 0.25, 'lr': 0.001}
"""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import numpy as np
import torch

__all__ = [
    "MetricWriter",
    "NullWriter",
    "step_to_int",
    "to_float",
    "to_numpy",
]

Scalar = int | float | np.generic | torch.Tensor
Array = torch.Tensor | np.ndarray | list[float]
HParam = int | float | str | bool | torch.Tensor | None


class MetricWriter(abc.ABC):
    """Base class of metric writers; only :meth:`write_scalars` is required.

    The other write methods default to doing nothing, so a writer that only understands scalars
    (a CSV file, a console line) can still sit in a :class:`~functrain.logging.MultiWriter` beside
    a TensorBoard writer. Writers are context managers: leaving the ``with`` block closes them.

    Example:
        >>> from functrain.logging import NullWriter
        >>> with NullWriter() as w:
        ...     w.write_scalars(0, {"loss": 1.0})
    """

    @abc.abstractmethod
    def write_scalars(self, step: int | torch.Tensor, scalars: Mapping[str, Scalar]) -> None:
        """Writes one number per name at ``step``.

        Args:
            step: the global step (a Python int, NumPy integer or integer tensor; not a bool).
            scalars: name -> Python number, NumPy scalar or one-element tensor on any device.
                The writer decides the stored precision (float32 in TensorBoard).
        """

    def write_histograms(self, step: int | torch.Tensor, arrays: Mapping[str, Array]) -> None:
        """Writes the distribution of the values of each array at ``step`` (ignored by default).

        Args:
            step: the global step.
            arrays: name -> tensor (any shape, any device) or NumPy array.
        """
        del step, arrays

    def write_text(self, step: int | torch.Tensor, texts: Mapping[str, str]) -> None:
        """Writes one string per name at ``step`` (ignored by default).

        Args:
            step: the global step.
            texts: name -> text (Markdown in TensorBoard).
        """
        del step, texts

    def write_hparams(
        self,
        hparams: Mapping[str, HParam],
        metrics: Mapping[str, Scalar | None] | None = None,
        *,
        step: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        """Records the run's hyperparameters and the metrics to compare runs on (ignored by default).

        Args:
            hparams: name -> int, float, str, bool or 0-d tensor.
            metrics: name -> final value, or ``None`` to only declare a metric whose values are
                logged as scalars under that name during the run.
            step: the step at which given metric values are written (default: writer-specific).
            **kwargs: writer-specific options (e.g. ``TensorBoardWriter``'s
                ``hparam_domain_discrete``), ignored by writers that have none.
        """
        del hparams, metrics, step, kwargs

    def flush(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Pushes buffered data to its destination."""

    def close(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Flushes and releases resources; further writes are errors for most writers."""

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NullWriter(MetricWriter):
    """A writer that discards everything (what non-zero ranks get from ``rank_zero_only``).

    Example:
        >>> from functrain.logging import NullWriter
        >>> NullWriter().write_scalars(0, {"loss": 1.0})
    """

    def write_scalars(self, step: int | torch.Tensor, scalars: Mapping[str, Scalar]) -> None:
        del step, scalars


def step_to_int(step: Any, name: str = "step") -> int:
    """Converts a step (Python int, NumPy integer or one-element integer tensor) to ``int``.

    This is the one rule every writer applies to its ``step`` argument. Booleans are refused
    (``True``, ``np.True_`` and bool tensors alike): a flag passed as the step is a bug, and
    reading it as step 1 would hide it.

    A tensor on an accelerator is copied to the host, which waits for it: call this in a
    writer, not in a train step.

    Args:
        step: the step.
        name: the argument's name, used in the error message.

    Returns:
        The step as a Python int.

    Raises:
        TypeError: ``step`` is a bool, a float, complex, or not one element.

    Example:
        >>> import torch
        >>> from functrain.logging import step_to_int
        >>> step_to_int(torch.tensor(7, dtype=torch.int32))
        7
    """
    _check_step(step, name)
    if type(step) is int:
        return step
    if isinstance(step, torch.Tensor):
        return int(step.detach().reshape(()).cpu().item())
    return int(step)


def _check_step(step: Any, name: str = "step") -> None:
    """Raises ``TypeError`` unless ``step`` is a valid step (see :func:`step_to_int`).

    Reads only the step's type, dtype and shape, so it never waits for a device: the checks an
    asynchronous writer makes at the call, before the value reaches the host.
    """
    if type(step) is int:
        return
    if isinstance(step, torch.Tensor):
        if (
            step.numel() != 1
            or step.is_floating_point()
            or step.is_complex()
            or step.dtype == torch.bool
        ):
            raise TypeError(
                f"{name} must be an integer scalar, got a {step.dtype} tensor of shape "
                f"{tuple(step.shape)}"
            )
    elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
        # np.bool_ is no numbers.Integral, so it is refused here too.
        raise TypeError(f"{name} must be an int or an integer tensor, got {step!r}")


def to_float(value: Any, name: str = "value") -> float:
    """Converts a scalar (number, NumPy scalar or one-element tensor) to a Python float.

    A number beyond float64's range (a huge Python int or ``Fraction``) becomes ``±inf``, as a
    float64 beyond float32's range does in TensorBoard's float32 scalars: logging a runaway
    counter shows it as infinite rather than stopping the training loop.

    Args:
        value: the scalar.
        name: used in the error message when ``value`` is not a scalar.

    Returns:
        ``value`` as a Python ``float`` (booleans as ``0.0``/``1.0``). A tensor is read with
        ``.item()``, which waits for a GPU tensor's device.

    Raises:
        ValueError: a tensor or array with other than one element.
        TypeError: a complex value, or anything that is not a number, NumPy scalar or array,
            or tensor.

    Example:
        >>> import torch
        >>> from functrain.logging import to_float
        >>> to_float(torch.tensor([0.5], dtype=torch.bfloat16))
        0.5
    """
    if type(value) is float:  # the common case after an AsyncWriter: skip the ABC checks
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"scalar {name!r} must have exactly one element, got a tensor of shape "
                f"{tuple(value.shape)}; log arrays with write_histograms"
            )
        if value.is_complex():
            raise TypeError(f"scalar {name!r} is complex ({value.dtype})")
        return float(value.item())
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"scalar {name!r} must have one element, got shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, (numbers.Real, np.bool_)):  # np.bool_ is no numbers.Real, unlike bool
        try:
            return float(value)
        except OverflowError:  # exact numbers (int, Fraction) beyond float64: keep the sign
            return math.inf if value > 0 else -math.inf
    if isinstance(value, numbers.Complex):  # as for complex tensors: no silent real part
        raise TypeError(f"scalar {name!r} is complex ({type(value).__name__})")
    raise TypeError(f"scalar {name!r} must be a number or a one-element tensor, got {value!r}")


def to_numpy(value: Any, name: str = "value") -> np.ndarray:
    """Converts an array (tensor on any device, NumPy array, sequence) to a flat NumPy array.

    Low-precision float tensors (bfloat16, float16) become float32, since NumPy lacks bfloat16;
    booleans, integers and NumPy arrays' dtypes are kept.

    Args:
        value: a tensor (any shape and device; detached, never modified), a NumPy array, a
            number or a (nested) sequence of numbers.
        name: used in the error message when ``value`` is not a numeric array.

    Returns:
        A 1-d NumPy array of all the elements in row-major order (a 0-d input gives shape
        ``(1,)``). It may share memory with a CPU tensor or NumPy array passed in, so copy it
        before writing into it. A GPU tensor is copied to the host (a device synchronization).

    Raises:
        TypeError: complex values, non-numeric dtypes (strings, objects), or an input NumPy
            cannot convert.

    Example:
        >>> import torch
        >>> from functrain.logging import to_numpy
        >>> to_numpy(torch.ones(2, 2, dtype=torch.bfloat16)).dtype
        dtype('float32')
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_complex():
            raise TypeError(f"array {name!r} is complex ({value.dtype})")
        if value.is_floating_point() and value.dtype not in (torch.float32, torch.float64):
            value = value.float()
        return value.cpu().reshape(-1).numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"array {name!r} cannot be converted to an array: {err}") from err
    if array.dtype.kind not in "biuf":
        raise TypeError(f"array {name!r} must be numeric, got dtype {array.dtype}")
    return array.reshape(-1)
