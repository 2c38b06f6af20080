"""The collectives that combine the ranks' gradient stages (internal): sums and counts.

Each rank scales its gradient by its weight ``wᵣ`` (:class:`~functrain.distributed._sums.Stats`)
and sends the sums out: an all-reduce in flat buckets (``shard_optimizer=False``) or a
reduce-scatter of this rank's pieces (ZeRO-1,
:func:`functrain.distributed.zero.start_reduce_scatter`), together with one small all-reduce of
the counts and metrics and, with ``sync_buffers="broadcast"``, a broadcast of rank 0's buffers.
Every collective is started before the first wait; the sums are then divided by the global
weight ``Σᵣ wᵣ``. Float16 gradients are the exception: ``wᵣ·gᵣ`` would overflow its range, so
the counts are reduced first and each rank sends ``wᵣ / Σᵣ wᵣ · gᵣ``.

A DP-SGD step (``per_example_clip=C``) sends its clipped sum ``Σᵢ clip(gᵢ, C)`` as it is and
the ranks' sums are added, not averaged: the global sum is what ``dp_noisy_mean`` noises (its
sensitivity is ``C`` whichever rank holds an example) and divides by the expected batch size.

With a ``grad_stats`` hook, one more small collective starts with the others: an all-gather of
each rank's per-micro-batch stats (sizes, losses, ``per_micro_batch`` values) packed in one
float64 vector, so the hook sees all ``world × K`` micro-batches in rank order; a hook with an
accumulator (``noise_scale_hook(cosine=True)``) also has its accumulator all-reduced (summed):
a second all-reduce as large as the accumulator, i.e. gradient-sized for the cosine's sum of
unit gradients. :func:`functrain.distributed._agree.compare_grad_stats` checks on the
first call that the ranks' packed vectors agree in layout (``K``, value names), so the
all-gather cannot mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as tdist

from functrain import tree
from functrain.distributed import collectives, process, zero
from functrain.distributed._sums import Stats, div_, pack_stats, unpack_stats
from functrain.train.grad_stats import MicroBatchStats

_NARROW = (torch.float16,)  # dtypes whose range the weighted sums can exceed

if TYPE_CHECKING:
    from functrain.distributed.step import DataParallelTrainStep


class Combined(NamedTuple):
    """The global values the optimizer stage starts from."""

    grads: list[torch.Tensor]  # the global gradient's leaves (ZeRO-1: this rank's pieces)
    spec: Any  # the gradient pytree's structure
    metrics: dict[str, torch.Tensor]  # the global batch's metrics
    buffers: Any  # rank 0's buffers with sync_buffers="broadcast", else this rank's
    grad_stats: MicroBatchStats | None = None  # all ranks' micro-batch stats (with a hook)
    flags: torch.Tensor | None = None  # every rank's state (0 taken, 1 empty, 2 refused, 3 failed)


def combine(
    step: DataParallelTrainStep,
    params: Any,
    result: Any,
    local: dict[str, torch.Tensor],
    counts: dict[str, torch.Tensor],
    is_sum: bool,
    flags: torch.Tensor | None = None,
) -> Combined:
    """Sums and counts of all ranks from this rank's gradient stage ``result``; ``flags``
    (one slot per rank, this rank's set) are summed with the counts."""
    group = step.group
    stats = Stats(
        local, counts, is_sum, empty_is_zero=step.per_example_clip is not None, flags=flags
    )
    leaves, spec = tree.flatten(result.grads)
    weight = stats.weight
    # A DP-SGD step's gradient is already a sum of clipped per-example gradients: no weights.
    clipped_sum = step.per_example_clip is not None
    pending_stats = collectives.start_all_reduce(
        [stats.vector], group=group, what="all-reduce of the step's counts and metrics"
    )
    reduced: torch.Tensor | None = None
    if not clipped_sum and any(leaf.dtype in _NARROW for leaf in leaves):
        # wᵣ·gᵣ overflows float16 (65504) for gradients that are themselves small (5000
        # examples times 20): such ranks first learn Σᵣ wᵣ and send wᵣ/Σ wᵣ · gᵣ instead.
        reduced = pending_stats.wait()[0]
        factor = weight / reduced[0]
    else:
        factor = weight

    def scale(flat: torch.Tensor) -> None:
        # A rank of zero weight sends zeros, not its NaN = 0/0 mean gradient.
        flat.mul_(factor.to(flat.dtype)).masked_fill_(weight == 0, 0)

    prepare = None if clipped_sum else scale
    # Sums go out; every collective below is started before the first wait.
    if step.shard_optimizer:
        layout = step._layout_for(params)
        pending = zero.start_reduce_scatter(layout, leaves, group, prepare=prepare)
    else:
        pending = collectives.start_all_reduce(
            leaves,
            group=group,
            bucket_cap_mb=step.bucket_cap_mb,
            what="all-reduce of the gradients",
            prepare=prepare,
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
    wait_stats = None if result.stats is None else _start_grad_stats(step, result.stats)
    prescaled = reduced is not None
    if reduced is None:
        reduced = pending_stats.wait()[0]
    grads = pending.wait()
    if pending_buffers is not None:
        new_buffers = tree.unflatten(buffer_spec, pending_buffers.wait())
    all_stats = None if wait_stats is None else wait_stats()
    if not prescaled and not clipped_sum:
        div_(grads, reduced[0])
    all_flags = None if flags is None else reduced[-flags.numel() :]
    return Combined(grads, spec, stats.metrics(reduced), new_buffers, all_stats, all_flags)


def _accumulator_parts(accumulated: Any) -> tuple[list[int], list[torch.Tensor], Any]:
    """The accumulator's tensor leaves (to sum over ranks) and where they sit among its leaves."""
    leaves, spec = tree.flatten(accumulated)
    at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    return at, [leaves[i] for i in at], (leaves, spec)


def _start_grad_stats(step: DataParallelTrainStep, stats: MicroBatchStats) -> Callable[[], Any]:
    """Starts the all-gather of the hook's stats (and the accumulator's all-reduce); the
    returned function waits for them and gives all ranks' :class:`MicroBatchStats`."""
    group = step.group
    world = process.world_size(group)
    if world == 1 or not process.is_distributed():
        return lambda: stats
    vector, lengths = pack_stats(stats)
    gathered = vector.new_empty(world * vector.numel())
    what = "all-gather of the grad_stats micro-batch statistics"
    # all_gather_into_tensor is deprecated (a FutureWarning every step) where all_gather_single
    # exists; the same fallback as the ZeRO-1 gathers (_shard_collectives).
    gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
    with process.collective_errors(what, group):
        work = gather(gathered, vector, group=group, async_op=True)
    pending_acc = None
    at, tensors, (acc_leaves, acc_spec) = _accumulator_parts(stats.accumulated)
    if stats.accumulated is not None:
        pending_acc = collectives.start_all_reduce(
            tensors,
            group=group,
            bucket_cap_mb=step.bucket_cap_mb,
            what="all-reduce of the grad_stats accumulator",
        )

    def wait() -> MicroBatchStats:
        with process.collective_errors(what, group):
            work.wait()
        accumulated = stats.accumulated
        if pending_acc is not None:
            # Python numbers are host-side counts every rank computes alike (they cannot read
            # the data without a host sync; K agrees, checked on the first call): × world.
            total = [x * world if isinstance(x, (int, float)) else x for x in acc_leaves]
            for i, summed in zip(at, pending_acc.wait()):
                total[i] = summed
            accumulated = tree.unflatten(acc_spec, total)
        return unpack_stats(gathered, lengths, stats, accumulated)

    return wait
