"""check_shardable: which optimizers may run on a sharded optimizer state."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import distributed as dist

SUPPORTED = [
    ft.sgd(0.1, momentum=0.9),
    ft.adam(0.1),
    ft.adamw(0.1, mask=lambda p: ft.tree.map(lambda x: x.ndim > 1, p)),
    ft.nadam(0.1),
    ft.nadamw(0.1),
    ft.radam(0.1),
    ft.amsgrad(0.1),
    ft.adamax(0.1),
    ft.rmsprop(0.1, centered=True, momentum=0.9),
    ft.adagrad(0.1),
    ft.lion(0.1),
    ft.sign_sgd(0.1),
    ft.chain(ft.clip(1.0), ft.trace(0.9), ft.ema(0.9), ft.scale_by_stddev(), ft.scale(-1.0)),
    ft.named_chain(("adam", ft.scale_by_adam()), ("lr", ft.scale_by_schedule(lambda n: -0.1))),
    ft.freeze({"w": True}),
    ft.selective_transform(ft.adam(0.1), freeze_mask={"w": False}),
    ft.inject_hyperparams(ft.adamw)(learning_rate=ft.cosine_decay_schedule(0.1, 100)),
    ft.MultiSteps(ft.adam(0.1), every_k_schedule=4).gradient_transformation(),
]


@pytest.mark.parametrize("tx", SUPPORTED, ids=range(len(SUPPORTED)))
def test_supported(tx):
    report = dist.check_shardable(tx)
    assert report.leading_clip is None
    assert report.transforms


REFUSED = [
    (ft.lamb(0.1), "scale_by_trust_ratio"),
    (ft.lars(0.1), "scale_by_trust_ratio"),
    (ft.adafactor(0.1), "scale_by_factored_rms"),
    (ft.masked(ft.add_noise(0.1, 0.5, seed=0), {"w": True}), "masked/add_noise"),
    (ft.chain(ft.differentially_private_aggregate(1.0, 1.0, seed=0)), "per-example gradients"),
    (ft.chain(ft.adam(0.1), ft.clip_by_global_norm(1.0)), "clip_by_global_norm"),
    (ft.masked(ft.clip_by_global_norm(1.0), {"w": True}), "clip_by_global_norm"),
    (ft.chain(ft.clip_by_block_rms(1.0), ft.sgd(0.1)), "clip_by_block_rms"),
    (ft.chain(ft.adaptive_grad_clip(0.1), ft.sgd(0.1)), "adaptive_grad_clip"),
    (ft.apply_if_finite(ft.sgd(0.1), 3), "apply_if_finite"),
    (ft.chain(ft.zero_nans(), ft.sgd(0.1)), "zero_nans"),
    (
        ft.inject_hyperparams(ft.lamb)(learning_rate=0.1),
        "inject_hyperparams/chain/scale_by_trust_ratio",
    ),
    (
        ft.MultiSteps(
            ft.sgd(0.1), 2, should_skip_update_fn=ft.skip_not_finite
        ).gradient_transformation(),
        "should_skip_update_fn",
    ),
    (ft.stateless(lambda u, p: u), "functrain.distributed.elementwise"),
]


@pytest.mark.parametrize("tx, name", REFUSED, ids=[n for _, n in REFUSED])
def test_refused_with_the_reason(tx, name: str):
    with pytest.raises(dist.ShardingError, match="shard_optimizer=False") as info:
        dist.check_shardable(tx)
    assert name in str(info.value)


def test_all_problems_are_listed():
    tx = ft.chain(ft.scale_by_trust_ratio(), ft.masked(ft.add_noise(0.1, 0.5, seed=0), {"w": True}))
    with pytest.raises(dist.ShardingError) as info:
        dist.check_shardable(tx)
    assert "scale_by_trust_ratio" in str(info.value) and "add_noise" in str(info.value)


def test_leading_clip_is_found_also_in_nested_chains():
    assert (
        dist.check_shardable(ft.chain(ft.clip_by_global_norm(2.0), ft.adam(0.1))).leading_clip
        == 2.0
    )
    nested = ft.chain(ft.chain(ft.clip_by_global_norm(0.5), ft.scale_by_adam()), ft.scale(-0.1))
    assert dist.check_shardable(nested).leading_clip == 0.5
    bound = torch.tensor(3.0)
    assert dist.check_shardable(ft.clip_by_global_norm(bound)).leading_clip is bound


def test_custom_transform_declared_elementwise():
    custom = ft.GradientTransformation(lambda p: ft.EmptyState(), lambda u, s, p=None: (u, s))
    with pytest.raises(dist.ShardingError, match="custom transform"):
        dist.check_shardable(custom)
    marked = dist.elementwise(custom)
    assert dist.check_shardable(ft.chain(marked, ft.adam(0.1))).transforms[1] == "elementwise"
    u, _ = marked.update({"w": torch.ones(1)}, ft.EmptyState())
    assert u["w"].item() == 1.0
    with pytest.raises(TypeError, match="GradientTransformation"):
        dist.elementwise(object())


def test_not_a_transform():
    with pytest.raises(TypeError, match="GradientTransformation"):
        dist.check_shardable(lambda g: g)


@pytest.mark.parametrize(
    "tx",
    [
        ft.dp_noisy_mean(1.0, 1.0, 8.0, seed=0),
        ft.chain(ft.differentially_private_aggregate(1.0, 1.0, seed=0), ft.sgd(0.1)),
        ft.noisy_sgd(0.1),
    ],
    ids=["dp_noisy_mean", "dp_aggregate_in_chain", "noisy_sgd"],
)
def test_noise_transforms_cannot_be_declared_elementwise(tx):
    """Noise is drawn by position inside each parameter: wrapped in elementwise(), a noise
    transform is not told where its pieces sit, so every rank would draw from the same positions
    of the same stream (correlated DP noise weakens the privacy guarantee). Unwrapped,
    add_noise and dp_noisy_mean are told (shard_index: tests/distributed/test_zero_noise.py);
    differentially_private_aggregate stays refused (it takes per-example gradients)."""
    with pytest.raises(ValueError, match=r"elementwise\(tx\): tx contains .*noise"):
        dist.elementwise(tx)
