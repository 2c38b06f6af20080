"""The cost of logging every step: ``AsyncWriter(TensorBoardWriter)`` vs no logging vs sync.

A real ``ft.make_train_step`` step (an MLP on 64 features, AdamW, donation on, a few ms on the
CPU) returns its metrics as tensors (``loss``, ``grad_norm``, ... six 0-d tensors); each mode
writes that dict every step:

* ``none``: the step alone, the floor;
* ``async``: ``AsyncWriter(TensorBoardWriter)`` with the default hand-over period;
* ``async, background thread``: the same with ``host_inline=False`` (the encoding always runs
  on the writer's thread, as for a writer with slow I/O);
* ``sync``: a plain ``TensorBoardWriter`` (converts and writes in the step's thread).

Timing: blocks of ``steps`` steps per mode, the modes interleaved in a rotating order, each
block ending with ``writer.flush()`` so that buffered and background work is counted. The
overhead of a mode is the median over rounds of ``block / none block of the same round − 1``
(paired, so drifts of a shared machine cancel), in wall-clock and in process CPU time (all
threads). ``write µs`` is the CPU cost of one ``write_scalars`` call measured without the step
(flush included): the noise-free part of the overhead. Checks read the event files back: every
step of every timed block is there, and a separate run's values equal the step's tensors.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import functrain as ft
from benchmarks import Section
from functrain.logging import AsyncWriter, MetricWriter, TensorBoardWriter, read_scalars

BAR = 0.03  # issue 6: logging every step costs <= 3% of step time with the async writer
EVERY_N = 10


def _make_step(hidden: int, batch: int) -> tuple[Callable[..., Any], Callable[[], Any], Any]:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )  # fmt: skip
    model, params, _ = ft.functionalize(module)

    def loss_fn(p: Any, b: Any) -> torch.Tensor:
        return F.cross_entropy(model(p, b["x"]), b["y"])

    tx = ft.adamw(1e-3)
    step = ft.make_train_step(loss_fn, tx)
    gen = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(batch, 64, generator=gen), "y": torch.randint(0, 10, (batch,))}

    def new_state() -> Any:
        fresh = {k: v.detach().clone() for k, v in params.items()}
        return ft.TrainState.create(params=fresh, tx=tx)

    return step, new_state, data


def _writers(logdir: str) -> dict[str, MetricWriter | None]:
    return {
        "none": None,
        "async": AsyncWriter(TensorBoardWriter(f"{logdir}/async"), every_n=EVERY_N),
        "async, background thread": AsyncWriter(
            TensorBoardWriter(f"{logdir}/async_bg"), every_n=EVERY_N, host_inline=False
        ),
        "sync": TensorBoardWriter(f"{logdir}/sync"),
    }


def _readback_checks(section: Section, logdir: str, counts: dict[str, int]) -> None:
    runs = read_scalars(logdir)
    for run, mode in (("async", "async"), ("async_bg", "async, background thread")):
        curves = runs.get(run, {})
        expected = list(range(counts[mode]))
        complete = bool(curves) and all(
            [s for s in steps if s < 10**6] == expected for steps, _ in curves.values()
        )
        section.checks.append(
            (
                f"{mode}: event file holds every step of every metric",
                complete,
                f"{len(curves)} tags, {counts[mode]} steps each",
            )
        )


def _values_check(section: Section, step: Any, new_state: Callable[[], Any], data: Any) -> None:
    """A short run whose metrics are kept and compared with what the event file says."""
    with tempfile.TemporaryDirectory() as logdir:
        state, kept = new_state(), []
        with AsyncWriter(TensorBoardWriter(logdir), every_n=EVERY_N) as writer:
            for i in range(25):
                state, metrics = step(state, data)
                writer.write_scalars(i, metrics)
                kept.append(metrics)
        curves = read_scalars(logdir)["."]
    mismatches = 0
    for name, (steps, values) in curves.items():
        expected = [float(torch.tensor(float(m[name]), dtype=torch.float32)) for m in kept]
        mismatches += int(steps != list(range(25)) or values != expected)
    ok = mismatches == 0 and set(curves) == set(kept[0])
    section.checks.append(
        ("async: values read back = the step's metric tensors", ok, f"{len(curves)} tags")
    )


def _write_cost_us(writers: dict[str, MetricWriter | None], metrics: Any, n: int) -> dict[str, Any]:
    """CPU µs per ``write_scalars`` (flush included), without the step, median of 5 runs."""
    out = {}
    for mode, writer in writers.items():
        if writer is None:
            continue
        samples = []
        for _ in range(5):
            start = time.process_time()
            for i in range(n):
                writer.write_scalars(10**6 + i, metrics)
            writer.flush()
            samples.append((time.process_time() - start) / n)
        out[mode] = 1e6 * statistics.median(samples)
    return out


def _paired(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``time / base time of the same round − 1``."""
    return statistics.median(t / t0 - 1 for t, t0 in zip(times, base))


def run(quick: bool) -> Section:
    """Times logging every step of a real train step (see the module docstring)."""
    hidden, batch = 256, 64
    steps, rounds = (10, 4) if quick else (20, 60)
    section = Section(f"Logging every step (CPU, MLP 64-{hidden}-{hidden}-10, batch {batch})")
    step, new_state, data = _make_step(hidden, batch)
    with tempfile.TemporaryDirectory() as logdir:
        writers = _writers(logdir)
        modes = list(writers)
        states = {mode: new_state() for mode in modes}
        counts = dict.fromkeys(modes, 0)
        wall: dict[str, list[float]] = {mode: [] for mode in modes}
        cpu: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(rounds + 1):  # round 0 warms every mode up
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                writer, state = writers[mode], states[mode]
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    state, metrics = step(state, data)
                    if writer is not None:
                        writer.write_scalars(counts[mode], metrics)
                    counts[mode] += 1
                if writer is not None:
                    writer.flush()
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
                states[mode] = state
                if r > 0:
                    wall[mode].append(elapsed / steps)
                    cpu[mode].append(elapsed_cpu / steps)
        # Cost of the writers alone (events at steps >= 10**6, left out of the step check).
        _, metrics = step(new_state(), data)
        write_us = _write_cost_us(writers, metrics, 200 if quick else 1000)
        for writer in writers.values():
            if writer is not None:
                writer.close()
        _readback_checks(section, logdir, counts)
    _values_check(section, step, new_state, data)

    base_cpu = statistics.median(cpu["none"])
    for mode in modes:
        row: dict[str, Any] = {
            "mode": mode,
            "ms/step": 1e3 * statistics.median(wall[mode]),
            "CPU ms/step": 1e3 * statistics.median(cpu[mode]),
        }
        if mode != "none":
            row["overhead (wall)"] = f"{100 * _paired(wall[mode], wall['none']):+.1f}%"
            row["overhead (CPU)"] = f"{100 * _paired(cpu[mode], cpu['none']):+.1f}%"
            row["write µs"] = write_us[mode]
            row["write / step CPU"] = f"{100 * write_us[mode] * 1e-6 / base_cpu:.2f}%"
        section.rows.append(row)
    overhead = _paired(wall["async"], wall["none"])
    verdict = "met" if overhead <= BAR else "NOT met"
    section.notes.append(
        f"async overhead (wall, paired median of {rounds} rounds of {steps} steps) = "
        f"{100 * overhead:+.1f}% (bar ≤ {100 * BAR:.0f}%: {verdict}); the writer's own CPU cost "
        f"is {100 * write_us['async'] * 1e-6 / base_cpu:.2f}% of the step's CPU time"
    )
    section.notes.append(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; AsyncWriter every_n="
        f"{EVERY_N}; {len(metrics)} metric tensors per step; blocks end with flush()"
    )
    return section
