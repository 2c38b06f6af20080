"""Benchmark sections for ``tools/bench.py``.

Each section module defines ``run(quick: bool) -> Section``. Rows are dicts printed as one markdown
table per section; checks are correctness conditions (``--check`` fails the run when one is false).
Timings compare functrain with its peer in the same process, interleaved, as medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One table of results plus correctness checks."""

    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by ``torch.cuda.synchronize()`` on a CUDA device, so timers see its work."""
    if not device.startswith("cuda"):
        return fn
    import torch

    def run() -> Any:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, repeats: int, inner: int = 1, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each function, timing them round-robin so drift hits all alike.

    Each ``fn`` must block until its work is done (call ``torch.cuda.synchronize`` inside on GPU).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}
