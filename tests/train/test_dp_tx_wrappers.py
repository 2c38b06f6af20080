"""make_train_step(per_example_clip=C) sees through wrappers of dp_noisy_mean, or names them.

A wrapper either passes the check, and then the step's update of a zero-gradient model is the
noise alone, ``-lr · σ·C·ξ / B`` (its standard deviation checked against ``σ·C/B`` computed by
hand), or it is refused with an error naming the wrapper.
"""

import math
import warnings

import pytest
import torch

import functrain as ft

C, SIGMA, B = 0.5, 1.3, 4.0
N = 2000  # noise elements per seed


def _zero_grad_loss(p, b):
    # Zero per-example gradients: the clipped sum is 0 and the update is the noise alone.
    return (p["w"] * 0.0).sum() + b.sum() * 0.0


def _make(tx):
    return ft.make_train_step(
        _zero_grad_loss, tx, micro_batches=2, per_example_clip=C, donate=False
    )


def _noisy(seed, clip=C):
    return ft.dp_noisy_mean(clip, SIGMA, expected_batch_size=B, seed=seed)


def _sigma_schedule(count):
    # A constant schedule written with tensor ops: the check evaluates it at step 0.
    return torch.full((), SIGMA, dtype=torch.float64) + 0.0 * count


ACCEPTED = {
    "inject_hyperparams": lambda s: ft.chain(
        ft.inject_hyperparams(ft.dp_noisy_mean)(C, SIGMA, expected_batch_size=B, seed=s),
        ft.sgd(1.0),
    ),
    "inject_hyperparams_scheduled_sigma": lambda s: ft.chain(
        ft.inject_hyperparams(ft.dp_noisy_mean)(
            l2_norm_clip=C, noise_multiplier=_sigma_schedule, expected_batch_size=B, seed=s
        ),
        ft.sgd(1.0),
    ),
    "apply_if_finite": lambda s: ft.apply_if_finite(ft.chain(_noisy(s), ft.sgd(1.0)), 3),
    "apply_if_finite_named_chain": lambda s: ft.apply_if_finite(
        ft.named_chain(("noise", _noisy(s)), ("opt", ft.sgd(1.0))), 3
    ),
    "zero_nans_first": lambda s: ft.chain(ft.zero_nans(), _noisy(s), ft.sgd(1.0)),
    "nested_wrappers": lambda s: ft.apply_if_finite(
        ft.chain(
            ft.chain(ft.inject_hyperparams(ft.dp_noisy_mean)(C, SIGMA, B, seed=s)),
            ft.sgd(1.0),
        ),
        1,
    ),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_wrapper_seen_through_is_accepted_and_adds_noise_of_the_right_scale(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "adds no noise" warning
        steps = [(s, _make(ACCEPTED[name](s))) for s in range(4)]
    noise = []
    for seed, step in steps:
        params = {"w": torch.zeros(N, dtype=torch.float64)}
        tx = ACCEPTED[name](seed)
        state, _ = step(ft.TrainState.create(params=params, tx=tx), torch.ones(3, 2).double())
        noise.append(-state.params["w"])  # sgd(1.0): w = -(0 + σCξ)/B
    noise = torch.cat(noise)
    n = noise.numel()
    expected = SIGMA * C / B
    # The sample standard deviation of n normals has standard error ≈ s / sqrt(2(n - 1)).
    std = float(noise.std())
    assert abs(std - expected) < 3 * expected / math.sqrt(2 * (n - 1)), (std, expected)
    assert abs(float(noise.mean())) < 3 * expected / math.sqrt(n)


def test_an_injected_clip_other_than_per_example_clip_is_refused():
    tx = ft.chain(ft.inject_hyperparams(ft.dp_noisy_mean)(2 * C, SIGMA, B, seed=0), ft.sgd(1.0))
    with pytest.raises(ValueError, match=rf"per_example_clip={C} .* l2_norm_clip={2 * C}"):
        _make(tx)


def test_a_scheduled_clip_is_refused():
    tx = ft.inject_hyperparams(ft.dp_noisy_mean)(
        l2_norm_clip=lambda count: C + 0.0 * count,
        noise_multiplier=SIGMA,
        expected_batch_size=B,
        seed=0,
    )
    with pytest.raises(ValueError, match=r"inject_hyperparams\(dp_noisy_mean\).*scheduled"):
        _make(ft.chain(tx, ft.sgd(1.0)))


def test_an_injected_dpsgd_is_refused_as_per_example():
    tx = ft.inject_hyperparams(ft.dpsgd)(
        learning_rate=0.1, l2_norm_clip=C, noise_multiplier=SIGMA, seed=0
    )
    with pytest.raises(ValueError, match="differentially_private_aggregate"):
        _make(tx)


REFUSED = {
    "MultiSteps": (
        lambda: ft.MultiSteps(ft.chain(_noisy(0), ft.sgd(1.0)), every_k_schedule=2),
        r"MultiSteps.*micro_batches=k",
    ),
    "MultiSteps_gradient_transformation": (
        lambda: ft.MultiSteps(ft.chain(_noisy(0), ft.sgd(1.0)), 2).gradient_transformation(),
        r"MultiSteps.*micro_batches=k",
    ),
    "apply_if_finite_MultiSteps": (
        lambda: ft.apply_if_finite(
            ft.MultiSteps(ft.chain(_noisy(0), ft.sgd(1.0)), 2).gradient_transformation(), 2
        ),
        r"MultiSteps.*micro_batches=k",
    ),
    "partition": (
        lambda: ft.partition(
            {"noisy": ft.chain(_noisy(0), ft.sgd(1.0)), "plain": ft.sgd(1.0)},
            {"w": "noisy", "v": "plain"},
        ),
        r"partition \(multi_transform\).*outside the partition",
    ),
    "multi_transform_all_labels": (
        lambda: ft.multi_transform(
            {"a": ft.chain(_noisy(0), ft.sgd(1.0)), "b": ft.chain(_noisy(1), ft.sgd(1.0))},
            {"w": "a", "v": "b"},
        ),
        r"partition \(multi_transform\)",
    ),
    "masked": (
        lambda: ft.chain(ft.masked(_noisy(0), {"w": True, "v": False}), ft.sgd(1.0)),
        r"masked.*outside the mask",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_wrapper_that_breaks_the_accounting_is_refused_by_name(name):
    build, message = REFUSED[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not the misleading "adds no noise" warning
        with pytest.raises(
            ValueError, match=rf"per_example_clip: tx wraps dp_noisy_mean in {message}"
        ):
            _make(build())


@pytest.mark.parametrize(
    "tx",
    [
        # Wrappers after the noise act on already-private updates: post-processing.
        ft.chain(_noisy(0), ft.MultiSteps(ft.sgd(1.0), 2).gradient_transformation()),
        ft.chain(_noisy(0), ft.partition({"a": ft.sgd(1.0), "b": ft.adam(1e-3)}, "a")),
        ft.chain(_noisy(0), ft.masked(ft.sgd(1.0), {"w": True})),
    ],
    ids=["MultiSteps_after", "partition_after", "masked_after"],
)
def test_wrappers_after_the_noise_are_accepted(tx):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _make(tx)


def test_a_wrapper_without_noise_still_warns():
    with pytest.warns(UserWarning, match="adds no noise"):
        _make(ft.MultiSteps(ft.sgd(1.0), 2))
    with pytest.warns(UserWarning, match="adds no noise"):
        _make(ft.apply_if_finite(ft.sgd(1.0), 2))
