"""Snapshots for :class:`~functrain.logging.AsyncWriter`: host copies taken without waiting.

A :class:`_Snapshot` collects the host copies of one write call: ``item()`` (scalars) or a fresh
copy (arrays) on the CPU, one stacked tensor per (device, dtype) for accelerator scalars, and on
CUDA ``non_blocking`` copies into pinned memory guarded by a CUDA event (:meth:`_Snapshot.seal`,
:meth:`_Snapshot.wait`). The copies are taken in stream order at the call, so later reuse of the
tensors' memory (donated buffers, CUDA graphs) does not change what is written.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _host_copy(tensor: torch.Tensor, fresh: bool = False) -> Callable[[], torch.Tensor]:
    """Starts a snapshot of ``tensor`` now; the returned function gives it on the host later.

    ``fresh`` says that nobody else holds ``tensor`` (it was just made), so on the CPU it needs
    no private copy.
    """
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type == "cuda":
        # Lands in pinned memory without blocking; the record's CUDA event says when it is there.
        host = tensor.to("cpu", non_blocking=True)
        return lambda: host
    copy = tensor if fresh else tensor.clone()  # in stream order on other accelerators
    return copy.cpu if copy.device.type != "cpu" else (lambda: copy)


class _Snapshot:
    """The host copies taken by one write call and the CUDA events that guard them."""

    def __init__(self) -> None:
        self._cuda_devices: set[torch.device] = set()
        self._events: list[Any] = []
        self.on_host = True  # no accelerator tensor: readable now, without waiting

    def array(self, name: str, value: Any) -> Callable[[], Any]:
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                raise TypeError(f"array {name!r} is complex ({value.dtype})")
            return self.tensor(value)
        copy = np.array(value, copy=True)  # the caller may reuse its NumPy buffer
        return lambda: copy

    def tensor(self, value: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Snapshots a tensor of any shape and dtype (see :func:`_host_copy`)."""
        if value.device.type == "cuda":
            self._cuda_devices.add(value.device)
        if value.device.type != "cpu":
            self.on_host = False
        return _host_copy(value)

    def scalars(
        self, names: list[str], values: list[Any], *, allow_none: bool = False
    ) -> Callable[[], list[Any]]:
        """Snapshots scalars: ``item()`` on the CPU, else one stack and copy per (device, dtype)."""
        host_values: list[Any] = list(values)
        # This runs on every step: keep it to attribute reads and one stack per group.
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[torch.Tensor]]] = {}
        for i, value in enumerate(values):
            kind = type(value)
            if kind is float or kind is int:
                continue
            if isinstance(value, torch.Tensor):
                if value.dim() != 0:
                    if value.numel() != 1:
                        raise ValueError(
                            f"scalar {names[i]!r} must have exactly one element, got a tensor of "
                            f"shape {tuple(value.shape)}; log arrays with write_histograms"
                        )
                    value = value.reshape(())
                if value.device.type == "cpu":
                    host_values[i] = value.item()  # nothing to wait for: the cheapest snapshot
                    continue
                if value.requires_grad:
                    value = value.detach()
                key = (value.device, value.dtype)
                if key not in groups:
                    groups[key] = ([], [])
                positions, tensors = groups[key]
                positions.append(i)
                tensors.append(value)
            elif isinstance(value, np.ndarray):
                host_values[i] = value.copy()
            elif not (
                isinstance(value, (numbers.Real, np.generic)) or (value is None and allow_none)
            ):
                raise TypeError(
                    f"scalar {names[i]!r} must be a number or a one-element tensor, got {value!r}"
                )
        copies = []
        for (device, _), (positions, tensors) in groups.items():
            if device.type == "cuda":
                self._cuda_devices.add(device)
            if device.type != "cpu":
                self.on_host = False
            copies.append((positions, _host_copy(torch.stack(tensors), fresh=True)))

        def resolve() -> list[Any]:
            for positions, get in copies:
                for i, number in zip(positions, get().tolist()):
                    host_values[i] = number
            return host_values

        return resolve

    def seal(self) -> None:
        for device in self._cuda_devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._events.append(event)

    def wait(self) -> None:
        for event in self._events:
            event.synchronize()


class _Deferred:
    """A value known only once its snapshot has landed on the host."""

    __slots__ = ("get",)

    def __init__(self, get: Callable[[], Any]) -> None:
        self.get = get
