"""Running one test eagerly, compiled with ``fullgraph=True``, and on every available device."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import optree
import torch

__all__ = ["Variant", "variants"]

F = TypeVar("F", bound=Callable[..., Any])

#: The compile backend of compiled variants unless ``variants(backend=...)`` says otherwise.
#: Set ``FUNCTRAIN_TEST_COMPILE_BACKEND=aot_eager`` to skip Inductor's code generation on slow
#: CPU-only machines (dynamo still captures the whole graph with ``fullgraph=True``).
_BACKEND_ENV = "FUNCTRAIN_TEST_COMPILE_BACKEND"


def _device_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (
            device.index is None or device.index < torch.cuda.device_count()
        )
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return False


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run a test: eager or compiled, on one device (passed by :func:`variants`).

    Attributes:
        compiled: whether :meth:`fn` wraps functions in ``torch.compile(fullgraph=True)``.
        device: where :meth:`to` puts tensors.
        backend: the ``torch.compile`` backend of compiled variants.

    Example:
        >>> import torch
        >>> from functrain import testing
        >>> v = testing.Variant(compiled=True, device=torch.device("cpu"), backend="eager")
        >>> v.name
        'compiled-cpu'
        >>> v.fn(lambda x: x + 1)(v.to(torch.zeros(2)))
        tensor([1., 1.])
    """

    compiled: bool
    device: torch.device
    backend: str = "inductor"

    @property
    def name(self) -> str:
        """The test id, e.g. ``"eager-cpu"`` or ``"compiled-cuda"``."""
        return f"{'compiled' if self.compiled else 'eager'}-{self.device}"

    def fn(self, f: F, **compile_kwargs: Any) -> F:
        """Returns ``f`` itself (eager) or ``torch.compile(f, fullgraph=True, ...)``."""
        if not self.compiled:
            return f
        options = {"fullgraph": True, "backend": self.backend, **compile_kwargs}
        return torch.compile(f, **options)  # type: ignore[return-value]

    def to(self, tree_: Any) -> Any:
        """Moves every tensor leaf of ``tree_`` to :attr:`device` (other leaves unchanged)."""
        return optree.tree_map(
            lambda x: x.to(self.device) if isinstance(x, torch.Tensor) else x, tree_
        )


def _devices(devices: str | Sequence[str | torch.device]) -> list[torch.device]:
    if devices == "all":
        found = [torch.device("cpu")]
        if torch.cuda.is_available():
            found.append(torch.device("cuda"))
        return found
    names = [devices] if isinstance(devices, (str, torch.device)) else list(devices)
    return [torch.device(d) for d in names]


def variants(
    *,
    eager: bool = True,
    compiled: bool = True,
    devices: str | Sequence[str | torch.device] = "all",
    backend: str | None = None,
) -> Any:
    """A pytest decorator that runs a test once per variant: eager/compiled × device.

    The test takes a ``variant`` argument (a :class:`Variant`): wrap the function under test
    with ``variant.fn(f)`` and put inputs on ``variant.device`` with ``variant.to(tree)``.
    ``devices="all"`` means the CPU plus CUDA when it is available; a device named explicitly
    but absent is reported as a skipped test.

    Args:
        eager: include eager variants.
        compiled: include ``torch.compile(fullgraph=True)`` variants.
        devices: ``"all"``, one device name, or a sequence of them.
        backend: the compile backend; default ``$FUNCTRAIN_TEST_COMPILE_BACKEND`` or
            ``"inductor"``.

    Returns:
        A ``pytest.mark.parametrize("variant", ...)`` mark usable as a decorator.

    Example:
        >>> from functrain import testing
        >>> mark = testing.variants(devices="cpu", backend="eager")
        >>> [p.id for p in mark.args[1]]
        ['eager-cpu', 'compiled-cpu']

        In a test module::

            @testing.variants(devices="all")
            def test_step(variant):
                step = variant.fn(ft.make_train_step(loss_fn, tx))
                state = variant.to(state0)
                ...
    """
    import pytest  # a test-time dependency: imported only when variants are requested

    if not (eager or compiled):
        raise ValueError("variants() needs eager=True or compiled=True")
    backend = backend or os.environ.get(_BACKEND_ENV, "inductor")
    modes = [m for m, on in ((False, eager), (True, compiled)) if on]
    params = []
    for device in _devices(devices):
        skip = pytest.mark.skipif(
            not _device_available(device), reason=f"device {device} is not available"
        )
        for mode in modes:
            v = Variant(compiled=mode, device=device, backend=backend)
            params.append(pytest.param(v, id=v.name, marks=[skip]))
    return pytest.mark.parametrize("variant", params)
