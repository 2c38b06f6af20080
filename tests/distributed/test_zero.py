"""ZeRO-1 layout, checked in one process by simulating the ranks.

The sharded step's correctness rests on three facts tested here without processes: the pieces
partition every tensor; the reduce-scatter buffers give each rank the sum of its pieces and the
all-gather buffers give back whole tensors; and every supported optimizer gives the same numbers
on pieces as on whole parameters (the multi-process tests then check the real collectives).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import distributed as dist
from functrain.distributed import zero
from functrain.testing import assert_trees_all_close, assert_trees_all_equal

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(torch.Size)


@given(shape=shapes, world=st.integers(1, 5))
def test_pieces_partition_every_tensor(shape: torch.Size, world: int):
    x = torch.arange(shape.numel(), dtype=torch.float64).reshape(shape)
    shard = zero.LeafShard.of(shape, world)
    pieces = [shard.piece(x, r) for r in range(world)]
    assert sum(p.numel() for p in pieces) == x.numel()
    assert all(p.numel() <= pieces[0].numel() for p in pieces)  # rank 0's is the largest
    if shape:
        assert all(p.dim() == x.dim() for p in pieces)  # masks on p.ndim keep their meaning
    torch.testing.assert_close(shard.assemble(pieces), x, rtol=0, atol=0)
    out = torch.full_like(x, -1.0)
    shard.assemble(pieces, out=out)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_the_cut_dimension_is_the_first_large_enough():
    assert zero.LeafShard.of(torch.Size([1, 8]), 4).dim == 1
    assert zero.LeafShard.of(torch.Size([2, 3]), 4).dim == 1  # none >= 4: the largest
    assert zero.LeafShard.of(torch.Size([]), 3).lengths == (1, 0, 0)


def _leaves(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn((), generator=g, dtype=torch.float64),
        torch.randn(1, 3, generator=g, dtype=torch.float32),
        torch.zeros(0, 3, dtype=torch.float64),
        torch.randn(7, generator=g, dtype=torch.float32),
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("cap_mb", [25.0, 1e-5])
def test_reduce_scatter_and_all_gather_buffers(world: int, cap_mb: float):
    per_rank = [_leaves(r) for r in range(world)]
    layouts = [zero.Layout(per_rank[0], r, world, cap_mb) for r in range(world)]
    if cap_mb < 0.001:
        assert len(layouts[0].buckets) > 2
    # reduce-scatter: sum the [world * row] inputs over ranks, rank r keeps row r.
    inputs = [layouts[r].scatter_input(per_rank[r]) for r in range(world)]
    summed = [sum(inp[b] for inp in inputs) for b in range(len(layouts[0].buckets))]
    totals = [sum(leaves[i] for leaves in per_rank) for i in range(len(per_rank[0]))]
    for r in range(world):
        rows = [s.view(world, -1)[r] for s in summed]
        mine = layouts[r].my_pieces(rows)
        expected = layouts[r].pieces(totals)
        for got, want in zip(mine, expected):
            torch.testing.assert_close(got, want)
    # all-gather: concatenating every rank's row gives back whole tensors.
    rows = [layouts[r].row_input(layouts[r].pieces(totals)) for r in range(world)]
    gathered = [torch.cat([rows[r][b] for r in range(world)]) for b in range(len(rows[0]))]
    for got, want in zip(layouts[0].assemble(gathered), totals):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 4, generator=g, dtype=torch.float64),
        "b": torch.randn(5, generator=g, dtype=torch.float64),
        "s": torch.tensor(0.7, dtype=torch.float64),
        "r": torch.randn(1, 3, generator=g, dtype=torch.float64),
    }


def _ndim_mask(p):
    return ft.tree.map(lambda x: x.ndim > 1, p)


SUPPORTED = {
    "sgd_nesterov": lambda: ft.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: ft.adam(0.1),
    "adamw_masked": lambda: ft.adamw(0.1, weight_decay=0.3, mask=_ndim_mask),
    "nadamw": lambda: ft.nadamw(0.1, weight_decay=0.1),
    "radam": lambda: ft.radam(0.1),
    "amsgrad": lambda: ft.amsgrad(0.1),
    "adamax": lambda: ft.adamax(0.1),
    "rmsprop": lambda: ft.rmsprop(0.1, momentum=0.5),
    "adagrad": lambda: ft.adagrad(0.1),
    "lion": lambda: ft.lion(0.1, weight_decay=0.1),
    "sign_sgd": lambda: ft.sign_sgd(0.1),
    "inject_schedule": lambda: ft.inject_hyperparams(ft.adam)(
        learning_rate=ft.linear_schedule(0.1, 0.0, 5)
    ),
    "partition": lambda: ft.partition(
        {"fast": ft.adam(0.1), "slow": ft.sgd(0.01, momentum=0.9), "frozen": ft.set_to_zero()},
        {"w": "fast", "b": "slow", "s": "frozen", "r": "fast"},
    ),
    "multi_steps": lambda: ft.MultiSteps(
        ft.adam(0.1), every_k_schedule=2
    ).gradient_transformation(),
}


def _simulate(tx, params, grads_seq, world):
    """The optimizer on each rank's pieces, new pieces assembled into whole parameters."""
    leaves, spec = ft.tree.flatten(params)
    layouts = [zero.Layout(leaves, r, world, 25.0) for r in range(world)]
    states = [
        tx.init(ft.tree.unflatten(spec, [p.clone() for p in lay.pieces(leaves)])) for lay in layouts
    ]
    for grads in grads_seq:
        g_leaves = ft.tree.leaves(grads)
        new = []
        for r, lay in enumerate(layouts):
            p = ft.tree.unflatten(spec, lay.pieces(leaves))
            u, states[r] = tx.update(ft.tree.unflatten(spec, lay.pieces(g_leaves)), states[r], p)
            new.append(ft.tree.leaves(ft.apply_updates(p, u)))
        leaves = [
            layouts[0].shards[i].assemble([new[r][i] for r in range(world)])
            for i in range(len(leaves))
        ]
    return ft.tree.unflatten(spec, leaves), states


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_optimizers_give_the_same_numbers_on_pieces(name: str):
    tx = SUPPORTED[name]()
    dist.check_shardable(tx)
    params = _params()
    g = torch.Generator().manual_seed(1)
    grads_seq = [
        ft.tree.map(lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype), params)
        for _ in range(4)
    ]
    whole_state = tx.init(params)
    whole = params
    for grads in grads_seq:
        u, whole_state = tx.update(grads, whole_state, whole)
        whole = ft.apply_updates(whole, u)
    sharded, _ = _simulate(tx, params, grads_seq, world=3)
    assert_trees_all_close(sharded, whole, rtol=1e-12, atol=1e-14)


def test_a_refused_optimizer_really_differs_on_pieces():
    # lamb's trust ratio uses each parameter's whole norm: on pieces the numbers change.
    tx = ft.lamb(0.1)
    params = _params()
    grads = [ft.tree.map(lambda x: torch.ones_like(x) * 0.3, params)]
    u, _ = tx.update(grads[0], tx.init(params), params)
    sharded, _ = _simulate(tx, params, grads, world=2)
    assert not torch.allclose(sharded["w"], ft.apply_updates(params, u)["w"])


def test_state_map_shards_whole_states_and_finds_whole_states():
    tx = ft.adamw(0.1)
    params = _params()
    leaves = ft.tree.leaves(params)
    whole = tx.init(params)
    whole = ft.tree.map(lambda x: x + 1 if x.is_floating_point() else x, whole)
    world = 3
    maps = [zero.StateMap(tx, params, zero.Layout(leaves, r, world, 25.0)) for r in range(world)]
    shards = [m.shard(whole) for m in maps]
    for m, shard in zip(maps, shards):
        m.check(shard, "test")
    with pytest.raises(dist.RankMismatchError, match=r"step\.shard_state"):
        maps[1].check(whole, "test")
    with pytest.raises(dist.RankMismatchError, match="whole optimizer state"):
        maps[1].shard(shards[1])
    # Pieces of every per-parameter state leaf reassemble into the whole leaf.
    mu = [ft.tree.leaves(s[0].mu) for s in shards]
    for i, leaf in enumerate(ft.tree.leaves(whole[0].mu)):
        shard = zero.LeafShard.of(leaf.shape, world)
        assert_trees_all_equal(shard.assemble([mu[r][i] for r in range(world)]), leaf)
    assert all(int(s[0].count) == int(whole[0].count) for s in shards)


def test_optimizer_state_bytes_counts_each_storage_once():
    x = torch.zeros(10)
    assert (
        dist.optimizer_state_bytes({"a": x, "b": x, "c": torch.zeros(2, dtype=torch.float64)}) == 56
    )
    assert dist.optimizer_state_bytes(ft.EmptyState()) == 0
