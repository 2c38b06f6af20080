"""Weight decay and gradient noise; the keyed generator behind the noise."""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft
from functrain import testing
from functrain.optim import _prng


def _tree(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}


def test_add_decayed_weights_number_and_tensor() -> None:
    g, p = _tree(0), _tree(1)
    u, _ = ft.add_decayed_weights(0.1).update(g, ft.EmptyState(), p)
    testing.assert_trees_all_close(u, {k: g[k] + 0.1 * p[k] for k in g}, rtol=1e-6)
    rate = torch.tensor(0.1)
    tx = ft.add_decayed_weights(rate)
    rate.fill_(0.3)
    u, _ = tx.update(g, tx.init(p), p)
    testing.assert_trees_all_close(u, {k: g[k] + 0.3 * p[k] for k in g}, rtol=1e-6)


def test_add_decayed_weights_schedule_counts_steps() -> None:
    g, p = _tree(0), _tree(1)
    tx = ft.add_decayed_weights(lambda count: 0.1 * (count + 1))
    state = tx.init(p)
    assert isinstance(state, ft.WeightDecayScheduleState)
    for step in range(3):
        u, state = tx.update(g, state, p)
        testing.assert_trees_all_close(u, {k: g[k] + 0.1 * (step + 1) * p[k] for k in g}, rtol=1e-6)
    assert int(state.count) == 3


def test_add_decayed_weights_mask() -> None:
    g, p = _tree(0), _tree(1)
    tx = ft.add_decayed_weights(0.5, mask={"w": True, "b": False})
    u, _ = tx.update(g, tx.init(p), p)
    testing.assert_trees_all_close(u, {"w": g["w"] + 0.5 * p["w"], "b": g["b"]}, rtol=1e-6)
    tx = ft.add_decayed_weights(0.5, mask=lambda params: ft.tree.map(lambda x: x.dim() > 1, params))
    u2, _ = tx.update(g, tx.init(p), p)
    testing.assert_trees_all_equal(u2, u)


def test_add_decayed_weights_needs_params() -> None:
    g = _tree()
    with pytest.raises(ValueError, match="params"):
        ft.add_decayed_weights(0.1).update(g, ft.EmptyState())
    with pytest.raises(ft.tree.TreeMismatchError, match=r"\['b'\]"):
        ft.add_decayed_weights(0.1).update(g, ft.EmptyState(), {"w": g["w"], "b": torch.ones(2)})


def _noise(tx, shape=(4000,), steps=1, params=None):
    params = params if params is not None else {"w": torch.zeros(shape)}
    state = tx.init(params)
    outs = []
    for _ in range(steps):
        u, state = tx.update(ft.tree.zeros_like(params), state)
        outs.append(u)
    return outs, state


def test_add_noise_is_reproducible_and_keyed() -> None:
    a, sa = _noise(ft.add_noise(0.01, 0.55, key=7), steps=3)
    b, sb = _noise(ft.add_noise(0.01, 0.55, key=7), steps=3)
    c, _ = _noise(ft.add_noise(0.01, 0.55, key=8), steps=3)
    d, _ = _noise(ft.add_noise(0.01, 0.55, seed=7), steps=3)
    testing.assert_trees_all_equal(a, b)
    testing.assert_trees_all_equal(a, d)
    assert not torch.equal(a[0]["w"], c[0]["w"])
    assert not torch.equal(a[0]["w"], a[1]["w"] * math.sqrt(2**0.55))  # fresh noise per step
    testing.assert_trees_all_equal(sa, sb)
    # Resuming from a saved state reproduces the rest of the sequence.
    tx = ft.add_noise(0.01, 0.55, key=7)
    state = tx.init({"w": torch.zeros(4000)})
    _, state = tx.update({"w": torch.zeros(4000)}, state)
    resumed, _ = tx.update({"w": torch.zeros(4000)}, ft.tree.map(torch.clone, state))
    testing.assert_trees_all_equal(resumed, a[1])
    # A tensor key (e.g. taken from a state) works like an int key.
    e, _ = _noise(ft.add_noise(0.01, 0.55, key=sa.rng_key), steps=1)
    assert e[0]["w"].shape == (4000,)


def test_add_noise_statistics_follow_the_annealed_variance() -> None:
    eta, gamma = 0.04, 0.55
    outs, _ = _noise(ft.add_noise(eta, gamma, key=0), shape=(20000,), steps=3)
    for t, u in enumerate(outs, start=1):
        sigma = math.sqrt(eta / t**gamma)
        z = u["w"].double() / sigma
        assert abs(float(z.mean())) < 0.03
        assert abs(float(z.std()) - 1.0) < 0.03
        # Tail mass beyond 2 sigma of a standard normal is 4.55%.
        assert abs(float((z.abs() > 2).double().mean()) - 0.0455) < 0.008
    # Leaves are independent streams, steps too.
    corr = torch.corrcoef(torch.stack([outs[0]["w"], outs[1]["w"]]))[0, 1]
    assert abs(float(corr)) < 0.05


def test_add_noise_leaves_are_distinct_and_dtypes_kept() -> None:
    params = {
        "a": torch.zeros(500),
        "b": torch.zeros(500),
        "h": torch.zeros(8, dtype=torch.bfloat16),
    }
    outs, state = _noise(ft.add_noise(1.0, 0.0, key=3), params=params)
    assert not torch.equal(outs[0]["a"], outs[0]["b"])
    assert outs[0]["h"].dtype == torch.bfloat16
    assert state.rng_key.dtype == torch.int64 and int(state.count) == 1


def test_add_noise_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one of key and seed"):
        ft.add_noise(0.1, 0.5, key=1, seed=2)
    with pytest.raises(ValueError, match="key"):
        ft.add_noise(0.1, 0.5, key=torch.tensor(1.5))
    with pytest.raises(ValueError, match="eta"):
        ft.add_noise(-0.1, 0.5)


def test_prng_mix_is_a_bijection_on_a_sample_and_uniform() -> None:
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537 % (1 << 32)
    h = _prng.mix32(x)
    assert int(h.min()) >= 0 and int(h.max()) < 1 << 32
    assert h.unique().numel() == x.numel()
    # Python ints and tensors hash alike.
    assert [int(v) for v in h[:5]] == [_prng.mix32(int(v)) for v in x[:5]]
    u = h.double() / 2**32
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert float(counts.min()) > 0.9 * x.numel() / 16
    assert _prng.make_key(2**70 + 5) != _prng.make_key(5)
    assert _prng.make_key(-5) != _prng.make_key(5)
