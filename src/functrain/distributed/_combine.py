"""The collectives that combine the ranks' gradient stages (internal): sums and counts.

Each rank scales its gradient by its weight ``wᵣ`` (:class:`~functrain.distributed._sums.Stats`)
and sends the sums out: an all-reduce in flat buckets (``shard_optimizer=False``) or a
reduce-scatter of this rank's pieces (ZeRO-1,
:func:`functrain.distributed.zero.start_reduce_scatter`), together with one small all-reduce of
the counts and metrics and, with ``sync_buffers="broadcast"``, a broadcast of rank 0's buffers.
Every collective is started before the first wait; the sums are then divided by the global
weight ``Σᵣ wᵣ``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from functrain import tree
from functrain.distributed import collectives, process, zero
from functrain.distributed._sums import Stats, div_

if TYPE_CHECKING:
    from functrain.distributed.step import DataParallelTrainStep


class Combined(NamedTuple):
    """The global values the optimizer stage starts from."""

    grads: list[torch.Tensor]  # the global gradient's leaves (ZeRO-1: this rank's pieces)
    spec: Any  # the gradient pytree's structure
    metrics: dict[str, torch.Tensor]  # the global batch's metrics
    buffers: Any  # rank 0's buffers with sync_buffers="broadcast", else this rank's


def combine(
    step: DataParallelTrainStep,
    params: Any,
    result: Any,
    local: dict[str, torch.Tensor],
    counts: dict[str, torch.Tensor],
    is_sum: bool,
) -> Combined:
    """Sums and counts of all ranks from this rank's gradient stage ``result``."""
    group = step.group
    stats = Stats(local, counts, is_sum)
    leaves, spec = tree.flatten(result.grads)
    weight = stats.weight

    def scale(flat: torch.Tensor) -> None:
        flat.mul_(weight.to(flat.dtype))

    # Sums go out; every collective of this stage is started before the first wait.
    if step.shard_optimizer:
        layout = step._layout_for(params)
        pending = zero.start_reduce_scatter(layout, leaves, group, prepare=scale)
    else:
        pending = collectives.start_all_reduce(
            leaves,
            group=group,
            bucket_cap_mb=step.bucket_cap_mb,
            what="all-reduce of the gradients",
            prepare=scale,
        )
    pending_stats = collectives.start_all_reduce(
        [stats.vector], group=group, what="all-reduce of the step's counts and metrics"
    )
    new_buffers = result.buffers
    buffer_leaves, buffer_spec = tree.flatten(new_buffers)
    pending_buffers = None
    if step.sync_buffers == "broadcast" and buffer_leaves and process.world_size(group) > 1:
        pending_buffers = collectives.start_broadcast(
            buffer_leaves,
            src=zero._global(0, group),
            group=group,
            bucket_cap_mb=step.bucket_cap_mb,
            what="broadcast of the buffers",
        )
    reduced = pending_stats.wait()[0]
    grads = pending.wait()
    if pending_buffers is not None:
        new_buffers = tree.unflatten(buffer_spec, pending_buffers.wait())
    div_(grads, reduced[0])
    return Combined(grads, spec, stats.metrics(reduced), new_buffers)
