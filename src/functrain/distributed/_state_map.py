"""Moving optimizer states between whole and sharded (internal).

:class:`StateMap` tells which leaves of an optimizer state are cut like their parameters, so a
whole state can be sharded and every rank's shard gathered back into the whole.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist

from functrain import tree
from functrain.distributed._layout import Layout, LeafShard
from functrain.distributed._shard_collectives import _global
from functrain.distributed.collectives import start_broadcast
from functrain.distributed.errors import RankMismatchError
from functrain.distributed.process import Group, collective_errors, is_distributed
from functrain.distributed.shardable import check_masks_agree
from functrain.optim.base import GradientTransformation


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
