"""Dataset shards and per-rank random streams."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import distributed as dist


@given(
    n=st.integers(0, 50), world=st.integers(1, 6), shuffle=st.booleans(), epoch=st.integers(0, 3)
)
def test_shards_partition_the_dataset(n: int, world: int, shuffle: bool, epoch: int):
    shards = [
        dist.shard_indices(n, rank=r, world_size=world, shuffle=shuffle, seed=5, epoch=epoch)
        for r in range(world)
    ]
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    assert [len(s) for s in shards] == dist.shard_sizes(n, world)
    again = dist.shard_indices(
        n, rank=world - 1, world_size=world, shuffle=shuffle, seed=5, epoch=epoch
    )
    assert torch.equal(again, shards[-1])  # the same on every run
    if not shuffle:
        assert torch.equal(torch.cat(shards), torch.arange(n))  # concatenation keeps the order


def test_shuffle_changes_with_epoch_and_seed_and_drop_last_equalises():
    a = dist.shard_indices(100, rank=0, world_size=2, shuffle=True, epoch=0)
    b = dist.shard_indices(100, rank=0, world_size=2, shuffle=True, epoch=1)
    c = dist.shard_indices(100, rank=0, world_size=2, shuffle=True, seed=1)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    sizes = [len(dist.shard_indices(10, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert sizes == [3, 3, 3]


def test_shard_batch_takes_this_ranks_rows():
    batch = {"x": torch.arange(10).reshape(5, 2), "y": torch.arange(5)}
    parts = [dist.shard_batch(batch, rank=r, world_size=3) for r in range(3)]
    assert [p["y"].tolist() for p in parts] == [[0, 1], [2, 3], [4]]
    assert dist.shard_batch(batch)["y"].tolist() == list(range(5))  # one process: all of it
    with pytest.raises(ValueError, match="at least one example"):
        dist.shard_batch(batch, rank=0, world_size=6)
    with pytest.raises(ValueError, match="rank"):
        dist.shard_batch(batch, rank=3, world_size=3)
    with pytest.raises(ValueError, match="world_size"):
        dist.shard_indices(4, rank=0, world_size=0)


def test_rank_keys_are_distinct_reproducible_and_apart_from_step_streams():
    key = ft.random_key(7)
    keys = [int(dist.rank_key(key, r)) for r in range(8)]
    assert len(set(keys)) == 8
    assert keys == [int(dist.rank_key(ft.random_key(7), r)) for r in range(8)]
    step_streams = {int(ft.fold_in(key, i)) for i in range(16)}
    assert not step_streams & set(keys)
    assert int(dist.rank_key(key)) == keys[0]  # this process is rank 0
    with pytest.raises(ValueError, match="rank"):
        dist.rank_key(key, -1)
