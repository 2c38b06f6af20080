"""make_train_step(per_example_clip=C) checks that ``tx`` turns the clipped sum into DP-SGD."""

import warnings

import pytest
import torch

import functrain as ft

C = 1.0


def _loss(p, b):
    return (b @ p["w"]).square().mean()


def _make(tx, clip=C):
    return ft.make_train_step(_loss, tx, micro_batches=2, per_example_clip=clip, donate=False)


def test_dpsgd_which_expects_per_example_gradients_is_refused():
    with pytest.raises(ValueError, match=r"differentially_private_aggregate.*clipped sum"):
        _make(ft.dpsgd(learning_rate=0.1, l2_norm_clip=C, noise_multiplier=1.0, seed=0))
    aggregate = ft.differentially_private_aggregate(C, 1.0, seed=0)
    with pytest.raises(ValueError, match="dp_noisy_mean"):
        _make(ft.chain(aggregate, ft.sgd(0.1)))


def test_a_transform_before_the_noise_is_refused():
    # scale(10) before the noise makes the sum's sensitivity 10·C while the noise is σ·C.
    noisy = ft.dp_noisy_mean(C, 1.0, expected_batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"first transform.*position 1"):
        _make(ft.chain(ft.scale(10.0), noisy, ft.sgd(0.1)))
    with pytest.raises(ValueError, match="first transform"):
        _make(ft.chain(ft.clip_by_global_norm(1.0), ft.chain(noisy, ft.sgd(0.1))))


def test_noise_calibrated_to_another_clipping_norm_is_refused():
    tx = ft.chain(ft.dp_noisy_mean(0.5, 1.0, expected_batch_size=4, seed=0), ft.sgd(0.1))
    with pytest.raises(ValueError, match=r"per_example_clip=1.0 .* l2_norm_clip=0.5"):
        _make(tx)


def test_no_noise_transform_warns_that_the_step_is_not_dp():
    with pytest.warns(UserWarning, match="adds no noise"):
        _make(ft.sgd(0.1))


@pytest.mark.parametrize(
    "tx",
    [
        ft.chain(ft.dp_noisy_mean(C, 1.1, expected_batch_size=4, seed=0), ft.adam(1e-3)),
        ft.named_chain(
            ("noise", ft.dp_noisy_mean(C, 0.0, expected_batch_size=4, seed=0)),
            ("opt", ft.sgd(0.1, momentum=0.9)),
        ),
        ft.chain(ft.chain(ft.dp_noisy_mean(1, 1.1, expected_batch_size=4, seed=0)), ft.sgd(0.1)),
        # A tensor clipping norm may change in place between steps: not compared.
        ft.chain(
            ft.dp_noisy_mean(torch.tensor(2.0), 1.1, expected_batch_size=4, seed=0), ft.sgd(0.1)
        ),
    ],
    ids=["chain", "named_chain", "nested_int_clip", "tensor_clip"],
)
def test_the_recipe_is_accepted_silently_and_trains(tx):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step = _make(tx)
    params = {"w": torch.ones(3, dtype=torch.float64)}
    state, metrics = step(ft.TrainState.create(params=params, tx=tx), torch.ones(4, 3).double())
    assert int(state.step) == 1 and torch.isfinite(metrics["loss"])
