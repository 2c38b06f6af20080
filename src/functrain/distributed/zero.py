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
    """Bytes held by the tensors of an optimizer state (aliased leaves counted once).

    Counts ``numel * element_size`` of each tensor leaf, in this process only (for a sharded
    state, this rank's pieces). Leaves that start at the same place in the same storage (the
    same tensor reached twice) are counted once; meta tensors and non-tensor leaves count 0.

    Args:
        opt_state: an optimizer state pytree (e.g. ``state.opt_state``); not modified.

    Returns:
        The total as a Python ``int``; no device synchronization (only metadata is read).

    Example:
        >>> import torch, functrain as ft
        >>> from functrain import distributed as dist
        >>> tx = ft.adam(1e-3)
        >>> dist.optimizer_state_bytes(tx.init({"w": torch.zeros(100)}))  # mu, nu and a count
        804
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for leaf in tree.leaves(opt_state):
        if not isinstance(leaf, torch.Tensor) or leaf.device.type == "meta":
            continue
        key = (leaf.untyped_storage().data_ptr(), leaf.storage_offset())
        if leaf.numel() and key in seen:
            continue
        seen.add(key)
        total += leaf.numel() * leaf.element_size()
    return total
