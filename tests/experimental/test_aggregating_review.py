"""Review tests of functrain.experimental.aggregating: integer per-element updates, and
aggregators combined with functrain's transforms (chain, inject_hyperparams, MultiSteps).

References: numpy float64 means and sums of squared differences, and torch.optim.Adam / SGD
stepping on the mean gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import functrain as ft
from functrain.experimental import aggregating


@pytest.mark.parametrize("axis", [0, (0, 1), -3, ()])
def test_average_of_integer_updates_is_a_float_mean(axis):
    x = torch.arange(24).reshape(2, 3, 4) * 3 - 20
    agg = aggregating.average_per_element_updates(axis)
    out = agg.update({"w": x}, agg.init(None))[0]["w"]
    ref = np.mean(x.numpy().astype(np.float64), axis=axis) if axis != () else x.numpy()
    assert out.dtype == torch.get_default_dtype()
    np.testing.assert_allclose(out.numpy(), ref)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.uint8])
def test_mean_and_sum_sq_diff_of_integer_updates(dtype: torch.dtype):
    x = (torch.tensor([[1, 0], [3, 1], [6, 1], [2, 0]]) % 5).to(dtype)
    agg = aggregating.get_per_element_mean_and_sum_sq_diff_grads()
    (mean, aux), _ = agg.update([x], agg.init(None))
    ref = x.numpy().astype(np.float64)
    np.testing.assert_allclose(mean[0].numpy(), ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(
        aux["sum_sq_diff_grads"][0].numpy(), ((ref - ref.mean(0)) ** 2).sum(0), rtol=1e-6
    )
    assert aux["sample_size"] == 4


def _per_sample(seed: int, batch: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(batch, 2, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(batch, 3, generator=gen, dtype=torch.float64),
    }


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    return {
        "w": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }


def _torch_reference(make_opt, grads_per_step):
    """torch.optim stepping with the given (mean) gradients; returns the parameter trajectory."""
    params = {k: v.clone().requires_grad_(True) for k, v in _params().items()}
    opt = make_opt(list(params.values()))
    out = []
    for g in grads_per_step:
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        out.append({k: p.detach().clone() for k, p in params.items()})
    return out


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_process_accumulating_then_adam_matches_torch_adam(steps: int):
    tx = aggregating.process(
        ft.identity(),
        aggregating.average_incrementally_updates(0, steps),
        ft.chain(ft.identity(), ft.adam(0.1)),
    )
    params = _params()
    state = tx.init(params)
    micro = [_per_sample(i) for i in range(3 * steps)]
    traj = []
    for i, g in enumerate(micro):
        updates, state = tx.update(g, state, params)
        params = ft.apply_updates(params, updates)
        if (i + 1) % steps:
            assert all(not u.any() for u in ft.tree.leaves(updates))
        else:
            traj.append(params)
    means = [
        {k: torch.stack([m[k].mean(0) for m in micro[j : j + steps]]).mean(0) for k in micro[0]}
        for j in range(0, len(micro), steps)
    ]
    ref = _torch_reference(lambda ps: torch.optim.Adam(ps, lr=0.1), means)
    for got, want in zip(traj, ref):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)


def test_chain_inject_hyperparams_and_multisteps_postprocessor():
    # ft.chain(aggregator, ...) and an injected, MultiSteps-wrapped postprocessor: SGD with
    # momentum on the mean gradient, stepping once per two calls (MultiSteps averages).
    inner = ft.inject_hyperparams(ft.sgd)(learning_rate=0.05, momentum=0.9)
    tx = ft.chain(
        aggregating.average_per_element_updates(),
        ft.MultiSteps(inner, every_k_schedule=2).gradient_transformation(),
    )
    params = _params()
    state = tx.init(params)
    grads = [_per_sample(i) for i in range(6)]
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = ft.apply_updates(params, updates)
    pair_means = [
        {k: (grads[j][k].mean(0) + grads[j + 1][k].mean(0)) / 2 for k in grads[0]}
        for j in range(0, 6, 2)
    ]
    ref = _torch_reference(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), pair_means)
    for k in params:
        torch.testing.assert_close(params[k], ref[-1][k], rtol=1e-12, atol=1e-12)


def test_inject_hyperparams_with_static_axis_and_steps():
    tx = ft.inject_hyperparams(
        aggregating.average_incrementally_updates,
        static_args=("per_elt_axis", "accumulation_steps"),
    )(per_elt_axis=0, accumulation_steps=2)
    params = _params()
    state = tx.init(params)
    g1, g2 = _per_sample(1), _per_sample(2)
    u1, state = tx.update(g1, state, params)
    u2, state = tx.update(g2, state, params)
    for k in params:
        assert not u1[k].any()
        want = (g1[k].numpy().mean(0) + g2[k].numpy().mean(0)) / 2
        np.testing.assert_allclose(u2[k].numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("steps", [1, 3])
def test_add_mean_variance_accumulated_equals_full_batch_statistics(steps: int):
    # Equal micro-batches merged with Chan's formula give the full batch's mean and unbiased
    # variance; with ema_decay=0 the bias-corrected EMAs are exactly those.
    tx = aggregating.add_mean_variance_to_opt(ft.sgd(1.0), ema_decay=0.0, accumulation_steps=steps)
    params = _params()
    state = tx.init(params)
    micro = [_per_sample(10 + i, batch=3) for i in range(steps)]
    for g in micro:
        _, state = tx.update(g, state, params)
    mean, var = aggregating.get_unbiased_mean_and_variance_ema(state)
    for k in params:
        full = np.concatenate([m[k].numpy() for m in micro], axis=0)
        np.testing.assert_allclose(mean[k].numpy(), full.mean(0), rtol=1e-12)
        np.testing.assert_allclose(var[k].numpy(), full.var(0, ddof=1), rtol=1e-10)


def test_inject_hyperparams_keeps_an_aliased_int_axis_static():
    # per_elt_axis is annotated with optax's alias MaybeAxis (int | Sequence[int] | None): it
    # was injected as a float64 tensor, which the axis check then refused.
    agg = ft.experimental.aggregating
    plain = agg.average_incrementally_updates(per_elt_axis=0, accumulation_steps=2)
    injected = ft.inject_hyperparams(agg.average_incrementally_updates)(
        per_elt_axis=0, accumulation_steps=2
    )
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    s_plain, s_inj = plain.init(params), injected.init(params)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        per_example = {"w": torch.randn(5, 3, dtype=torch.float64, generator=gen)}
        u_plain, s_plain = plain.update(per_example, s_plain, params)
        u_inj, s_inj = injected.update(per_example, s_inj, params)
        torch.testing.assert_close(u_inj, u_plain, rtol=0, atol=0)
    assert "per_elt_axis" not in s_inj.hyperparams
