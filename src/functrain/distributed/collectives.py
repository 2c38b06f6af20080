"""Collectives on pytrees: flattened, bucketed and coalesced.

A pytree of many small tensors is never sent leaf by leaf: the leaves are grouped by dtype and
device, packed (one copy) into flat buckets of at most ``bucket_cap_mb`` megabytes, and every
bucket's collective is started asynchronously before the first one is waited for, so the
buckets travel back to back (the same scheme as ``DistributedDataParallel``'s gradient
buckets). Results are views into the received buckets: fresh memory, the inputs are never
written.

In :func:`all_reduce_tree`, sums and means of ``float16`` and ``bfloat16`` leaves travel and
accumulate in ``float32`` and are rounded once at the end: a half-precision sum of the ranks' values overflows (``float16``
tops out at 65504) or loses bits at every rank's addition. The public functions first check,
with one extra all-reduce of a small fixed-size signature, that every rank passes the same
structure, shapes and dtypes, and raise :class:`~functrain.distributed.RankMismatchError`
naming the first leaf that differs (buckets of different sizes would otherwise silently mix
unrelated values, or abort a process).

Outside a distributed job (world size 1) the functions return copies and communicate nothing.

Example:
    >>> import torch
    >>> from functrain import distributed as dist
    >>> dist.all_reduce_tree({"w": torch.ones(2), "b": torch.zeros(())})  # one process: a copy
    {'w': tensor([1., 1.]), 'b': tensor(0.)}
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.distributed as tdist

from functrain import tree
from functrain.distributed.errors import RankMismatchError
from functrain.distributed.process import Group, collective_errors, is_distributed, world_size

__all__ = ["all_reduce_tree", "broadcast_tree"]

_MB = 1 << 20
_OPS = {"sum", "mean", "max", "min"}
# Reduced in float32: a half-precision sum overflows or rounds at every rank's addition.
_WIDEN = {torch.float16, torch.bfloat16}


def plan_buckets(
    nbytes: Sequence[int], keys: Sequence[Hashable], cap_bytes: int
) -> list[list[int]]:
    """Indices grouped into buckets of one key (dtype and device), each at most ``cap_bytes``.

    Items keep their order inside a bucket; an item larger than the cap gets a bucket of its own.
    """
    if cap_bytes <= 0:
        raise ValueError(f"bucket_cap_mb must be positive, got {cap_bytes / _MB!r}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    buckets: list[list[int]] = []
    for indices in groups.values():
        current: list[int] = []
        size = 0
        for i in indices:
            if current and size + nbytes[i] > cap_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes[i]
        if current:
            buckets.append(current)
    return buckets


def leaf_buckets(leaves: Sequence[torch.Tensor], bucket_cap_mb: float) -> list[list[int]]:
    """:func:`plan_buckets` for whole tensors, keyed by dtype and device."""
    return plan_buckets(
        [x.numel() * x.element_size() for x in leaves],
        [(x.dtype, x.device) for x in leaves],
        int(bucket_cap_mb * _MB),
    )


def pack(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat, fresh, contiguous tensor holding ``leaves`` one after another."""
    if len(leaves) == 1:
        return leaves[0].reshape(-1).clone()
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def unpack(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
    """Views of ``flat`` with the given shapes, in order (the inverse of :func:`pack`)."""
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat.narrow(0, offset, n).view(shape))
        offset += n
    return out


class Pending:
    """Started collectives whose results :meth:`wait` returns (internal)."""

    def __init__(
        self,
        works: list[Any],
        what: str,
        group: Group,
        finish: Callable[[], list[torch.Tensor]],
    ) -> None:
        self.works = works
        self.what = what
        self.group = group
        self.finish = finish

    def wait(self) -> list[torch.Tensor]:
        """Waits for every started collective and returns the results."""
        with collective_errors(self.what, self.group):
            for work in self.works:
                if work is not None:
                    work.wait()
        return self.finish()


def _reduce_op(op: str) -> Any:
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    return {"sum": tdist.ReduceOp.SUM, "mean": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}.get(
        op, tdist.ReduceOp.MIN
    )


def start_all_reduce(
    leaves: Sequence[torch.Tensor],
    *,
    op: str = "sum",
    group: Group = None,
    bucket_cap_mb: float = 25.0,
    what: str = "all-reduce",
    prepare: Callable[[torch.Tensor], None] | None = None,
    widen_half: bool = False,
) -> Pending:
    """Starts a bucketed all-reduce of ``leaves``; ``wait()`` returns the reduced leaves.

    ``prepare`` is applied in place to each freshly packed bucket before it is sent (e.g. a
    scaling), so it costs no extra copy. ``widen_half`` sums half-precision buckets in float32
    (twice their traffic); the step's gradient buckets keep their dtype, as
    ``DistributedDataParallel``'s do, where an overflowing float16 sum is a non-finite step
    that loss scaling skips.
    """
    reduce_op = _reduce_op(op)
    leaves = list(leaves)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"leaf {i} is a {type(leaf).__name__}, not a tensor")
        # Refused on every world size (not only where the division runs, world > 1), so that a
        # script tested in one process does not fail once launched on several.
        if op == "mean" and not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"op='mean' needs floating-point or complex leaves; leaf {i} is {leaf.dtype} "
                "(reduce it with op='sum' and divide it yourself)"
            )
    buckets = leaf_buckets(leaves, bucket_cap_mb)
    flats = [pack([leaves[i] for i in bucket]) for bucket in buckets]
    world = world_size(group)
    if widen_half and op in ("sum", "mean") and world > 1 and is_distributed():
        flats = [f.float() if f.dtype in _WIDEN else f for f in flats]
    if prepare is not None:
        for flat in flats:
            prepare(flat)
    works: list[Any] = []
    if is_distributed() and world > 1:
        with collective_errors(what, group):
            works = [
                tdist.all_reduce(flat, op=reduce_op, group=group, async_op=True)
                for flat in flats
                if flat.numel()
            ]

    def finish() -> list[torch.Tensor]:
        out: list[torch.Tensor] = [leaves[0]] * len(leaves) if leaves else []
        for bucket, flat in zip(buckets, flats):
            if op == "mean" and world > 1:
                flat.div_(world)
            dtype = leaves[bucket[0]].dtype
            flat = flat if flat.dtype == dtype else flat.to(dtype)  # one rounding, at the end
            for i, view in zip(bucket, unpack(flat, [leaves[i].shape for i in bucket])):
                out[i] = view
        return out

    return Pending(works, what, group, finish)


def check_agree(values: Any, what: str, group: Group = None) -> None:
    """Raises :class:`RankMismatchError` on every rank unless all ranks' pytrees have the same
    structure, shapes and dtypes (internal).

    One all-reduce (``max``) of ``[h, -h]`` for a hash ``h`` of the description: every rank
    sees ``max == -min`` exactly when all hashes are equal, so all of them take the slow path
    (an object all-gather that names the first differing leaf) together, or none does.
    """
    if not (is_distributed() and world_size(group) > 1):
        return
    paths, leaves, _ = tree.flatten_with_paths(values)
    described = [
        (tree.path_str(p, "values"), tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", "")))
        for p, x in zip(paths, leaves)
    ]
    h = zlib.crc32(repr(described).encode())
    device = next((x.device for x in leaves if isinstance(x, torch.Tensor)), torch.device("cpu"))
    sig = torch.tensor([h, -h], dtype=torch.int64, device=device)
    with collective_errors(what, group):
        tdist.all_reduce(sig, op=tdist.ReduceOp.MAX, group=group)
    high, neg_low = sig.tolist()
    if high == -neg_low:
        return
    gathered: list[Any] = [None] * world_size(group)
    with collective_errors(what, group):
        tdist.all_gather_object(gathered, described, group=group)
    for r, theirs in enumerate(gathered):
        if theirs == gathered[0]:
            continue
        first = next(
            (f"{a} on rank 0, {b} on rank {r}" for a, b in zip(gathered[0], theirs) if a != b),
            f"{len(gathered[0])} leaves on rank 0, {len(theirs)} on rank {r}",
        )
        raise RankMismatchError(
            f"{what}: ranks disagree on the structure, shapes or dtypes (path, shape, dtype): "
            + first
        )


def all_reduce_tree(
    values: Any, *, op: str = "sum", group: Group = None, bucket_cap_mb: float = 25.0
) -> Any:
    """Reduces a pytree of tensors over all ranks: every rank gets the result.

    Leaves are packed into flat buckets (per dtype and device, at most ``bucket_cap_mb`` MB) and
    all buckets are reduced with asynchronous ``all_reduce`` calls started together.

    Args:
        values: a pytree of tensors, with the same structure, shapes and dtypes on every rank.
        op: ``"sum"``, ``"mean"`` (sum divided by the world size), ``"max"`` or ``"min"``.
        group: the process group (default: the default group).
        bucket_cap_mb: the largest bucket, in megabytes.

    Returns:
        A new pytree (fresh tensors; ``values`` is not modified).

    Raises:
        DistributedStepError: the collective failed (a rank died or timed out).
        RankMismatchError: the ranks' structures, shapes or dtypes differ (on every rank).
        TypeError: ``op="mean"`` of an integer or boolean leaf.

    Example:
        >>> import torch
        >>> from functrain import distributed as dist
        >>> dist.all_reduce_tree([torch.tensor([1.0, 2.0])], op="mean")
        [tensor([1., 2.])]
    """
    leaves, spec = tree.flatten(values)
    check_agree(values, f"all_reduce_tree({op})", group)
    if not leaves:
        return values
    reduced = start_all_reduce(
        leaves,
        op=op,
        group=group,
        bucket_cap_mb=bucket_cap_mb,
        what=f"all_reduce_tree({op})",
        widen_half=True,
    ).wait()
    return tree.unflatten(spec, reduced)


def start_broadcast(
    leaves: Sequence[torch.Tensor],
    *,
    src: int = 0,
    group: Group = None,
    bucket_cap_mb: float = 25.0,
    what: str = "broadcast",
) -> Pending:
    """Starts a bucketed broadcast of ``leaves`` from global rank ``src`` (internal)."""
    leaves = list(leaves)
    buckets = leaf_buckets(leaves, bucket_cap_mb)
    flats = [pack([leaves[i] for i in bucket]) for bucket in buckets]
    works: list[Any] = []
    if is_distributed() and world_size(group) > 1:
        with collective_errors(what, group):
            works = [
                tdist.broadcast(flat, src, group=group, async_op=True)
                for flat in flats
                if flat.numel()
            ]

    def finish() -> list[torch.Tensor]:
        out: list[torch.Tensor] = [leaves[0]] * len(leaves) if leaves else []
        for bucket, flat in zip(buckets, flats):
            for i, view in zip(bucket, unpack(flat, [leaves[i].shape for i in bucket])):
                out[i] = view
        return out

    return Pending(works, what, group, finish)


def broadcast_tree(
    values: Any, *, src: int = 0, group: Group = None, bucket_cap_mb: float = 25.0
) -> Any:
    """Every rank gets rank ``src``'s values of a pytree (e.g. the initial parameters).

    Args:
        values: a pytree of tensors with the same structure, shapes and dtypes on every rank
            (the values of ranks other than ``src`` are ignored).
        src: the global rank to copy from.
        group: the process group (default: the default group).
        bucket_cap_mb: the largest bucket, in megabytes.

    Returns:
        A new pytree (fresh tensors, on every rank including ``src``).

    Raises:
        DistributedStepError: the collective failed (a rank died or timed out).
        RankMismatchError: the ranks' structures, shapes or dtypes differ (on every rank).

    Example:
        >>> import torch
        >>> from functrain import distributed as dist
        >>> dist.broadcast_tree({"w": torch.arange(3.0)})
        {'w': tensor([0., 1., 2.])}
    """
    leaves, spec = tree.flatten(values)
    check_agree(values, "broadcast_tree", group)
    if not leaves:
        return values
    out = start_broadcast(
        leaves, src=src, group=group, bucket_cap_mb=bucket_cap_mb, what="broadcast_tree"
    ).wait()
    return tree.unflatten(spec, out)
