"""Data and randomness per rank: deterministic dataset shards and distinct random streams.

Every rank must see different examples and draw different dropout masks, reproducibly:

* :func:`shard_indices` cuts ``range(num_examples)`` (optionally shuffled by a seed shared by all
  ranks, reshuffled every epoch) into ``world_size`` contiguous pieces, one per rank;
* :func:`shard_batch` takes this rank's rows of a global batch;
* :func:`rank_key` derives this rank's random key from the (replicated) state key. The
  data-parallel step does it by itself: rank ``r`` computes micro-batch ``i`` with
  ``fold_in(rank_key(state.key, r), i + 1)``.

Concatenating the shards of ranks ``0, 1, …`` in order gives back the unsharded order, so a
data-parallel step on the shards matches a single-process step on the whole batch.

Example:
    >>> from functrain import distributed as dist
    >>> [dist.shard_indices(10, rank=r, world_size=3).tolist() for r in range(3)]
    [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from functrain import tree
from functrain.distributed import process
from functrain.train import microbatch
from functrain.train import rng as rng_lib

__all__ = ["rank_key", "shard_batch", "shard_indices", "shard_sizes"]

# Rank streams hang off their own branch of the key tree, apart from the micro-batch streams
# (fold_in(key, i + 1)) and the next step's key (fold_in(key, 0)).
_RANK_STREAM = 0x52414E4B  # "RANK"


def _int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (NumPy's too, as seeds are), else ``None``.

    ``isinstance(value, int)`` alone refused ``np.int64`` ranks and sizes (``len`` of a NumPy
    split, ``np.sum`` of a mask) with a message that read as if the value were out of range.
    Bools are refused: ``True`` as a rank or size is a mistake, not ``1``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _who(rank: int | None, world_size: int | None, group: process.Group) -> tuple[int, int]:
    r = process.rank(group) if rank is None else rank
    w = process.world_size(group) if world_size is None else world_size
    wi = _int(w)
    if wi is None or wi < 1:
        raise ValueError(f"world_size must be a positive int, got {w!r}")
    ri = _int(r)
    if ri is None or not 0 <= ri < wi:
        raise ValueError(f"rank must be an int in [0, {wi}), got {r!r}")
    return ri, wi


def shard_sizes(num_examples: int, world_size: int) -> list[int]:
    """How many of ``num_examples`` each rank gets: sizes differ by at most one, larger first.

    Pure arithmetic: it does not consult ``torch.distributed``, so ``world_size`` has no
    default and ``None`` is refused (pass ``dist.world_size()`` for the process group's size).

    Args:
        num_examples: the number of examples to share, a non-negative integer (NumPy's too).
        world_size: the number of ranks, a positive integer (NumPy's too).

    Returns:
        A list of ``world_size`` Python ints summing to ``num_examples``; entry ``r`` is rank
        ``r``'s share (0 for the last ranks when ``num_examples < world_size``).

    Raises:
        ValueError: ``num_examples`` or ``world_size`` is not an integer in range (bools and
            ``None`` are refused).

    Example:
        >>> from functrain import distributed as dist
        >>> dist.shard_sizes(10, 4)
        [3, 3, 2, 2]
    """
    n = _int(num_examples)
    if n is None or n < 0:
        raise ValueError(f"num_examples must be a non-negative int, got {num_examples!r}")
    w = _int(world_size)
    # Checked here, not by _who: _who reads the process group's size for None, and a None that
    # slipped through (an unset config value) gave ``[num_examples]`` outside a job.
    if w is None or w < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    q, r = divmod(n, w)
    return [q + 1 if i < r else q for i in range(w)]


def shard_indices(
    num_examples: int,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    group: process.Group = None,
) -> torch.Tensor:
    """This rank's example indices of a dataset of ``num_examples``, the same on every run.

    The indices ``0..num_examples-1`` (shuffled with a generator seeded by ``(seed, epoch)``
    when ``shuffle``: the same permutation on every rank, a new one each epoch) are cut into
    ``world_size`` contiguous pieces whose sizes differ by at most one (``drop_last``: the tail
    is dropped so all pieces have equal size). Rank ``r`` gets piece ``r``.

    Args:
        num_examples: the dataset size.
        rank: this process's rank (default: from the process group, 0 outside one).
        world_size: the number of ranks (default: from the process group, 1 outside one).
        shuffle: permute the indices before cutting.
        seed: the permutation's seed, shared by all ranks.
        epoch: mixed into the seed, so every epoch has its own permutation.
        drop_last: make all pieces equal by dropping the last ``num_examples % world_size``.
        group: the process group whose rank and size are used by default.

    Returns:
        A 1-d ``int64`` CPU tensor of indices.

    Example:
        >>> from functrain import distributed as dist
        >>> a = dist.shard_indices(8, rank=0, world_size=2, shuffle=True, seed=1)
        >>> b = dist.shard_indices(8, rank=1, world_size=2, shuffle=True, seed=1)
        >>> sorted(a.tolist() + b.tolist())
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    r, w = _who(rank, world_size, group)
    sizes = shard_sizes(num_examples, w)
    num_examples = sum(sizes)  # a Python int from here on (``num_examples`` may be NumPy's)
    if shuffle:
        generator = rng_lib.key_generator(rng_lib.fold_in(rng_lib.random_key(seed), epoch))
        order = torch.randperm(num_examples, generator=generator)
    else:
        order = torch.arange(num_examples)
    if drop_last:
        sizes = [num_examples // w] * w
    start = sum(sizes[:r])
    return order[start : start + sizes[r]]


def shard_batch(
    batch: Any,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    group: process.Group = None,
) -> Any:
    """This rank's rows of a global batch (views; sizes as :func:`shard_sizes`).

    Args:
        batch: a pytree of tensors sharing a leading batch dimension.
        rank: this process's rank (default: from the process group).
        world_size: the number of ranks (default: from the process group).
        group: the process group whose rank and size are used by default.

    Returns:
        A pytree of ``batch``'s structure whose leaves are views (``narrow`` along dim 0, no
        copy) of rank ``rank``'s contiguous rows. Outside a distributed job the defaults are
        rank 0 of 1, which gives views of the whole batch.

    Raises:
        ValueError: the batch has fewer examples than there are ranks (every rank needs one),
            or ``rank`` / ``world_size`` is out of range.

    Example:
        >>> import torch
        >>> from functrain import distributed as dist
        >>> dist.shard_batch({"x": torch.arange(5)}, rank=1, world_size=2)
        {'x': tensor([3, 4])}
    """
    r, w = _who(rank, world_size, group)
    n = microbatch.batch_size(batch)
    if n < w:
        raise ValueError(
            f"a batch of {n} examples cannot give each of {w} ranks at least one example"
        )
    sizes = shard_sizes(n, w)
    start = sum(sizes[:r])
    return tree.map(lambda x: x.narrow(0, start, sizes[r]), batch)


def rank_key(
    key: torch.Tensor, rank: int | None = None, group: process.Group = None
) -> torch.Tensor:
    """This rank's random key, derived from the key all ranks share.

    ``rank_key(key, r)`` differs between ranks and is the same on every run, so dropout and
    other randomness are independent across ranks and reproducible.

    Args:
        key: the shared key (e.g. ``state.key``; see :func:`functrain.random_key`).
        rank: the rank (default: this process's rank).
        group: the process group whose rank is used by default.

    Returns:
        A new 0-d ``int64`` CPU key, ``fold_in(fold_in(key, S), rank)`` for a fixed stream
        ``S``: deterministic, and ``key`` is not modified. Outside a distributed job the
        default rank is 0, so the result is ``rank_key(key, 0)``, not ``key``.

    Raises:
        ValueError: the rank is negative or not an integer (e.g. -1 when this process is not
            in ``group``), or ``key`` is not 0-d or not on the CPU.
        TypeError: ``key`` is not an ``int64`` tensor.

    Example:
        >>> import functrain as ft
        >>> from functrain import distributed as dist
        >>> key = ft.random_key(0)
        >>> bool(dist.rank_key(key, 0) != dist.rank_key(key, 1))
        True
    """
    r = process.rank(group) if rank is None else rank
    ri = _int(r)
    if ri is None or ri < 0:
        raise ValueError(f"rank must be a non-negative int, got {r!r}")
    return rng_lib.fold_in(rng_lib.fold_in(key, _RANK_STREAM), ri)
