"""Sharded optimizer state (ZeRO stage 1): each rank keeps and updates one piece of every parameter.

**Pieces.** Every parameter is cut along one dimension (the first whose largest piece is within
1% of the smallest possible) into ``world_size`` blocks of ``ceil(size / world_size)`` slices,
the last ones shorter or empty; rank ``r`` owns block ``r``. A 0-d parameter belongs to rank 0,
but every rank keeps and updates a replica of it with rank 0's gradient (one more scalar in the
step's small all-reduce), so the replicas stay bit for bit equal; rank 0's value is kept.
Pieces therefore keep the parameter's number of dimensions and its other sizes, so masks and
labels such as ``p.ndim > 1`` or ``p.ndim != 1`` mean the same on every rank's piece as on the
parameter (functions of exact shapes may not: see
:func:`functrain.distributed.shardable.check_masks_agree`).

**One step.** Gradients are *reduce-scattered*: each rank packs the pieces of all gradients in
rank order into a flat buffer (buckets of one dtype, ``[world, row]``), and
``reduce_scatter`` leaves each rank the sum of its own row: its pieces of the global gradient.
The optimizer runs on the pieces only (``tx.init`` / ``tx.update`` see a params-like pytree of
pieces), and the new parameter pieces are *all-gathered* back into whole parameters on every
rank. The optimizer state of a rank is therefore about ``1 / world_size`` of the whole.

Every rank's row has the same layout (leaf ``j`` at the same offset, padded to rank 0's piece,
which is the largest), so a row is never longer than the largest rank's share.

Example:
    >>> import torch
    >>> from functrain.distributed import zero
    >>> shard = zero.LeafShard.of(torch.Size([5, 3]), world_size=2)
    >>> shard.dim, [shard.piece_shape(r) for r in range(2)]
    (0, [torch.Size([3, 3]), torch.Size([2, 3])])
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from functrain import tree
from functrain.distributed._layout import SHARD_KEY as SHARD_KEY
from functrain.distributed._layout import Layout as Layout
from functrain.distributed._layout import LeafShard as LeafShard
from functrain.distributed._shard_collectives import _global as _global
from functrain.distributed._shard_collectives import start_all_gather as start_all_gather
from functrain.distributed._shard_collectives import start_reduce_scatter as start_reduce_scatter
from functrain.distributed._state_map import StateMap as StateMap

__all__ = ["LeafShard", "optimizer_state_bytes"]


def optimizer_state_bytes(opt_state: Any) -> int:
    """Bytes of distinct memory addressed by the tensors of an optimizer state.

    Each byte that some tensor leaf reads is counted once, in this process only (for a sharded
    state, this rank's pieces): the same tensor reached twice, or two views of one buffer that
    overlap, count their shared bytes once; disjoint views of one buffer add up; a
    non-contiguous view counts the elements it reads, not the gaps between them; an expanded
    (stride 0) dimension reads its elements once. Parts of a storage that no leaf reads are not
    counted. Meta tensors and non-tensor leaves count 0.

    Args:
        opt_state: an optimizer state pytree (e.g. ``state.opt_state``); not modified.

    Returns:
        The total as a Python ``int``. Only metadata is read (storage pointer, offset, sizes,
        strides, element size), so there is no device synchronization. Views of one storage
        whose ranges overlap are merged with CPU index tensors of one entry per contiguous
        run; the usual disjoint or identical leaves need none.

    Example:
        >>> import torch, functrain as ft
        >>> from functrain import distributed as dist
        >>> tx = ft.adam(1e-3)
        >>> dist.optimizer_state_bytes(tx.init({"w": torch.zeros(100)}))  # mu, nu and a count
        804
        >>> buf = torch.zeros(10)
        >>> dist.optimizer_state_bytes([buf[:6], buf[4:], buf])  # one buffer of 10 floats
        40
    """
    by_storage: dict[tuple[str, int | None, int], set[_Runs]] = {}
    for leaf in tree.leaves(opt_state):
        if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta" or not leaf.numel():
            continue
        key = (leaf.device.type, leaf.device.index, leaf.untyped_storage().data_ptr())
        by_storage.setdefault(key, set()).add(_runs(leaf))
    return sum(_union_bytes(views) for views in by_storage.values())


# A view as byte runs: (start, run length, ((count, stride), ...)), every length in bytes. It
# reads [start + Σ iₖ·strideₖ, … + run) for every index tuple (iₖ < countₖ).
_Runs = tuple[int, int, tuple[tuple[int, int], ...]]


def _runs(x: torch.Tensor) -> _Runs:
    """``x``'s bytes as runs: contiguous inner dimensions merged, size-1 and stride-0 ones dropped."""
    es = x.element_size()
    dims = sorted((s * es, n) for n, s in zip(x.shape, x.stride()) if n > 1 and s != 0)
    run = es
    while dims and dims[0][0] == run:  # the next dimension continues the run
        run *= dims.pop(0)[1]
    return x.storage_offset() * es, run, tuple((n, s) for s, n in dims)


def _extent(view: _Runs) -> tuple[int, int]:
    start, run, dims = view
    return start, start + run + sum((n - 1) * s for n, s in dims)


def _nested(view: _Runs) -> bool:
    """Whether the runs of one view are disjoint: each stride clears the dimensions inside it."""
    _, span, dims = view
    for n, s in sorted(dims, key=lambda d: d[1]):
        if s < span:
            return False
        span += (n - 1) * s
    return True


def _union_bytes(views: set[_Runs]) -> int:
    """Bytes read by the views of one storage (identical views already merged by the set)."""
    ordered = sorted(views, key=_extent)
    extents = [_extent(v) for v in ordered]
    apart = all(hi <= lo for (_, hi), (lo, _) in itertools.pairwise(extents))
    if apart and all(_nested(v) for v in ordered):  # the usual case: nothing to merge
        return sum(run * math.prod(n for n, _ in dims) for _, run, dims in ordered)
    # Overlap: every run's [start, end) on the CPU, sorted; each run adds what lies beyond the
    # furthest end of the runs before it.
    starts, ends = [], []
    for start, run, dims in ordered:
        offsets = torch.tensor([start], dtype=torch.int64)
        for n, s in dims:
            offsets = (offsets[:, None] + torch.arange(n, dtype=torch.int64) * s).reshape(-1)
        starts.append(offsets)
        ends.append(offsets + run)
    lo, order = torch.sort(torch.cat(starts))
    hi = torch.cat(ends)[order]
    reach = torch.cat([lo[:1], hi.cummax(0).values[:-1]])
    return int((hi - torch.maximum(lo, reach)).clamp_min(0).sum())
