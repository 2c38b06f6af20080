import math

import pytest
import torch
from grad_problems import mlp_problem, naive_per_sample
from hypothesis import given
from hypothesis import strategies as st

import functrain as ft
from functrain import tree
from functrain.testing import assert_trees_all_close

DIM = 6


def _truth(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(DIM, generator=g, dtype=torch.float64)
    a = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    sigma = a @ a.T + 0.5 * torch.eye(DIM, dtype=torch.float64)
    return grad, sigma


def _draw(grad, sigma, sizes, draws, seed):
    """ĝᵢ ~ N(G, Σ/bᵢ) directly: shape (draws, K, DIM), and ĝ = Σ bᵢĝᵢ / B."""
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(sigma)
    b = torch.tensor(sizes, dtype=torch.float64)
    z = torch.randn(draws, len(sizes), DIM, generator=g, dtype=torch.float64)
    micro = grad + (z @ chol.T) / b.sqrt()[:, None]
    combined = (b[:, None] * micro).sum(1) / b.sum()
    return micro, combined


@pytest.mark.parametrize("sizes", [[4, 4, 4], [8, 8], [1, 3, 10, 2], [1, 7], [2, 5, 5, 1, 9, 3]])
def test_estimators_unbiased(sizes):
    grad, sigma = _truth()
    draws = 20000
    micro, combined = _draw(grad, sigma, sizes, draws, seed=len(sizes) * 100 + sum(sizes))
    est = ft.noise_scale_estimate((micro**2).sum(-1), torch.tensor(sizes), (combined**2).sum(-1))
    for value, truth in [
        (est.trace_sigma, torch.trace(sigma)),
        (est.grad_sq, grad @ grad),
    ]:
        assert value.shape == (draws,)
        mean, se = value.mean(), value.std() / math.sqrt(draws)
        assert abs(float(mean - truth)) < 3 * float(se), (float(mean), float(truth), float(se))


def test_naive_equal_size_formula_is_biased_for_unequal_sizes():
    # Sanity check of the test's power: plugging the mean size into the equal-size formula is
    # detectably biased, so the unbiasedness test above can tell the difference.
    grad, sigma = _truth()
    sizes, draws = [1, 3, 10, 2], 20000
    micro, combined = _draw(grad, sigma, sizes, draws, seed=7)
    b_mean = sum(sizes) / len(sizes)
    sq = (micro**2).sum(-1)
    naive = (b_mean * sq.sum(-1) - sum(sizes) * (combined**2).sum(-1)) / (len(sizes) - 1)
    se = naive.std() / math.sqrt(draws)
    assert abs(float(naive.mean() - torch.trace(sigma))) > 5 * float(se)


@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    seed=st.integers(0, 10_000),
)
def test_trace_is_weighted_spread_of_pytrees(sizes, seed):
    # Σ bᵢ‖ĝᵢ‖² − B‖ĝ‖² = Σ bᵢ‖ĝᵢ − ĝ‖²: an independent closed form, on real pytrees.
    g = torch.Generator().manual_seed(seed)
    micro = [
        {
            "w": torch.randn(3, 2, generator=g, dtype=torch.float64),
            "b": torch.randn(2, generator=g, dtype=torch.float64),
        }
        for _ in sizes
    ]
    total = sum(sizes)
    combined = tree.scale(
        1.0 / total, tree.add(*[tree.scale(float(b), m) for b, m in zip(sizes, micro)])
    )
    sq_norms = [tree.norm(m, squared=True) for m in micro]
    est = ft.noise_scale_estimate(sq_norms, sizes, tree.norm(combined, squared=True))
    spread = sum(
        b * float(tree.norm(tree.sub(m, combined), squared=True)) for b, m in zip(sizes, micro)
    )
    assert math.isclose(float(est.trace_sigma), spread / (len(sizes) - 1), rel_tol=1e-9)
    assert math.isclose(
        float(est.grad_sq),
        float(tree.norm(combined, squared=True)) - spread / (len(sizes) - 1) / total,
        rel_tol=1e-9,
        abs_tol=1e-12,
    )


def test_estimate_needs_two_micro_batches():
    with pytest.raises(ValueError, match="K >= 2"):
        ft.noise_scale_estimate([torch.tensor(1.0)], [4], torch.tensor(1.0))


def test_from_moments_equals_per_example_micro_batches():
    loss_fn, params, batch = mlp_problem(7)
    ps = naive_per_sample(loss_fn, params, batch)
    m = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=3)
    got = ft.noise_scale_from_moments(m)
    sq = torch.stack([tree.norm(tree.map(lambda g, i=i: g[i], ps), squared=True) for i in range(7)])
    mean = tree.map(lambda g: g.mean(0), ps)
    expected = ft.noise_scale_estimate(sq, torch.ones(7), tree.norm(mean, squared=True))
    assert_trees_all_close(got, expected, rtol=1e-9)


def test_gradient_diversity():
    loss_fn, params, batch = mlp_problem(7)
    ps = naive_per_sample(loss_fn, params, batch)
    flat = torch.cat([x.reshape(7, -1) for x in tree.leaves(ps)], 1)
    expected = (flat**2).sum() / (flat.sum(0) ** 2).sum()
    m = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=2)
    assert math.isclose(float(ft.gradient_diversity_from_moments(m)), float(expected), rel_tol=1e-9)
    assert math.isclose(
        float(ft.gradient_diversity((flat**2).sum(1), (flat.sum(0) ** 2).sum())),
        float(expected),
        rel_tol=1e-12,
    )
    # Micro-batches [0:2], [2:7] given as mean gradients and sizes: diversity of their sums.
    sizes = [2, 5]
    sums = [flat[:2].sum(0), flat[2:].sum(0)]
    means = [s / b for s, b in zip(sums, sizes)]
    combined = flat.mean(0)
    expected_mb = sum((s**2).sum() for s in sums) / (flat.sum(0) ** 2).sum()
    got = ft.gradient_diversity([(x**2).sum() for x in means], (combined**2).sum(), sizes)
    assert math.isclose(float(got), float(expected_mb), rel_tol=1e-12)


def test_mean_pairwise_cosine_matches_tree_gram():
    g = torch.Generator().manual_seed(0)
    trees = [
        {
            "a": torch.randn(4, generator=g, dtype=torch.float64),
            "b": torch.randn(2, 2, generator=g, dtype=torch.float64),
        }
        for _ in range(5)
    ]
    trees[3] = tree.zeros_like(trees[3])  # a zero gradient: cosine 0 with everything
    acc = ft.cosine_accumulator_init(trees[0])
    for i, t in enumerate(trees):
        # Pass the squared norm for some (as a train step that already has it would).
        acc = ft.cosine_accumulator_add(acc, t, tree.norm(t, squared=True) if i % 2 else None)
    cos = ft.tree_gram(trees, cosine=True)
    k = len(trees)
    expected = (cos.sum() - cos.diagonal().sum()) / (k * (k - 1))
    assert math.isclose(float(ft.mean_pairwise_cosine(acc)), float(expected), rel_tol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        ft.mean_pairwise_cosine(
            ft.cosine_accumulator_add(ft.cosine_accumulator_init(trees[0]), trees[0])
        )


def test_ema_by_hand():
    decay = 0.9
    inputs = [(5.0, 1.0), (7.0, 2.0), (3.0, 0.5)]
    state = ft.noise_scale_init(dtype=torch.float64)
    ema_s = ema_g = 0.0
    for t, (s, g) in enumerate(inputs, 1):
        est = ft.NoiseScaleEstimate(
            torch.tensor(s, dtype=torch.float64), torch.tensor(g, dtype=torch.float64)
        )
        state, metrics = ft.noise_scale_metrics(state, est, decay=decay)
        ema_s = decay * ema_s + (1 - decay) * s
        ema_g = decay * ema_g + (1 - decay) * g
        assert int(state.count) == t
        assert math.isclose(float(metrics["noise_scale/b_simple"]), ema_s / ema_g, rel_tol=1e-12)
        assert math.isclose(
            float(metrics["noise_scale/trace_sigma"]), ema_s / (1 - decay**t), rel_tol=1e-12
        )
        assert math.isclose(
            float(metrics["noise_scale/grad_sq"]), ema_g / (1 - decay**t), rel_tol=1e-12
        )
    assert math.isclose(float(ft.simple_noise_scale(state)), ema_s / ema_g, rel_tol=1e-12)


def test_ema_with_tensor_decay_and_constant_input():
    state = ft.noise_scale_init()
    est = ft.NoiseScaleEstimate(torch.tensor(6.0), torch.tensor(2.0))
    for _ in range(3):
        state, metrics = ft.noise_scale_metrics(state, est, decay=torch.tensor(0.5))
    # Bias correction makes a constant input come back exactly.
    assert torch.allclose(metrics["noise_scale/trace_sigma"], torch.tensor(6.0))
    assert torch.allclose(metrics["noise_scale/b_simple"], torch.tensor(3.0))


def test_b_simple_tracks_truth_on_synthetic_stream():
    grad, sigma = _truth(1)
    sizes = [2, 6, 3, 5]
    micro, combined = _draw(grad, sigma, sizes, 3000, seed=11)
    state = ft.noise_scale_init(dtype=torch.float64)
    b = torch.tensor(sizes)
    for i in range(micro.shape[0]):
        est = ft.noise_scale_estimate((micro[i] ** 2).sum(-1), b, (combined[i] ** 2).sum())
        state = ft.noise_scale_update(state, est, decay=0.999)
    truth = float(torch.trace(sigma) / (grad @ grad))
    assert math.isclose(float(ft.simple_noise_scale(state)), truth, rel_tol=0.15)


@pytest.mark.parametrize(
    ("strategy", "micro_batches"), [("loop", [4, 1, 5]), ("loop", 2), ("vmap", 5)]
)
def test_noise_scale_hook_in_train_step(strategy, micro_batches):
    loss_fn, params, batch = mlp_problem(10)
    sizes = (
        micro_batches if isinstance(micro_batches, list) else [10 // micro_batches] * micro_batches
    )
    decay = 0.5
    step = ft.make_train_step(
        loss_fn,
        ft.sgd(0.05),
        micro_batches=micro_batches,
        strategy=strategy,
        grad_stats=ft.noise_scale_hook(decay=decay),
    )
    state = ft.TrainState.create(params=params, tx=ft.sgd(0.05))
    ema_s = ema_g = 0.0
    for t in (1, 2):
        # Reference: each micro-batch's gradient by plain autograd, then the formulas by hand.
        p = state.params
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        micro = [
            torch.func.grad(loss_fn)(p, tree.map(lambda x, s=s, b=b: x[s : s + b], batch))
            for s, b in zip(starts, sizes)
        ]
        total = sum(sizes)
        combined = tree.scale(
            1.0 / total, tree.add(*[tree.scale(float(b), g) for b, g in zip(sizes, micro)])
        )
        c2 = float(tree.norm(combined, squared=True))
        sq = [float(tree.norm(g, squared=True)) for g in micro]
        trace = (sum(b * s for b, s in zip(sizes, sq)) - total * c2) / (len(sizes) - 1)
        grad_sq = c2 - trace / total
        diversity = sum(b * b * s for b, s in zip(sizes, sq)) / (total**2 * c2)
        ema_s = decay * ema_s + (1 - decay) * trace
        ema_g = decay * ema_g + (1 - decay) * grad_sq
        state, metrics = step(state, batch)
        got = {k: float(v) for k, v in metrics.items() if k.startswith("noise_scale/")}
        assert math.isclose(got["noise_scale/trace_sigma"], ema_s / (1 - decay**t), rel_tol=1e-6)
        assert math.isclose(got["noise_scale/grad_sq"], ema_g / (1 - decay**t), rel_tol=1e-6)
        assert math.isclose(got["noise_scale/b_simple"], ema_s / ema_g, rel_tol=1e-6)
        assert math.isclose(got["noise_scale/gradient_diversity"], diversity, rel_tol=1e-6)
