"""Review tests of dataset and batch sharding, checked against hand-computed references.

Ranks are simulated in one process: every function takes ``rank`` and ``world_size``.
The reference for the per-epoch policy is ``torch.utils.data.DistributedSampler``: with
``drop_last=True`` each rank gets ``floor(n / w)`` examples and the tail of the (shuffled)
order is dropped; without it the sampler pads by repetition to ``ceil(n / w)`` each, while
functrain documents unpadded shards whose sizes differ by at most one.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

import functrain as ft
from functrain import distributed as dist


def _shards(n: int, w: int, **kwargs: object) -> list[list[int]]:
    return [dist.shard_indices(n, rank=r, world_size=w, **kwargs).tolist() for r in range(w)]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    w=st.integers(1, 9),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**40),
    epoch=st.integers(0, 5),
)
def test_drop_last_matches_distributed_sampler_counts_and_sees_each_kept_example_once(
    n: int, w: int, shuffle: bool, seed: int, epoch: int
) -> None:
    shards = _shards(n, w, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=True)
    sampler = DistributedSampler(range(n), num_replicas=w, rank=0, shuffle=False, drop_last=True)
    # DistributedSampler's own count; by hand it is floor(n / w).
    assert [len(s) for s in shards] == [sampler.num_samples] * w == [n // w] * w
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat))  # no example twice in an epoch
    if not shuffle:  # the dropped examples are the tail of the order, as the sampler drops
        assert sorted(flat) == list(range(n // w * w))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), w=st.integers(1, 9), shuffle=st.booleans(), epoch=st.integers(0, 5))
def test_without_drop_last_every_example_once_and_at_most_the_samplers_count(
    n: int, w: int, shuffle: bool, epoch: int
) -> None:
    shards = _shards(n, w, shuffle=shuffle, seed=11, epoch=epoch)
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))  # exactly once, no padding by repetition
    sampler = DistributedSampler(range(n), num_replicas=w, rank=0, shuffle=False)
    sizes = [len(s) for s in shards]
    # The sampler pads every rank to ceil(n / w); functrain's largest shard has that size
    # and the others at most one fewer (larger first).
    assert max(sizes, default=0) == sampler.num_samples == math.ceil(n / w)
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1


def test_world_size_larger_than_dataset_gives_documented_empty_shards() -> None:
    assert _shards(3, 5) == [[0], [1], [2], [], []]
    assert _shards(3, 5, drop_last=True) == [[]] * 5  # as DistributedSampler(drop_last=True)
    with pytest.raises(ValueError, match="at least one example"):
        dist.shard_batch({"x": torch.zeros(3, 2)}, rank=0, world_size=5)


def test_shuffle_is_a_pure_function_of_seed_and_epoch_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = _shards(23, 3, shuffle=True, seed=4, epoch=2)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(12345)
    assert _shards(23, 3, shuffle=True, seed=4, epoch=2) == a
    assert _shards(23, 3, shuffle=True, seed=4, epoch=3) != a  # set_epoch reshuffles
    # The same on another run: a fresh interpreter with another global seed.
    code = (
        "import torch; torch.manual_seed(99); from functrain import distributed as d; "
        "print([d.shard_indices(23, rank=r, world_size=3, shuffle=True, seed=4, epoch=2)"
        ".tolist() for r in range(3)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == repr(a)


def test_resuming_mid_epoch_continues_the_same_order() -> None:
    full = dist.shard_indices(50, rank=1, world_size=4, shuffle=True, seed=7, epoch=3)
    seen = full[:5].tolist()  # five examples consumed, then the job restarts
    again = dist.shard_indices(50, rank=1, world_size=4, shuffle=True, seed=7, epoch=3)
    assert seen + again[5:].tolist() == full.tolist()


def test_numpy_integers_are_accepted_as_sizes_and_ranks() -> None:
    # np.int64 is what len() of NumPy splits and np.sum of masks give; seeds already accept it.
    want = _shards(10, 3, shuffle=True, seed=1)
    got = [
        dist.shard_indices(
            np.int64(10), rank=np.int64(r), world_size=np.int32(3), shuffle=True, seed=1
        ).tolist()
        for r in range(3)
    ]
    assert got == want
    assert dist.shard_sizes(np.int64(10), np.int64(4)) == [3, 3, 2, 2]
    batch = {"x": torch.arange(5)}
    assert dist.shard_batch(batch, rank=np.int64(1), world_size=np.int64(2))["x"].tolist() == [3, 4]
    key = ft.random_key(0)
    assert int(dist.rank_key(key, np.int64(2))) == int(dist.rank_key(key, 2))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: dist.shard_indices(4, rank=True, world_size=2), "rank"),
        (lambda: dist.shard_indices(4, rank=0, world_size=2.0), "world_size"),
        (lambda: dist.shard_sizes(True, 2), "num_examples"),
        (lambda: dist.shard_sizes(-1, 2), "num_examples"),
        (lambda: dist.shard_indices(4, rank=2, world_size=2), r"rank must be an int in \[0, 2\)"),
        (lambda: dist.rank_key(ft.random_key(0), 1.0), "rank"),
    ],
)
def test_bad_arguments_name_the_argument(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), w=st.integers(1, 8))
def test_shard_batch_rows_match_tensor_split_on_nested_batches(n: int, w: int) -> None:
    if n < w:
        return
    batch = {"x": torch.arange(n * 2).reshape(n, 2), "y": [torch.arange(n), (None, torch.ones(n))]}
    ref = torch.tensor_split(torch.arange(n), w)  # larger pieces first, by hand for the order
    for r in range(w):
        part = dist.shard_batch(batch, rank=r, world_size=w)
        assert part["y"][0].tolist() == ref[r].tolist()
        assert part["x"].tolist() == batch["x"][ref[r]].tolist()
        assert part["y"][1][0] is None and part["y"][1][1].shape == (len(ref[r]),)


def test_shard_batch_names_a_non_tensor_leaf_and_leaves_the_batch_alone() -> None:
    batch = {"x": torch.arange(4), "meta": {"lang": "en"}}
    with pytest.raises(TypeError, match=r"batch\['meta'\]\['lang'\]"):
        dist.shard_batch(batch, rank=0, world_size=2)
    with pytest.raises(ValueError, match="different leading"):
        dist.shard_batch({"x": torch.zeros(4), "y": torch.zeros(3)}, rank=0, world_size=2)
    good = {"x": torch.arange(4)}
    dist.shard_batch(good, rank=1, world_size=2)
    assert good["x"].tolist() == [0, 1, 2, 3]


def test_token_weighted_shards_keep_every_token_once() -> None:
    # Ranks get different token counts; the pieces together hold every token exactly once,
    # so per-rank LossSum (sum, count) pairs add up to the whole batch's.
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    loss = torch.arange(20, dtype=torch.float64).reshape(5, 4)
    parts = [dist.shard_batch({"m": mask, "l": loss}, rank=r, world_size=2) for r in range(2)]
    counts = [int(p["m"].sum()) for p in parts]
    sums = [float((p["l"] * p["m"]).sum()) for p in parts]
    assert counts == [8, 3]  # rows 0-2 and rows 3-4, counted by hand
    assert sum(sums) / sum(counts) == float((loss * mask).sum()) / float(mask.sum())


_ACCEPTED = {
    "sgd_momentum": lambda: ft.sgd(0.1, momentum=0.9, nesterov=True),
    "adamw": lambda: ft.adamw(0.1, weight_decay=0.1),
    "nadamw": lambda: ft.nadamw(0.1),
    "radam": lambda: ft.radam(0.1),
    "amsgrad": lambda: ft.amsgrad(0.1),
    "adamax": lambda: ft.adamax(0.1),
    "rmsprop_centered": lambda: ft.rmsprop(0.1, centered=True, momentum=0.9),
    "adagrad": lambda: ft.adagrad(0.1),
    "lion": lambda: ft.lion(0.1),
    "sign_sgd": lambda: ft.sign_sgd(0.1),
    "ema_clip": lambda: ft.chain(ft.clip(0.5), ft.ema(0.9)),
}


@pytest.mark.parametrize("name", sorted(_ACCEPTED))
def test_transforms_check_shardable_accepts_give_the_same_rows_on_pieces(name: str) -> None:
    # What "shardable" promises: running the transform on row blocks of a parameter gives the
    # rows of running it on the whole parameter (float64, three steps).
    tx = _ACCEPTED[name]()
    dist.check_shardable(tx)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    pieces = [(0, 3), (3, 4)]
    state = tx.init({"w": w})
    states = [tx.init({"w": w[a:b]}) for a, b in pieces]
    for g in grads:
        whole, state = tx.update({"w": g}, state, {"w": w})
        rows = []
        for i, (a, b) in enumerate(pieces):
            u, states[i] = tx.update({"w": g[a:b]}, states[i], {"w": w[a:b]})
            rows.append(u["w"])
        torch.testing.assert_close(torch.cat(rows), whole["w"], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "tx",
    [ft.lamb(0.1), ft.adafactor(0.1), ft.chain(ft.scale(1.0), ft.clip_by_global_norm(1.0))],
)
def test_whole_parameter_transforms_are_refused(tx: object) -> None:
    with pytest.raises(dist.ShardingError):
        dist.check_shardable(tx)  # type: ignore[arg-type]
