"""Micro-benchmark: the cost of logging every step, with and without :class:`AsyncWriter`.

A dummy train step (an MLP, ``torch.func.grad_and_value``, plain SGD) returns six metric
tensors, as a real step does. The same step runs in interleaved blocks with no logging, with
``AsyncWriter(TensorBoardWriter)`` logging every step, and (for reference) with a synchronous
``TensorBoardWriter`` logging every step. Block times include draining the writer (``flush``), so
background work that does not keep up is counted. Run it with
``python -m functrain.logging.bench [--device cuda]``. ``tools/bench.py --only logging`` does
the same on a real ``ft.make_train_step`` step and checks the event files it wrote.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad_and_value

from functrain.logging.async_writer import AsyncWriter
from functrain.logging.base import MetricWriter
from functrain.logging.tensorboard import TensorBoardWriter

__all__ = ["measure_logging_overhead"]


def _dummy_step(
    hidden: int, batch: int, device: torch.device
) -> tuple[Callable[[Any], tuple[Any, dict[str, torch.Tensor]]], Any]:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
        torch.nn.Tanh(), torch.nn.Linear(hidden, 10),
    ).to(device)  # fmt: skip
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(batch, 64, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    lr = torch.tensor(0.05, device=device)

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    def step(p: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        grads, loss = grad_and_value(loss_fn)(p)
        updates = {k: -lr * g for k, g in grads.items()}
        new = {k: p[k] + updates[k] for k in p}
        grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
        update_norm = torch.linalg.vector_norm(torch.stack([u.norm() for u in updates.values()]))
        param_norm = torch.linalg.vector_norm(torch.stack([q.norm() for q in p.values()]))
        metrics = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/update_param_ratio": update_norm / param_norm,
            "perf/examples": torch.tensor(batch, device=device),
            "train/step_count": torch.tensor(0, device=device),
        }
        return new, metrics

    return step, params


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_logging_overhead(
    *,
    steps: int = 50,
    repeats: int = 20,
    hidden: int = 256,
    batch: int = 64,
    device: str | torch.device = "cpu",
    every_n: int = 10,
    include_sync: bool = True,
) -> dict[str, Any]:
    """Times ``steps`` dummy steps per block with and without logging every step.

    Args:
        steps: steps per timed block.
        repeats: blocks per mode (interleaved; the median block is reported).
        hidden: width of the dummy MLP (sets the step time).
        batch: batch size of the dummy step.
        device: where the step runs.
        every_n: the ``AsyncWriter`` hand-over period.
        include_sync: also time a synchronous ``TensorBoardWriter`` for reference.

    Returns:
        ``step_ms_<mode>``: median wall-clock milliseconds per step, for modes ``none``,
        ``async`` (and ``sync``); ``cpu_ms_<mode>``: the same in process CPU time (all threads,
        so background work counts); ``overhead_<mode>`` and ``cpu_overhead_<mode>``: the median
        over blocks of the extra time relative to the no-logging block run just before
        (0.01 = 1%); ``write_cpu_us_<mode>``: process CPU microseconds per
        ``write_scalars`` call measured without the step, and ``write_share_<mode>`` that cost
        as a fraction of the no-logging step's CPU time; plus the settings.
    """
    dev = torch.device(device)
    step, params = _dummy_step(hidden, batch, dev)
    modes = ["none", "async", *(["sync"] if include_sync else [])]
    wall: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as logdir:
        writers: dict[str, MetricWriter | None] = {
            "none": None,
            "async": AsyncWriter(TensorBoardWriter(f"{logdir}/async"), every_n=every_n),
        }
        if include_sync:
            writers["sync"] = TensorBoardWriter(f"{logdir}/sync")
        counter = 0
        for block in range(repeats + 1):  # block 0 warms up every mode
            for mode in modes:
                writer = writers[mode]
                p = params
                _sync(dev)
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    p, metrics = step(p)
                    if writer is not None:
                        writer.write_scalars(counter, metrics)
                    counter += 1
                if writer is not None:
                    writer.flush()
                _sync(dev)
                if block > 0:
                    wall[mode].append((time.perf_counter() - start) / steps)
                    cpu[mode].append((time.process_time() - start_cpu) / steps)
        # The writers alone, on one step's metrics: CPU time per write, robust to a busy machine.
        _, metrics = step(params)
        write_us: dict[str, float] = {}
        for mode in modes[1:]:
            writer = writers[mode]
            assert writer is not None
            samples = []
            for _ in range(5):
                start_cpu = time.process_time()
                for _ in range(steps):
                    writer.write_scalars(counter, metrics)
                    counter += 1
                writer.flush()
                _sync(dev)
                samples.append((time.process_time() - start_cpu) / steps)
            write_us[mode] = 1e6 * statistics.median(samples)
        for writer in writers.values():
            if writer is not None:
                writer.close()
    result: dict[str, Any] = {
        "device": str(dev),
        "steps": steps,
        "repeats": repeats,
        "scalars_per_step": 6,
        "every_n": every_n,
    }
    for mode in modes:
        result[f"step_ms_{mode}"] = 1e3 * statistics.median(wall[mode])
        result[f"cpu_ms_{mode}"] = 1e3 * statistics.median(cpu[mode])
    for mode in modes[1:]:
        # Paired with the no-logging block run just before, so slow drifts of a shared machine
        # cancel; the median over blocks resists one-off stalls.
        result[f"overhead_{mode}"] = statistics.median(
            t / t0 - 1.0 for t, t0 in zip(wall[mode], wall["none"])
        )
        result[f"cpu_overhead_{mode}"] = statistics.median(
            t / t0 - 1.0 for t, t0 in zip(cpu[mode], cpu["none"])
        )
        result[f"write_cpu_us_{mode}"] = write_us[mode]
        result[f"write_share_{mode}"] = write_us[mode] / (1e3 * result["cpu_ms_none"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Cost of logging every step.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    result = measure_logging_overhead(
        steps=args.steps, repeats=args.repeats, hidden=args.hidden, device=args.device
    )
    for key, value in result.items():
        print(f"{key:>16}: {value:.4g}" if isinstance(value, float) else f"{key:>16}: {value}")


if __name__ == "__main__":
    main()
