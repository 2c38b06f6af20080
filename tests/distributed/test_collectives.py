"""Bucketing and the single-process behaviour of the pytree collectives."""

from __future__ import annotations

import pytest
import torch

from functrain import distributed as dist
from functrain.distributed import collectives


def test_buckets_respect_the_cap_and_group_by_dtype():
    leaves = [
        torch.zeros(10),
        torch.zeros(10, dtype=torch.float64),
        torch.zeros(10),
        torch.zeros(100),
    ]
    buckets = collectives.leaf_buckets(leaves, bucket_cap_mb=80 / 2**20)  # 80 bytes
    assert buckets == [[0, 2], [3], [1]]
    assert collectives.leaf_buckets(leaves, 25.0) == [[0, 2, 3], [1]]
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        collectives.leaf_buckets(leaves, 0.0)


def test_pack_unpack_round_trip():
    leaves = [torch.arange(6.0).reshape(2, 3).T, torch.tensor(5.0), torch.zeros(0, 2)]
    flat = collectives.pack(leaves)
    assert flat.shape == (7,)
    for got, want in zip(collectives.unpack(flat, [x.shape for x in leaves]), leaves):
        assert torch.equal(got, want)


def test_single_process_results_are_fresh_copies():
    tree = {"w": torch.ones(3), "n": torch.tensor(2, dtype=torch.int64)}
    for out in (dist.all_reduce_tree(tree, op="max"), dist.broadcast_tree(tree)):
        assert torch.equal(out["w"], tree["w"]) and torch.equal(out["n"], tree["n"])
        out["w"].add_(1)
        assert torch.equal(tree["w"], torch.ones(3))
    assert dist.all_reduce_tree({}) == {}
    with pytest.raises(ValueError, match="op must be"):
        dist.all_reduce_tree(tree, op="prod")


def test_prepare_runs_on_the_packed_buckets():
    pending = collectives.start_all_reduce(
        [torch.ones(2), torch.ones(3)], bucket_cap_mb=8 / 2**20, prepare=lambda f: f.mul_(3)
    )
    assert [x.tolist() for x in pending.wait()] == [[3.0, 3.0], [3.0, 3.0, 3.0]]


def test_process_helpers_outside_a_job():
    assert not dist.is_distributed()
    assert (dist.rank(), dist.world_size(), dist.is_rank_zero()) == (0, 1, True)
    dist.init()  # no torchrun environment: nothing to do
    dist.barrier()
    dist.shutdown()
    with pytest.raises(ValueError, match="timeout"):
        dist.init(timeout=-1)
