"""Noise on a sharded optimizer state (ZeRO-1): every piece draws its slice of the whole noise.

``add_noise`` and ``dp_noisy_mean`` draw element ``j`` of leaf ``i`` from (key, ``i``, ``j``);
the sharded step passes them ``shard_index`` (each piece's positions in its whole parameter),
so a ``shard_optimizer=True`` run adds the very noise of the unsharded one.

* In this process: the index-aware generators reproduce slices of the whole-leaf noise,
  bit for bit; ``LeafShard.positions`` is ``arange(numel).reshape(shape).narrow(...)``; the
  transforms given ``shard_index`` return the slices of their whole updates; bad
  ``shard_index`` values are refused; ``check_shardable`` lifts the refusal for the two known
  transforms only.
* Two gloo ranks (``_zero_noise_worker.py``), float64: ``noisy_sgd``, ``add_noise`` + adam,
  ``inject_hyperparams(add_noise)`` and DP-SGD (``per_example_clip`` with ``dp_noisy_mean``)
  with noise on, unequal (and empty) rank batches, leaves cut along dim 0, along dim 1 and a
  0-d one: the parameters of the single-process step on the concatenated batch.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist
from functrain.distributed.zero import LeafShard
from functrain.grads import privacy
from functrain.optim import _prng, additive

HERE = Path(__file__).parent
TIGHT = 1e-12  # absolute, on values of order 1; the differences are rounding, about 1e-16

SHAPES = [(1, 8), (3, 5), (4, 3), (5,), (2, 3, 4), (7, 1, 2), (2, 0, 3)]
DTYPES = [torch.float32, torch.float64, torch.complex64]


def _generators():
    return {
        "add_noise": additive._standard_normal,
        "dp_noisy_mean": privacy._standard_normal,
    }


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_leaf_shard_positions_are_the_narrowed_arange(shape, world: int):
    shard = LeafShard.of(torch.Size(shape), world)
    whole = torch.arange(shard.shape.numel()).reshape(shape)
    for rank in range(world):
        pos = shard.positions(rank)
        assert pos is not None and pos.numel == whole.numel()
        assert pos.index.dtype == torch.int64
        expected = whole.narrow(shard.dim, shard.starts[rank], shard.lengths[rank])
        assert torch.equal(pos.index, expected)


def test_zero_d_leaf_has_no_positions():
    assert LeafShard.of(torch.Size([]), 2).positions(0) is None


@pytest.mark.parametrize("which", ["add_noise", "dp_noisy_mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("world", [2, 3])
def test_pieces_draw_slices_of_the_whole_noise(which: str, dtype, shape, world: int):
    gen = _generators()[which]
    key = _prng.make_key(1234)
    like = torch.zeros(shape, dtype=dtype)
    whole = gen(key, like, 3)
    shard = LeafShard.of(like.shape, world)
    pieces = []
    for rank in range(world):
        piece = shard.piece(like, rank)
        noise = gen(key, piece, 3, shard.positions(rank))
        assert noise.shape == piece.shape and noise.dtype == whole.dtype
        assert torch.equal(noise, shard.piece(whole, rank))
        pieces.append(noise)
    assert torch.equal(shard.assemble(pieces), whole)


@pytest.mark.parametrize("which", ["add_noise", "dp_noisy_mean"])
def test_arbitrary_positions_pick_those_elements(which: str):
    gen = _generators()[which]
    key = _prng.make_key(9)
    whole = gen(key, torch.zeros(40, dtype=torch.float64), 0)
    index = torch.tensor([[37, 2], [5, 5], [0, 39]])
    got = gen(key, torch.zeros(3, 2, dtype=torch.float64), 0, _prng.Positions(index, 40))
    assert torch.equal(got, whole[index])


def _tree():
    g = torch.Generator().manual_seed(0)
    return {
        "row": torch.randn(1, 8, generator=g, dtype=torch.float64),
        "mat": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "b": torch.randn((), generator=g, dtype=torch.float64),
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.add_noise(0.7, 0.55, key=4),
        lambda: ft.dp_noisy_mean(1.0, 1.3, 8.0, seed=4),
        lambda: ft.chain(ft.inject_hyperparams(ft.add_noise)(eta=0.7, gamma=0.55, key=4)),
        lambda: ft.chain(ft.dp_noisy_mean(1.0, 1.3, 8.0, seed=4), ft.sgd(0.1, momentum=0.9)),
    ],
    ids=["add_noise", "dp_noisy_mean", "chain_inject_add_noise", "chain_dp_sgd"],
)
def test_transforms_given_shard_index_return_slices_of_the_whole_update(make):
    grads, spec = ft.tree.flatten(_tree())
    whole_tx = make()
    whole, _ = whole_tx.update(_tree(), whole_tx.init(_tree()), _tree())
    whole_leaves = ft.tree.leaves(whole)
    world = 2
    shards = [LeafShard.of(g.shape, world) for g in grads]
    for rank in range(world):
        pieces = [s.local(g, rank) for s, g in zip(shards, grads)]
        tx = make()
        state = tx.init(ft.tree.unflatten(spec, pieces))
        index = [s.positions(rank) for s in shards]
        tree_pieces = ft.tree.unflatten(spec, pieces)
        out, _ = tx.update(tree_pieces, state, tree_pieces, shard_index=index)
        for s, got, ref in zip(shards, ft.tree.leaves(out), whole_leaves):
            assert torch.equal(got, s.local(ref, rank))


def test_without_shard_index_pieces_repeat_the_noise_of_the_first_positions():
    """Why the positions matter: a piece drawn as if whole gets the leaf's first elements."""
    key = _prng.make_key(5)
    shard = LeafShard.of(torch.Size([6]), 2)
    whole = _prng.normal_like(key, torch.zeros(6, dtype=torch.float64), 0)
    second = _prng.normal_like(key, torch.zeros(3, dtype=torch.float64), 0)
    assert torch.equal(second, whole[:3]) and not torch.equal(second, shard.piece(whole, 1))


@pytest.mark.parametrize("which", ["add_noise", "dp_noisy_mean"])
def test_bad_shard_index_is_refused(which: str):
    tx = ft.add_noise(0.1, 0.5, key=0) if which == "add_noise" else ft.dp_noisy_mean(1, 1, 8, 0)
    u = {"w": torch.zeros(2, 3)}
    state = tx.init(u)
    with pytest.raises(ValueError, match="shard_index must give the positions of each of the 1"):
        tx.update(u, state, shard_index=[None, None])
    wrong = _prng.Positions(torch.zeros(2, 2, dtype=torch.int64), 6)
    with pytest.raises(ValueError, match=r"shard_index\[0\] describes a piece of shape \(2, 2\)"):
        tx.update(u, state, shard_index=[wrong])
    # None entries (whole leaves) and None altogether are today's draw.
    plain, _ = tx.update(u, state)
    assert torch.equal(tx.update(u, state, shard_index=[None])[0]["w"], plain["w"])


def test_check_shardable_lifts_the_two_known_noise_transforms_only():
    for tx in (
        ft.noisy_sgd(0.1),
        ft.chain(ft.dp_noisy_mean(1.0, 1.0, 8.0, seed=0), ft.adam(0.1)),
        ft.inject_hyperparams(ft.add_noise)(eta=0.1, gamma=0.5, key=0),
        ft.MultiSteps(ft.noisy_sgd(0.1), 2).gradient_transformation(),
    ):
        dist.check_shardable(tx)

    def custom_update(updates, state, params=None, **extra):
        return updates, state

    custom_noise = ft.GradientTransformation(lambda p: ft.EmptyState(), custom_update)
    refused = [
        ft.chain(custom_noise, ft.sgd(0.1)),
        ft.dpsgd(0.1, 1.0, 1.0, seed=0),
        ft.masked(ft.add_noise(0.1, 0.5, key=0), {"w": True}),
        ft.partition({"a": ft.dp_noisy_mean(1.0, 1.0, 8.0, seed=0)}, {"w": "a"}),
    ]
    for tx in refused:
        with pytest.raises(dist.ShardingError):
            dist.check_shardable(tx)


def test_elementwise_member_without_extra_runs_beside_noise():
    """shard_index reaches only updates that take keywords: an elementwise-declared custom
    member with a plain signature still runs in a sharded step with noise (one rank)."""

    def update(updates, state, params=None):
        return ft.tree.scale(0.5, updates), state

    half = dist.elementwise(ft.GradientTransformation(lambda p: ft.EmptyState(), update))
    tx = ft.chain(half, ft.noisy_sgd(0.1, seed=1))
    step = dist.make_data_parallel_train_step(
        lambda p, b: (p["w"] * b).sum(), tx, shard_optimizer=True
    )
    state = step.init_state({"w": torch.zeros(3, dtype=torch.float64)})
    new, _ = step(state, torch.ones(3, dtype=torch.float64))
    ref_step = ft.make_train_step(lambda p, b: (p["w"] * b).sum(), tx)
    ref, _ = ref_step(
        ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.float64)}, tx=tx),
        torch.ones(3, dtype=torch.float64),
    )
    assert torch.equal(new.params["w"], ref.params["w"])


# -- two ranks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results (with its exit code and stderr)."""
    return gloo_jobs.run_job("_zero_noise_worker.py", 2, tmp_path_factory.mktemp("zero_noise"))


def test_worker_cuts_along_dim_0_and_dim_1():
    import _zero_noise_worker as worker

    dims = {k: LeafShard.of(torch.Size(s), 2).dim for k, s in worker.SHAPES.items()}
    assert dims == {"row": 1, "mat": 1, "col": 0, "vec": 0, "b": None}


@pytest.mark.parametrize(
    "name", ["noisy_sgd", "adam_noise", "injected_noise", "dp", "dp_micro_empty"]
)
def test_sharded_noise_is_the_single_process_noise(job, name: str):
    probes = []
    for rank, data in enumerate(job):
        assert name in data, (rank, data.get("exit"), data.get("stderr"))
        assert "error" not in data[name], data[name]["error"]
        probes.append(data[name])
    for probe in probes:
        assert probe["names"], probe
        assert probe["params"] < TIGHT and probe["opt_state"] < TIGHT, probe
        assert probe["metrics"] < TIGHT, probe
        # The noise moved every leaf (cut along dim 0, dim 1, and the 0-d one).
        assert probe["noise_effect"] > 1e-4, probe
    assert probes[0]["digest"] == probes[1]["digest"]
    if name.startswith("dp"):
        # As the replicated DP step: no grad_norm (the clipped sum's norm is not private).
        assert "grad_norm" not in probes[0]["metric_names"]
