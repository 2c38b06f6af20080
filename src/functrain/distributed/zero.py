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

import hashlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as tdist

from functrain import tree
from functrain.distributed.collectives import Pending, plan_buckets, start_broadcast
from functrain.distributed.errors import RankMismatchError
from functrain.distributed.process import Group, collective_errors, is_distributed
from functrain.distributed.shardable import check_masks_agree
from functrain.optim.base import GradientTransformation

__all__ = ["LeafShard", "optimizer_state_bytes"]

_MB = 1 << 20

# The ``state.extra`` entry naming whose shard a sharded optimizer state is: plain ints and a
# string, which checkpoints store as they are, so a restored shard says where it came from.
SHARD_KEY = "zero_shard"


class LeafShard(NamedTuple):
    """How one tensor of ``shape`` is cut into per-rank pieces.

    Attributes:
        shape: the whole tensor's shape.
        dim: the dimension cut, or ``None`` for a 0-d tensor (owned by rank 0).
        starts: per rank, the first index along ``dim``.
        lengths: per rank, the number of indices along ``dim`` (0: an empty piece).

    Example:
        >>> import torch
        >>> from functrain.distributed.zero import LeafShard
        >>> LeafShard.of(torch.Size([10]), world_size=3).lengths
        (4, 4, 2)
    """

    shape: torch.Size
    dim: int | None
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @staticmethod
    def of(shape: torch.Size | Sequence[int], world_size: int) -> LeafShard:
        """The cut of a tensor of ``shape`` over ``world_size`` ranks (depends on nothing else).

        Example:
            >>> import torch
            >>> from functrain.distributed.zero import LeafShard
            >>> LeafShard.of(torch.Size([1, 8]), world_size=4).dim
            1
        """
        shape = torch.Size(shape)
        if not shape:
            return LeafShard(shape, None, (0,) * world_size, (1,) + (0,) * (world_size - 1))
        numel = shape.numel()

        def largest_piece(d: int) -> int:
            return math.ceil(shape[d] / world_size) * (numel // shape[d] if shape[d] else 0)

        # The first dimension whose cut makes rank 0's piece (the largest) at most 1% larger
        # than the best cut's: memory per rank near an even share, and pieces contiguous where
        # that costs little. Cutting the first dimension of at least world_size elements would
        # give stacked weights such as (3, d, d) on 2 ranks a 2:1 split, and (12, d, d) on 8
        # ranks nothing on 2 ranks and a third more than an even share on the others.
        best = min(largest_piece(d) for d in range(len(shape)))
        dim = next(d for d in range(len(shape)) if largest_piece(d) <= best * 1.01)
        size = shape[dim]
        chunk = max(1, math.ceil(size / world_size))
        starts = tuple(min(r * chunk, size) for r in range(world_size))
        lengths = tuple(max(0, min(chunk, size - r * chunk)) for r in range(world_size))
        return LeafShard(shape, dim, starts, lengths)

    def piece_shape(self, rank: int) -> torch.Size:
        """The shape of rank ``rank``'s piece."""
        if self.dim is None:
            return torch.Size([]) if rank == 0 else torch.Size([0])
        shape = list(self.shape)
        shape[self.dim] = self.lengths[rank]
        return torch.Size(shape)

    def numel(self, rank: int) -> int:
        """The number of elements of rank ``rank``'s piece."""
        return self.piece_shape(rank).numel()

    def local_shape(self, rank: int) -> torch.Size:
        """The shape of what rank ``rank`` updates: its piece, or the replica of a 0-d tensor.

        Example:
            >>> import torch
            >>> from functrain.distributed.zero import LeafShard
            >>> shard = LeafShard.of(torch.Size([]), world_size=2)
            >>> shard.piece_shape(1), shard.local_shape(1)
            (torch.Size([0]), torch.Size([]))
        """
        return torch.Size([]) if self.dim is None else self.piece_shape(rank)

    def local(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """What rank ``rank`` updates of ``x``: its piece (a view), or ``x`` itself if 0-d."""
        # A (0,) piece off rank 0 would have ndim 1: an ndim mask or label would then differ
        # between ranks, and so would the structure of the optimizer state.
        return x if self.dim is None else self.piece(x, rank)

    def piece(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s piece of ``x`` (a view; an empty tensor for a 0-d ``x`` off rank 0)."""
        if self.dim is None:
            return x if rank == 0 else x.new_empty((0,))
        return x.narrow(self.dim, self.starts[rank], self.lengths[rank])

    def assemble(
        self, pieces: Sequence[torch.Tensor], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The whole tensor from all ranks' pieces (into ``out`` when given)."""
        if self.dim is None:
            whole = pieces[0].reshape(())
            return whole.clone() if out is None else out.copy_(whole)
        parts = [p for r, p in enumerate(pieces) if self.lengths[r]]
        if out is None:
            return torch.cat(parts, self.dim) if parts else pieces[0].new_empty(self.shape)
        if len(parts) == 1:
            return out.copy_(parts[0])
        return torch.cat(parts, self.dim, out=out) if parts else out


def optimizer_state_bytes(opt_state: Any) -> int:
    """Bytes held by the tensors of an optimizer state (each storage counted once).

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


class Layout:
    """The pieces and flat buckets of one parameter structure (internal).

    Built from the leaves' shapes, dtypes and devices only; ``rank`` and ``world_size`` are
    explicit so the packing can be checked in a single process.
    """

    def __init__(
        self, leaves: Sequence[torch.Tensor], rank: int, world_size: int, bucket_cap_mb: float
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.shapes = [leaf.shape for leaf in leaves]
        self.shards = [LeafShard.of(leaf.shape, world_size) for leaf in leaves]
        # Buckets are planned on the rows' sizes: what one collective moves per rank.
        planned = plan_buckets(
            [s.numel(0) * x.element_size() for s, x in zip(self.shards, leaves)],
            [(x.dtype, x.device) for x in leaves],
            int(bucket_cap_mb * _MB),
        )
        self.buckets = _rows(self.shards, planned)
        # Whether this rank's piece counts in global sums (norms): 0-d replicas count once.
        self.owned = [s.dim is not None or rank == 0 for s in self.shards]
        self.replicated = [i for i, s in enumerate(self.shards) if s.dim is None]  # 0-d leaves
        # The cut of every leaf (hence the world size), not the rank or the buckets: which rows
        # a rank's shard holds. Every rank computes the same one from the shapes alone.
        cuts = repr([(tuple(s.shape), s.dim, s.starts, s.lengths) for s in self.shards])
        self.fingerprint = hashlib.sha256(cuts.encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        """This rank's shard identity, kept in ``state.extra[SHARD_KEY]`` of a sharded state."""
        return {"rank": self.rank, "world_size": self.world_size, "layout": self.fingerprint}

    def check_identity(self, extra: Any, what: str) -> None:
        """Raises unless ``extra`` names this rank's shard of this layout (no tensor is read).

        A state without an identity passes on one rank only, where a shard is the whole state.

        Raises:
            RankMismatchError: the shard is another rank's, of another world size or of other
                parameter shapes, or (more than one rank) it names none.
        """
        found = extra.get(SHARD_KEY) if isinstance(extra, dict) else None
        here = f"rank {self.rank} of world size {self.world_size}"
        if found is None:
            if self.world_size == 1:
                return
            raise RankMismatchError(
                f"{what}: the sharded optimizer state carries no shard identity "
                f"(state.extra[{SHARD_KEY!r}]), so it cannot be told to be {here}'s; build it "
                "with step.init_state(...) or step.shard_state(whole_state)"
            )
        fields = ("rank", "world_size", "layout")
        if (
            not isinstance(found, dict)
            or set(found) != set(fields)
            or not all(type(found[k]) is t for k, t in zip(fields, (int, int, str)))
        ):
            raise RankMismatchError(
                f"{what}: state.extra[{SHARD_KEY!r}] is {found!r}, not a shard identity "
                "{'rank': int, 'world_size': int, 'layout': str}"
            )
        rank, world = found["rank"], found["world_size"]
        if (rank, world) != (self.rank, self.world_size):
            raise RankMismatchError(
                f"{what}: the optimizer state is rank {rank}'s shard (world size {world}) but "
                f"this is {here}; restore each rank's own shard, or resume on any world size "
                "from a saved step.full_state(state) with step.shard_state(...)"
            )
        if found["layout"] != self.fingerprint:
            raise RankMismatchError(
                f"{what}: the optimizer state is rank {rank}'s shard of other parameter shapes "
                f"(layout {found['layout']}, this step's {self.fingerprint})"
            )

    def pieces(self, leaves: Sequence[torch.Tensor], rank: int | None = None) -> list[torch.Tensor]:
        """Rank ``rank``'s (default: this rank's) pieces of whole leaves (views; 0-d: replicas)."""
        r = self.rank if rank is None else rank
        return [s.local(x, r) for s, x in zip(self.shards, leaves)]

    def owned_only(self, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's pieces with the replicas it does not own emptied (for global sums)."""
        return [x if own else x.new_zeros((0,)) for x, own in zip(leaves, self.owned)]

    def scatter_input(self, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per bucket, the flat ``[world * row]`` input of a reduce-scatter of whole leaves."""
        out = []
        for bucket in self.buckets:
            parts: list[torch.Tensor] = []
            for r in range(self.world_size):
                parts.extend(_pack_row(self.pieces(leaves, r), self.shards, bucket))
            out.append(torch.cat(parts))
        return out

    def row_input(self, pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per bucket, this rank's flat row (the input of an all-gather of pieces)."""
        out = []
        for bucket in self.buckets:
            parts = _pack_row(pieces, self.shards, bucket)
            out.append(torch.cat(parts))
        return out

    def my_pieces(self, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's pieces from its reduced rows (views)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.shards)
        for bucket, flat in zip(self.buckets, rows):
            for i, view in zip(bucket.leaves, _unpack_row(flat, self.shards, bucket, self.rank)):
                out[i] = view
        return out

    def assemble(
        self, gathered: Sequence[torch.Tensor], outs: Sequence[torch.Tensor | None] | None = None
    ) -> list[torch.Tensor]:
        """Whole leaves from the all-gathered ``[world * row]`` buffers (into ``outs`` if given)."""
        result: list[torch.Tensor] = [torch.empty(0)] * len(self.shards)
        for bucket, flat in zip(self.buckets, gathered):
            rows = flat.view(self.world_size, bucket.row) if bucket.row else None
            per_rank = [
                _unpack_row(rows[r] if rows is not None else flat, self.shards, bucket, r)
                for r in range(self.world_size)
            ]
            for k, i in enumerate(bucket.leaves):
                out = None if outs is None else outs[i]
                result[i] = self.shards[i].assemble(
                    [per_rank[r][k] for r in range(self.world_size)], out
                )
        return result


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


def _meta_like(x: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
    return torch.empty(x.shape if shape is None else shape, dtype=x.dtype, device="meta")


class StateMap:
    """Which optimizer-state leaves are sharded, for moving between whole and sharded states.

    Built by running ``tx.init`` on meta tensors (no memory): once with whole parameters and
    once with each needed rank's pieces. A state leaf whose shape on rank 0's pieces equals its
    shape on whole parameters is replicated (or owned whole by rank 0); any other leaf is a
    per-element state of a parameter of that whole shape, cut as :class:`LeafShard` cuts it.
    """

    def __init__(self, tx: GradientTransformation, params: Any, layout: Layout) -> None:
        leaves, spec = tree.flatten(params)
        check_masks_agree(tx, params, layout)
        try:
            self.full = tx.init(tree.unflatten(spec, [_meta_like(x) for x in leaves]))
            self.rank0 = tx.init(
                tree.unflatten(
                    spec, [_meta_like(x, s.piece_shape(0)) for x, s in zip(leaves, layout.shards)]
                )
            )
            self.mine = tx.init(
                tree.unflatten(
                    spec,
                    [
                        _meta_like(x, s.local_shape(layout.rank))
                        for x, s in zip(leaves, layout.shards)
                    ],
                )
            )
        except Exception as err:
            raise RuntimeError(
                f"could not work out the optimizer state's layout: tx.init failed on meta tensors "
                f"({type(err).__name__}: {err})"
            ) from err
        self.layout = layout
        self.full_leaves, self.spec = tree.flatten(self.full)
        self.rank0_leaves = tree.leaves(self.rank0)
        self.mine_leaves = tree.leaves(self.mine)
        self.sharded = [
            isinstance(f, torch.Tensor) and f.shape != z.shape
            for f, z in zip(self.full_leaves, self.rank0_leaves)
        ]

    def check(self, opt_state: Any, what: str) -> None:
        """Raises if ``opt_state`` is not this rank's shard (e.g. a whole state)."""
        leaves, spec = tree.flatten(opt_state)
        if spec == self.spec and all(
            not isinstance(m, torch.Tensor) or (isinstance(x, torch.Tensor) and x.shape == m.shape)
            for x, m in zip(leaves, self.mine_leaves)
        ):
            return
        whole = spec == self.spec and all(
            not isinstance(m, torch.Tensor) or (isinstance(x, torch.Tensor) and x.shape == m.shape)
            for x, m in zip(leaves, self.full_leaves)
        )
        hint = (
            "it is the whole (unsharded) optimizer state: convert it with step.shard_state(state)"
            if whole
            else "its structure or shapes differ from tx.init on this rank's pieces"
        )
        raise RankMismatchError(
            f"{what}: the optimizer state is not rank {self.layout.rank}'s shard; {hint}, or "
            "build the state with step.init_state(...)"
        )

    def shard(self, full_state: Any) -> Any:
        """This rank's shard of a whole optimizer state (copies)."""
        leaves, spec = tree.flatten(full_state)
        if spec != self.spec:
            raise RankMismatchError(
                f"the optimizer state's structure {spec} is not that of tx.init(params) {self.spec}"
            )
        for x, f in zip(leaves, self.full_leaves):
            if isinstance(f, torch.Tensor) and (
                not isinstance(x, torch.Tensor) or x.shape != f.shape
            ):
                raise RankMismatchError(
                    "shard_state expects the whole optimizer state (tx.init of the whole "
                    f"parameters); a leaf has shape {getattr(x, 'shape', None)}, not {f.shape}"
                )
        out = []
        for x, sharded, mine in zip(leaves, self.sharded, self.mine_leaves):
            if not isinstance(x, torch.Tensor):
                out.append(x)
            elif sharded or x.shape != mine.shape:  # cut, or owned whole by rank 0
                shard = LeafShard.of(x.shape, self.layout.world_size)
                out.append(shard.piece(x, self.layout.rank).clone())
            else:
                out.append(x.clone())
        return tree.unflatten(spec, out)

    def gather(self, opt_state: Any, group: Group) -> Any:
        """The whole optimizer state on every rank, from every rank's shard (a collective)."""
        self.check(opt_state, "gathering the optimizer state")
        leaves, spec = tree.flatten(opt_state)
        world = self.layout.world_size
        sharded = [i for i, s in enumerate(self.sharded) if s]
        kept = [
            i for i, s in enumerate(self.sharded) if not s and isinstance(leaves[i], torch.Tensor)
        ]
        shards = {i: LeafShard.of(self.full_leaves[i].shape, world) for i in sharded}
        out = list(leaves)
        if kept:  # replicated, or owned whole by rank 0: rank 0's value
            # Off rank 0, a leaf owned by rank 0 is an empty piece: receive into rank 0's shape.
            sources = [
                leaves[i]
                if leaves[i].shape == self.rank0_leaves[i].shape
                else leaves[i].new_empty(self.rank0_leaves[i].shape)
                for i in kept
            ]
            received = start_broadcast(
                sources, src=_global(0, group), group=group, what="gathering the optimizer state"
            ).wait()
            for i, v in zip(kept, received):
                out[i] = v.clone()
        by_dtype: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i in sharded:
            by_dtype.setdefault((leaves[i].dtype, leaves[i].device), []).append(i)
        for indices in by_dtype.values():
            slots = [shards[i].numel(0) for i in indices]
            parts = []
            for i, slot in zip(indices, slots):
                piece = leaves[i].reshape(-1)
                parts.append(piece)
                if slot > piece.numel():
                    parts.append(piece.new_zeros(slot - piece.numel()))
            row = torch.cat(parts)
            if is_distributed() and world > 1 and row.numel():
                gathered = row.new_empty(world * row.numel())
                gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
                with collective_errors("gathering the optimizer state", group):
                    gather(gathered, row, group=group)
            else:
                gathered = row
            rows = gathered.view(world, -1)
            offset = 0
            for i, slot in zip(indices, slots):
                s = shards[i]
                pieces = [
                    rows[r].narrow(0, offset, s.numel(r)).view(s.piece_shape(r))
                    for r in range(world)
                ]
                out[i] = s.assemble(pieces)
                offset += slot
        return tree.unflatten(spec, out)


def _global(group_rank: int, group: Group) -> int:
    if group is None or not is_distributed():
        return group_rank
    return tdist.get_global_rank(group, group_rank)
