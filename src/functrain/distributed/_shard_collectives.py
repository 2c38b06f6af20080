"""The collectives of a sharded step and the rows they move (internal).

Each rank's row of a bucket holds its pieces, every leaf at the same offset and padded to rank
0's piece; :func:`start_reduce_scatter` and :func:`start_all_gather` move those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as tdist

from functrain.distributed.collectives import Pending
from functrain.distributed.process import Group, collective_errors, is_distributed

if TYPE_CHECKING:  # _layout imports the row helpers below at run time
    from functrain.distributed._layout import Layout, LeafShard


class _Bucket(NamedTuple):
    leaves: list[int]  # indices into the leaf list
    offsets: list[int]  # offset of each leaf's slot in a row
    row: int  # row length (elements)


def _rows(shards: Sequence[LeafShard], buckets: list[list[int]]) -> list[_Bucket]:
    out = []
    for bucket in buckets:
        offsets, row = [], 0
        for i in bucket:
            offsets.append(row)
            row += shards[i].numel(0)  # rank 0's piece is the largest
        out.append(_Bucket(bucket, offsets, row))
    return out


def _pack_row(
    pieces: Sequence[torch.Tensor], shards: Sequence[LeafShard], bucket: _Bucket
) -> list[torch.Tensor]:
    """The flat parts of one rank's row: its pieces, each padded to its slot."""
    parts = []
    for i in bucket.leaves:
        piece = pieces[i].reshape(-1)
        parts.append(piece)
        pad = shards[i].numel(0) - piece.numel()
        if pad:
            parts.append(piece.new_zeros(pad))
    return parts


def _unpack_row(
    flat: torch.Tensor, shards: Sequence[LeafShard], bucket: _Bucket, rank: int
) -> list[torch.Tensor]:
    """Views of a rank's pieces (0-d replicas included) in its row."""
    out = []
    for i, off in zip(bucket.leaves, bucket.offsets):
        shape = shards[i].local_shape(rank)
        out.append(flat.narrow(0, off, shape.numel()).view(shape))
    return out


def start_reduce_scatter(
    layout: Layout, leaves: Sequence[torch.Tensor], group: Group, prepare: Any = None
) -> Pending:
    """Starts reduce-scattering whole leaves; ``wait()`` returns this rank's summed pieces."""
    inputs = layout.scatter_input(leaves)
    if prepare is not None:
        for flat in inputs:
            prepare(flat)
    if not (is_distributed() and layout.world_size > 1):
        return Pending(
            [], "reduce-scatter of the gradients", group, lambda: layout.my_pieces(inputs)
        )
    outputs = [flat.new_empty(bucket.row) for flat, bucket in zip(inputs, layout.buckets)]
    scatter = getattr(tdist, "reduce_scatter_single", None) or tdist.reduce_scatter_tensor
    with collective_errors("reduce-scatter of the gradients", group):
        works = [
            scatter(out, flat, group=group, async_op=True)
            for out, flat in zip(outputs, inputs)
            if out.numel()
        ]
    return Pending(
        works, "reduce-scatter of the gradients", group, lambda: layout.my_pieces(outputs)
    )


def start_all_gather(
    layout: Layout,
    pieces: Sequence[torch.Tensor],
    group: Group,
    outs: Sequence[torch.Tensor | None] | None = None,
) -> Pending:
    """Starts all-gathering this rank's pieces; ``wait()`` returns whole leaves."""
    inputs = layout.row_input(pieces)
    if not (is_distributed() and layout.world_size > 1):
        return Pending(
            [], "all-gather of the parameters", group, lambda: layout.assemble(inputs, outs)
        )
    outputs = [flat.new_empty(layout.world_size * flat.numel()) for flat in inputs]
    gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
    with collective_errors("all-gather of the parameters", group):
        works = [
            gather(out, flat, group=group, async_op=True)
            for out, flat in zip(outputs, inputs)
            if flat.numel()
        ]
    return Pending(
        works, "all-gather of the parameters", group, lambda: layout.assemble(outputs, outs)
    )


def _global(group_rank: int, group: Group) -> int:
    if group is None or not is_distributed():
        return group_rank
    return tdist.get_global_rank(group, group_rank)
