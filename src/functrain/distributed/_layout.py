"""How parameters are cut into per-rank pieces and packed into rows (internal).

:class:`LeafShard` cuts one tensor; :class:`Layout` holds the cuts and flat buckets of a whole
parameter structure, and the shard identity (``state.extra[SHARD_KEY]``) that a sharded
optimizer state carries. See :mod:`functrain.distributed.zero` for the scheme.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from functrain.distributed._shard_collectives import _pack_row, _rows, _unpack_row
from functrain.distributed.collectives import plan_buckets
from functrain.distributed.errors import RankMismatchError
from functrain.optim._prng import Positions

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

    def positions(self, rank: int, device: torch.device | None = None) -> Positions | None:
        """Where rank ``rank``'s piece sits in the whole tensor (``None`` for a 0-d tensor,
        which every rank updates whole): its elements' flat row-major indices.

        Equal to ``arange(numel).reshape(shape).narrow(dim, start, length)``, built from
        piece-sized ranges only.

        Example:
            >>> import torch
            >>> from functrain.distributed.zero import LeafShard
            >>> LeafShard.of(torch.Size([1, 4]), world_size=2).positions(1).index
            tensor([[2, 3]])
        """
        if self.dim is None:
            return None
        shape = self.shape
        outer, inner = math.prod(shape[: self.dim]), math.prod(shape[self.dim + 1 :])
        size = shape[self.dim]

        def ramp(n: int) -> torch.Tensor:
            return torch.arange(n, dtype=torch.int64, device=device)

        start, length = self.starts[rank], self.lengths[rank]
        index = (
            ramp(outer).view(-1, 1, 1) * (size * inner)
            + (ramp(length) + start).view(1, -1, 1) * inner
            + ramp(inner).view(1, 1, -1)
        )
        return Positions(index.reshape(self.piece_shape(rank)), shape.numel())

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
        self._positions: tuple[tuple[torch.device, ...], list[Positions | None]] | None = None

    def shard_positions(self, leaves: Sequence[torch.Tensor]) -> list[Positions | None]:
        """This rank's pieces' positions in their whole leaves, on the leaves' devices.

        What the sharded update passes noise transforms as ``shard_index``. Built once and
        kept (one int64 per element of this rank's pieces), rebuilt only if the devices change.
        """
        devices = tuple(x.device for x in leaves)
        if self._positions is None or self._positions[0] != devices:
            found = [s.positions(self.rank, d) for s, d in zip(self.shards, devices)]
            self._positions = (devices, found)
        return self._positions[1]

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
