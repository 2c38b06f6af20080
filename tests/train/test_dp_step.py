"""make_train_step(per_example_clip=C): the DP-SGD step against a per-example loop by hand."""

import pytest
import torch

import functrain as ft

C, LR = 0.5, 0.3


def _problem():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model, params, _ = ft.functionalize(net.double())

    def loss_fn(p, b):
        return torch.nn.functional.cross_entropy(model(p, b["x"]), b["y"])

    def batch(n, seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 5, generator=gen, dtype=torch.float64) * 3
        return {"x": x, "y": torch.randint(0, 3, (n,), generator=gen)}

    return loss_fn, params, batch


def _reference_step(loss_fn, params, batch, expected_batch):
    """Σᵢ clip(gᵢ, C) by a loop of single-example autograd passes, / B_expected, SGD."""
    names = list(params)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    losses, clipped = [], 0
    for i in range(len(batch["y"])):
        leaves = [params[k].detach().requires_grad_() for k in names]
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(dict(zip(names, leaves)), one)
        grads = torch.autograd.grad(loss, leaves)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        factor = min(1.0, C / float(norm))
        clipped += float(norm) > C
        for k, g in zip(names, grads):
            total[k] += factor * g
        losses.append(float(loss.detach()))
    new = {k: params[k] - LR * total[k] / expected_batch for k in names}
    n = len(losses)
    return new, (sum(losses) / max(n, 1), clipped / max(n, 1))


@pytest.mark.parametrize("micro_batches", [1, 3, 5])
def test_noise_free_dp_steps_equal_clipping_by_hand(micro_batches):
    loss_fn, params, batch = _problem()
    expected = 8.0
    tx = ft.chain(ft.dp_noisy_mean(C, 0.0, expected_batch_size=expected, seed=0), ft.sgd(LR))
    step = ft.make_train_step(loss_fn, tx, micro_batches=micro_batches, per_example_clip=C)
    state = ft.TrainState.create(params=params, tx=tx)
    reference = {k: v.clone() for k, v in params.items()}
    # Poisson batches vary: larger and smaller than K, one example, and empty
    for seed, n in enumerate([9, 7, 2, 1, 0, 13]):
        b = batch(n, seed)
        reference, (loss, fraction) = _reference_step(loss_fn, reference, b, expected)
        state, metrics = step(state, b)
        ft.testing.assert_trees_all_close(state.params, reference, rtol=1e-12, atol=1e-14)
        assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-12, abs=1e-15)
        assert float(metrics["clipped_fraction"]) == pytest.approx(fraction, abs=1e-15)
        assert int(metrics["num_examples"]) == n
        assert "grad_norm" not in metrics  # the norm of the sum before noise is not private
        assert {"update_norm", "param_norm", "skipped"} <= set(metrics)


def test_noisy_dp_step_equals_the_transforms_applied_by_hand():
    loss_fn, params, batch = _problem()
    tx = ft.chain(ft.dp_noisy_mean(C, 1.3, expected_batch_size=6.0, seed=5), ft.adam(0.01))
    step = ft.make_train_step(loss_fn, tx, micro_batches=3, per_example_clip=C, donate=False)
    state = ft.TrainState.create(params=params, tx=tx)
    by_hand, opt_state = params, tx.init(params)
    for seed, n in enumerate([6, 4, 0, 9]):
        b = batch(n, seed)
        state, _ = step(state, b)
        grad_sum = (
            ft.clipped_grad_sum(loss_fn, by_hand, b, C).grad_sum
            if n
            else ft.tree.zeros_like(by_hand)
        )
        updates, opt_state = tx.update(grad_sum, opt_state, by_hand)
        by_hand = ft.apply_updates(by_hand, updates)
        ft.testing.assert_trees_all_close(state.params, by_hand, rtol=1e-10, atol=1e-13)


def test_the_noise_has_the_dp_scale_on_an_empty_batch():
    # No examples: the update is the noise alone, sigma*C/B_expected per coordinate (times lr).
    params = {"w": torch.zeros(200_000, dtype=torch.float64)}
    sigma, expected = 1.7, 10.0
    tx = ft.chain(ft.dp_noisy_mean(C, sigma, expected_batch_size=expected, seed=1), ft.sgd(1.0))
    step = ft.make_train_step(
        lambda p, b: (b @ p["w"]).mean(), tx, micro_batches=2, per_example_clip=C
    )
    state, metrics = step(
        ft.TrainState.create(params=params, tx=tx), torch.zeros(0, 200_000, dtype=torch.float64)
    )
    w = state.params["w"]
    target = sigma * C / expected
    assert float(w.std()) == pytest.approx(target, rel=0.01)  # se of a std: 1/sqrt(2n) = 0.16%
    assert abs(float(w.mean())) < 5 * target / 200_000**0.5
    assert int(metrics["skipped"]) == 0 and float(metrics["loss"]) == 0.0


def test_dropout_in_a_dp_step_is_reproducible_from_the_state_key():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    model, params, _ = ft.functionalize(net)
    loss_fn = lambda p, b: torch.nn.functional.cross_entropy(model(p, b["x"]), b["y"])  # noqa: E731
    tx = ft.chain(ft.dp_noisy_mean(1.0, 0.0, expected_batch_size=6, seed=0), ft.sgd(0.1))
    step = ft.make_train_step(loss_fn, tx, micro_batches=2, per_example_clip=1.0, donate=False)
    state = ft.TrainState.create(params=params, tx=tx, seed=3)
    b = {"x": torch.randn(6, 4), "y": torch.randint(0, 2, (6,))}
    one, _ = step(state, b)
    two, _ = step(state, b)
    ft.testing.assert_trees_all_equal(one.params, two.params)
    other, _ = step(ft.TrainState.create(params=params, tx=tx, seed=4), b)
    assert not torch.equal(other.params["0.weight"], one.params["0.weight"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "vmap"}, "strategy='vmap'"),
        ({"grad_stats": ft.noise_scale_hook()}, "grad_stats"),
        ({"compile": True}, "compile"),
        ({"micro_batches": (2, 2)}, "micro_batches as sizes"),
        ({"loss_scale": ft.DynamicLossScale()}, "loss_scale"),
        ({"per_example_clip": -1.0}, "per_example_clip"),
    ],
)
def test_options_a_dp_step_cannot_honour_are_refused(kwargs, match):
    tx = ft.chain(ft.dp_noisy_mean(1.0, 1.0, expected_batch_size=4, seed=0), ft.sgd(0.1))
    options = {"micro_batches": 2, "per_example_clip": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        ft.make_train_step(lambda p, b: (b @ p["w"]).mean(), tx, **options)


def test_a_loss_with_a_key_parameter_is_refused():
    tx = ft.chain(ft.dp_noisy_mean(1.0, 1.0, expected_batch_size=4, seed=0), ft.sgd(0.1))
    with pytest.raises(ValueError, match="key parameter"):
        ft.make_train_step(lambda p, b, key: (b @ p["w"]).mean(), tx, per_example_clip=1.0)
