"""Worker of ``test_uneven_review.py``: one rank of a 2-rank gloo job on loopback.

Probes of the data-parallel step with an empty rank batch: a batch-norm loss (whose stand-in
must hold more than one example per micro-batch), and an empty batch with a ``grad_stats``
hook on the device path (flags not read), simulated on gloo by making the step believe its
tensors live on a device. Not collected by pytest.
"""

from __future__ import annotations

import time
from typing import Any

import gloo_jobs
import torch
import torch.nn.functional as F
from gloo_jobs import digest, gap, shares

import functrain as ft
from functrain import distributed as dist
from functrain.distributed import _train_step

PLAN = [[4, 0], [0, 3], [5, 0]]  # one rank empty in every step: batch norm sees one batch


def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 3, generator=g, dtype=torch.float64), "g": torch.ones(3).double()}


def buffers0() -> dict[str, torch.Tensor]:
    return {"mean": torch.zeros(3, dtype=torch.float64), "var": torch.ones(3, dtype=torch.float64)}


def bn_loss(p: dict, batch: dict, buffers: dict) -> ft.LossOutput:
    """Batch norm in training mode (batch statistics; the running ones are updated)."""
    mean, var = buffers["mean"].clone(), buffers["var"].clone()
    h = F.batch_norm(batch["x"] @ p["w"], mean, var, weight=p["g"], training=True)
    loss = (h.sum(1) - batch["y"]).square().mean()
    return ft.LossOutput(loss, buffers={"mean": mean, "var": var})


def plain_loss(p: dict, batch: dict) -> torch.Tensor:
    """A mean squared error: any stand-in evaluates."""
    return ((batch["x"] @ p["w"]).sum(1) * p["g"].sum() - batch["y"]).square().mean()


def global_batch(step: int, n: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return {"x": x, "y": torch.randn(n, generator=g, dtype=torch.float64)}


def batch_norm(rank: int, group: Any, out_dir: str) -> dict:
    """The data-parallel run vs the single process on the concatenated batches."""
    step = dist.make_data_parallel_train_step(
        bn_loss, ft.sgd(0.1), group=group, sync_buffers="none"
    )
    ref_step = ft.make_train_step(bn_loss, ft.sgd(0.1))
    state = step.init_state(params(), buffers=buffers0())
    ref = ft.TrainState.create(params=params(), tx=ft.sgd(0.1), buffers=buffers0())
    out: dict = {"params": 0.0, "loss": 0.0, "kept_buffers": []}
    start = time.monotonic()
    for s, sizes in enumerate(PLAN):
        whole = global_batch(s, sum(sizes))
        before = digest(state.buffers)
        state, metrics = step(state, shares(whole, sizes, rank))
        ref, ref_metrics = ref_step(ref, whole)
        out["kept_buffers"].append(digest(state.buffers) == before)
        out["params"] = max(out["params"], gap(state.params, ref.params))
        out["loss"] = max(out["loss"], gap(metrics["loss"], ref_metrics["loss"]))
    out["s"] = time.monotonic() - start
    return out


def grad_stats_on_device(rank: int, group: Any, out_dir: str) -> dict:
    """Every rank empty with a ``grad_stats`` hook, the flags not read (a device backend)."""
    saved = _train_step._on_host, _train_step._raise_for_flags
    # What a CUDA step sees: not on the host, so the summed flags are never read.
    _train_step._on_host = lambda p: False
    _train_step._raise_for_flags = lambda *a: None
    try:
        step = dist.make_data_parallel_train_step(
            plain_loss, ft.sgd(0.1), group=group, grad_stats=ft.noise_scale_hook(), micro_batches=2
        )
        state = step.init_state(params())
        before = digest(state.params)
        start = time.monotonic()
        try:
            step(state, shares(global_batch(0, 0), [0, 0], rank))
            out = {"type": None, "msg": ""}
        except Exception as err:
            out = {"type": type(err).__name__, "msg": str(err)}
        out["s"] = time.monotonic() - start
        try:  # a step that ran anyway consumed the state (donate=True)
            out["untouched"] = digest(state.params) == before
        except ft.ConsumedStateError:
            out["untouched"] = False
    finally:
        _train_step._on_host, _train_step._raise_for_flags = saved
    return out


# The probe that hangs on the old code last: the ranks leave it out of step.
PROBES = {"grad_stats_on_device": grad_stats_on_device, "batch_norm": batch_norm}

if __name__ == "__main__":
    # A short group timeout: a rank left waiting fails the probe within seconds.
    gloo_jobs.run_probes(PROBES, init_timeout=30, group_timeout=6)
