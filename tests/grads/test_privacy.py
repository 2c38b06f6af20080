import math

import pytest
import torch
from grad_problems import PROBLEMS, cnn_problem, mlp_problem, naive_per_sample
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import tree
from functrain.testing import assert_trees_all_close, assert_trees_all_equal


def _clip_reference(ps, clip):
    """Σᵢ gᵢ·min(1, C/‖gᵢ‖), by hand from the per-sample gradients, one example at a time."""
    n = tree.leaves(ps)[0].shape[0]
    total, clipped = tree.zeros_like(tree.map(lambda g: g[0], ps)), 0
    for i in range(n):
        gi = tree.map(lambda g, i=i: g[i], ps)
        norm = math.sqrt(sum(float((x**2).sum()) for x in tree.leaves(gi)))
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped += factor < 1.0
        total = tree.add(total, tree.scale(factor, gi))
    return total, clipped


def test_per_example_global_norm_clip_optax_examples():
    g = [torch.tensor([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    s, n = ft.per_example_global_norm_clip(g, math.inf)
    assert torch.equal(s[0], torch.tensor([7.0, 7.0, 7.0])) and int(n) == 0
    s, n = ft.per_example_global_norm_clip(g, 0.0)
    assert torch.equal(s[0], torch.zeros(3)) and int(n) == 3
    s, n = ft.per_example_global_norm_clip(g, 1.25)
    assert torch.allclose(s[0], torch.tensor([1.75, 1.75, 1.75])) and int(n) == 3


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_clipped_grad_sum_equals_reference(name):
    loss_fn, params, batch = PROBLEMS[name]()
    ps = naive_per_sample(loss_fn, params, batch)
    norms = ft.per_sample_norms(ps).global_norm
    ordered = norms.sort().values
    half = len(ordered) // 2
    clip = float(ordered[half - 1] + ordered[half]) / 2  # half clipped, none at the boundary
    expected, expected_clipped = _clip_reference(ps, clip)
    out = ft.clipped_grad_sum(loss_fn, params, batch, clip, chunk_size=3)
    assert_trees_all_close(out.grad_sum, expected, rtol=1e-10, atol=1e-14)
    assert int(out.num_clipped) == expected_clipped
    n = tree.leaves(batch)[0].shape[0]
    assert out.count == n
    assert math.isclose(float(out.loss_sum), float(loss_fn(params, batch)) * n, rel_tol=1e-10)
    assert_trees_all_close(
        ft.per_example_global_norm_clip(ps, clip)[0], expected, rtol=1e-10, atol=1e-14
    )


@given(chunk_size=st.one_of(st.none(), st.integers(1, 8)), clip=st.floats(0.0, 3.0))
def test_clipped_grad_sum_chunked_equals_unchunked(chunk_size, clip):
    loss_fn, params, batch = mlp_problem(7)
    full = ft.clipped_grad_sum(loss_fn, params, batch, clip)
    chunked = ft.clipped_grad_sum(loss_fn, params, batch, clip, chunk_size=chunk_size)
    assert_trees_all_close(chunked.grad_sum, full.grad_sum, rtol=1e-10, atol=1e-14)
    assert int(chunked.num_clipped) == int(full.num_clipped)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_dpsgd_step_equals_hand_reference_noise_off(momentum):
    loss_fn, params, batch = cnn_problem(6)
    lr, clip = 0.1, 0.5
    tx = ft.dpsgd(lr, l2_norm_clip=clip, noise_multiplier=0.0, seed=3, momentum=momentum)
    state = tx.init(params)
    p = params
    velocity = tree.zeros_like(params)
    ref = params
    for _ in range(3):
        updates, state = tx.update(ft.per_sample_grads(loss_fn, p, batch), state, p)
        p = ft.apply_updates(p, updates)
        # By hand: per-example loop, clip, sum, divide by B, momentum, SGD.
        clipped_sum, _ = _clip_reference(naive_per_sample(loss_fn, ref, batch), clip)
        g = tree.scale(1.0 / 6, clipped_sum)
        velocity = tree.add(tree.scale(momentum, velocity), g) if momentum else g
        ref = tree.map(lambda x, v: x - lr * v, ref, velocity)
        assert_trees_all_close(p, ref, rtol=1e-10, atol=1e-14)


def test_micro_batch_accumulation_equals_full_batch_noise_off():
    loss_fn, params, batch = mlp_problem(7)
    clip = 0.3
    full_tx = ft.dpsgd(0.1, clip, 0.0, seed=0)
    full, _ = full_tx.update(
        ft.per_sample_grads(loss_fn, params, batch), full_tx.init(params), params
    )
    # Clip per sample in each micro-batch, sum across micro-batches, normalize once.
    parts = [tree.map(lambda x, s=s: x[s], batch) for s in (slice(0, 3), slice(3, 4), slice(4, 7))]
    sums = [ft.clipped_grad_sum(loss_fn, params, b, clip, chunk_size=2) for b in parts]
    total = tree.add(*[s.grad_sum for s in sums])
    tx = ft.chain(ft.dp_noisy_mean(clip, 0.0, expected_batch_size=7, seed=0), ft.sgd(0.1))
    acc, _ = tx.update(total, tx.init(params), params)
    assert_trees_all_close(acc, full, rtol=1e-10, atol=1e-15)


def _noise_only(tx, params, steps=1):
    state = tx.init(params)
    outs = []
    for _ in range(steps):
        u, state = tx.update(tree.zeros_like(params), state, params)
        outs.append(u)
    return outs, state


def test_noise_scale_and_reproducibility():
    clip, sigma, b = 0.7, 1.3, 8.0
    params = {"w": torch.zeros(200, 250), "b": torch.zeros(1000)}
    tx = ft.dp_noisy_mean(clip, sigma, expected_batch_size=b, seed=42)
    (u1, u2), state = _noise_only(tx, params, steps=2)
    expected_std = sigma * clip / b
    for u in (u1, u2):
        z = torch.cat([x.reshape(-1) for x in tree.leaves(u)])
        # 51000 draws: the sample std is within ~0.3% of the truth (1 s.e.), mean near 0.
        assert abs(float(z.std()) / expected_std - 1) < 0.02
        assert abs(float(z.mean())) < 5 * expected_std / math.sqrt(z.numel())
    assert not torch.equal(u1["w"], u2["w"])  # a fresh draw each step
    assert not torch.equal(u1["w"].reshape(-1)[:1000], u1["b"])  # leaves get different noise
    (v1, v2), _ = _noise_only(ft.dp_noisy_mean(clip, sigma, b, seed=42), params, steps=2)
    assert_trees_all_equal(u1, v1)
    assert_trees_all_equal(u2, v2)
    (w1,), _ = _noise_only(ft.dp_noisy_mean(clip, sigma, b, seed=43), params)
    assert not torch.equal(u1["w"], w1["w"])
    assert state.rng_key.device.type == "cpu" and state.rng_key.dtype == torch.int64


def test_dpsgd_noise_on_std_and_no_global_rng():
    clip, sigma, n = 2.0, 0.5, 4
    params = {"w": torch.zeros(20000)}
    per_example = {"w": torch.zeros(n, 20000)}
    tx = ft.differentially_private_aggregate(clip, sigma, seed=0)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    u, _ = tx.update(per_example, tx.init(params))
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is untouched
    assert abs(float(u["w"].std()) / (sigma * clip / n) - 1) < 0.03
    u_again, _ = tx.update(per_example, tx.init(params))
    assert_trees_all_equal(u, u_again)


def test_update_does_not_mutate_inputs():
    loss_fn, params, batch = mlp_problem(4)
    ps = ft.per_sample_grads(loss_fn, params, batch)
    ps_copy = tree.map(torch.clone, ps)
    tx = ft.dpsgd(0.1, 1.0, 1.0, seed=5, momentum=0.9)
    state = tx.init(params)
    key_before = state[0].rng_key.clone()
    tx.update(ps, state, params)
    assert_trees_all_equal(ps, ps_copy)
    assert torch.equal(state[0].rng_key, key_before)


def test_seed_as_tensor_and_bad_seed():
    params = [torch.zeros(10)]
    a = _noise_only(ft.dp_noisy_mean(1.0, 1.0, 2, seed=torch.tensor(7)), params)[0]
    b = _noise_only(ft.dp_noisy_mean(1.0, 1.0, 2, seed=torch.tensor(7)), params)[0]
    c = _noise_only(ft.dp_noisy_mean(1.0, 1.0, 2, seed=torch.tensor(8)), params)[0]
    assert_trees_all_equal(a, b)
    assert not torch.equal(a[0][0], c[0][0])
    # A state's key resumes the stream: the second draw from seed 3 is the first from its key.
    tx = ft.dp_noisy_mean(1.0, 1.0, 2, seed=3)
    (_, second), _ = _noise_only(tx, params, steps=2)
    state0 = tx.init(params)
    _, state_after_one = tx.update(tree.zeros_like(params), state0, params)
    (resumed,), _ = _noise_only(ft.dp_noisy_mean(1.0, 1.0, 2, seed=state_after_one.rng_key), params)
    assert_trees_all_equal(resumed, second)
    with pytest.raises(ValueError, match="0-d integer"):
        ft.dp_noisy_mean(1.0, 1.0, 2, seed=torch.tensor([7]))
    with pytest.raises(TypeError, match="seed"):
        ft.dp_noisy_mean(1.0, 1.0, 2, seed=1.5)
    with pytest.raises(ValueError, match="expected_batch_size"):
        ft.dp_noisy_mean(1.0, 1.0, 0, seed=0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        ft.dpsgd(0.1, 1.0, -1.0, seed=0)
    with pytest.raises(ValueError, match="leading batch dimension"):
        ft.per_example_global_norm_clip([torch.ones(3, 2), torch.ones(2)], 1.0)
