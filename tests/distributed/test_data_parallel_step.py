"""The data-parallel step in one process (world size 1): an ordinary train step.

The multi-process equivalence lives in test_multiprocess.py; here, the single-process contract:
same numbers and metrics as ``ft.make_train_step``, argument checks, donation, randomness.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import functrain as ft
from functrain import distributed as dist
from functrain.testing import assert_trees_all_close


def _params():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "b": torch.zeros(3, dtype=torch.float64),
    }


def _batch(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 5, 4, generator=g, dtype=torch.float64),
        "y": torch.randint(0, 3, (n, 5), generator=g),
        "mask": torch.rand(n, 5, generator=g) < 0.7,
    }


def token_loss(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    ce = F.cross_entropy(logits.reshape(-1, 3), batch["y"].reshape(-1), reduction="none")
    mask = batch["mask"].reshape(-1).to(ce.dtype)
    hits = (logits.argmax(-1).reshape(-1) == batch["y"].reshape(-1)).to(ce.dtype)
    return ft.LossOutput(
        ft.LossSum((ce * mask).sum(), mask.sum()),
        aux={"acc": ft.LossSum((hits * mask).sum(), mask.sum()), "x2": batch["x"].square().mean()},
    )


TX = lambda: ft.chain(ft.clip_by_global_norm(0.3), ft.adamw(0.05, weight_decay=0.1))  # noqa: E731


@pytest.mark.parametrize("shard", [False, True])
@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_world_of_one_is_make_train_step(shard: bool, strategy: str):
    step = dist.make_data_parallel_train_step(
        token_loss, TX(), shard_optimizer=shard, micro_batches=2, strategy=strategy
    )
    ref_step = ft.make_train_step(token_loss, TX(), micro_batches=2, strategy=strategy)
    state = step.init_state(_params())
    ref = ft.TrainState.create(params=_params(), tx=TX())
    for s in range(4):
        state, metrics = step(state, _batch(s))
        ref, ref_metrics = ref_step(ref, _batch(s))
        assert sorted(metrics) == sorted(ref_metrics)
        assert_trees_all_close(metrics, ref_metrics, rtol=1e-12, atol=1e-14)
        assert metrics["num_examples"].dtype == torch.int64
    assert_trees_all_close(state.params, ref.params, rtol=1e-12, atol=1e-14)
    assert_trees_all_close(step.full_state(state).opt_state, ref.opt_state, rtol=1e-12, atol=1e-14)


def test_donation_and_a_failing_step_leave_states_usable():
    step = dist.make_data_parallel_train_step(token_loss, ft.sgd(0.1))
    state = step.init_state(_params())
    new, _ = step(state, _batch(0))
    assert state.consumed and not new.consumed
    with pytest.raises(ft.ConsumedStateError):
        step(state, _batch(0))
    with pytest.raises(KeyError):
        step(new, {"x": torch.zeros(2, 5, 4, dtype=torch.float64)})  # the loss fails
    assert not new.consumed
    keep = dist.make_data_parallel_train_step(token_loss, ft.sgd(0.1), donate=False)
    kept = keep.init_state(_params())
    keep(kept, _batch(0))
    assert not kept.consumed


def test_randomness_is_per_rank_and_reproducible():
    def noisy(params, batch):
        return (F.dropout(batch, 0.5, training=True) * params["w"]).mean()

    step = dist.make_data_parallel_train_step(noisy, ft.sgd(1.0), donate=False)
    state = step.init_state({"w": torch.zeros(())}, seed=3)
    a, _ = step(state, torch.ones(64))
    b, _ = step(state, torch.ones(64))
    assert torch.equal(a.params["w"], b.params["w"])
    assert torch.equal(a.key, ft.fold_in(state.key, 0))  # the shared key advances as usual
    single, _ = ft.make_train_step(noisy, ft.sgd(1.0), donate=False)(state, torch.ones(64))
    assert not torch.equal(a.params["w"], single.params["w"])  # rank 0 has its own stream


def test_buffers_and_learning_rate_metric():
    def counting(params, batch, buffers):
        return ft.LossOutput((params["w"] * batch).mean(), buffers={"n": buffers["n"] + len(batch)})

    tx = ft.inject_hyperparams(ft.sgd)(learning_rate=0.5)
    step = dist.make_data_parallel_train_step(counting, tx, shard_optimizer=True)
    state = step.init_state({"w": torch.ones(())}, buffers={"n": torch.zeros(())})
    state, metrics = step(state, torch.ones(3))
    assert float(state.buffers["n"]) == 3.0
    assert float(metrics["lr"]) == 0.5


def test_argument_checks():
    with pytest.raises(dist.ShardingError, match="scale_by_trust_ratio"):
        dist.make_data_parallel_train_step(token_loss, ft.lamb(0.1), shard_optimizer=True)
    dist.make_data_parallel_train_step(token_loss, ft.lamb(0.1))  # unsharded: anything goes
    with pytest.raises(ValueError, match="sync_buffers"):
        dist.make_data_parallel_train_step(token_loss, ft.sgd(0.1), sync_buffers="mean")
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        dist.make_data_parallel_train_step(token_loss, ft.sgd(0.1), bucket_cap_mb=0)
    with pytest.raises(ValueError, match="strategy"):
        dist.make_data_parallel_train_step(token_loss, ft.sgd(0.1), strategy="scan")
    with pytest.raises(TypeError, match="TrainState"):
        dist.make_data_parallel_train_step(token_loss, ft.sgd(0.1))({}, _batch(0))


def test_whole_state_round_trip():
    step = dist.make_data_parallel_train_step(token_loss, ft.adam(0.1), shard_optimizer=True)
    state = step.init_state(_params())
    state, _ = step(state, _batch(0))
    whole = step.full_state(state)
    assert_trees_all_close(step.shard_state(whole).opt_state, state.opt_state, rtol=0, atol=0)
    plain = dist.make_data_parallel_train_step(token_loss, ft.adam(0.1))
    assert plain.full_state(whole) is whole and plain.shard_state(whole) is whole


@pytest.mark.parametrize("shard", [False, True])
def test_nonfinite_skip_and_loss_scale_as_make_train_step(shard: bool):
    def loss(params, batch):
        return ((batch @ params["w"]) ** 2).mean()

    kwargs = {"loss_scale": ft.DynamicLossScale(2.0**10), "max_consecutive_skips": 5}
    step = dist.make_data_parallel_train_step(loss, ft.adam(0.1), shard_optimizer=shard, **kwargs)
    ref_step = ft.make_train_step(loss, ft.adam(0.1), **kwargs)
    params = {"w": torch.ones(3)}
    state = step.prepare(step.init_state(params))
    ref = ref_step.prepare(ft.TrainState.create(params=params, tx=ft.adam(0.1)))
    batches = [torch.ones(4, 3), torch.full((4, 3), float("nan")), torch.ones(4, 3) * 0.5]
    for batch in batches:
        state, metrics = step(state, batch)
        ref, ref_metrics = ref_step(ref, batch)
        assert sorted(metrics) == sorted(ref_metrics)
        assert_trees_all_close(metrics, ref_metrics, rtol=1e-6, atol=1e-7)
        assert_trees_all_close(state.params, ref.params, rtol=1e-6, atol=1e-7)
    assert int(state.extra["nonfinite"].total) == 1
