"""Adversarial review of DP-SGD noise and the gradient-noise-scale hook.

Randomness is checked statistically with fixed seeds (deterministic tests): sample moments are
compared with their closed forms within a few standard errors.
"""

import math

import pytest
import torch

import functrain as ft
from functrain import tree
from functrain.testing import assert_trees_all_close

F = torch.nn.functional


def _noise_draws(tx, params, steps):
    """The noisy updates of ``steps`` updates of zeros: pure noise, one list per step."""
    state = tx.init(params)
    out = []
    for _ in range(steps):
        u, state = tx.update(tree.zeros_like(params), state, params)
        out.append(tree.leaves(u))
    return out


# --- key reuse ---------------------------------------------------------------------------


def test_noise_never_repeats_across_steps_and_leaves():
    # With the leaf index folded into a 32-bit key, leaf 12 at step 1 and leaf 13 at step 6 of
    # this seed drew the same noise (and so did leaves 13 and 12): a run of T steps with L
    # leaves repeats about (TL)²/2³³ noise vectors, and differencing the two released updates
    # cancels the noise. The seed was found by searching for such a pair.
    params = [torch.zeros(4) for _ in range(32)]
    draws = _noise_draws(ft.dp_noisy_mean(1.0, 1.0, 1.0, seed=186748), params, steps=8)
    rows = torch.stack([leaf for step in draws for leaf in step])  # (8·32, 4)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]


def test_tensor_seed_uses_all_64_bits():
    params = [torch.zeros(64)]
    low = _noise_draws(ft.dp_noisy_mean(1.0, 1.0, 1.0, seed=torch.tensor(5)), params, 1)
    high = _noise_draws(ft.dp_noisy_mean(1.0, 1.0, 1.0, seed=torch.tensor(5 + 2**32)), params, 1)
    assert not torch.equal(low[0][0], high[0][0])
    key = ft.random_key(0)  # a 64-bit train-state key used as the DP seed
    a = _noise_draws(ft.dp_noisy_mean(1.0, 1.0, 1.0, seed=key), params, 1)
    b = _noise_draws(ft.dp_noisy_mean(1.0, 1.0, 1.0, seed=key ^ (1 << 40)), params, 1)
    assert not torch.equal(a[0][0], b[0][0])


def test_saved_key_resumes_stream_after_restore():
    # A checkpointed state's rng_key, passed back as the seed, continues the sequence exactly.
    params = [torch.zeros(16), torch.zeros(3, 5)]
    tx = ft.dp_noisy_mean(1.0, 1.0, 2.0, seed=-3)
    state = tx.init(params)
    expected = []
    for i in range(4):
        u, state = tx.update(tree.zeros_like(params), state, params)
        if i == 1:
            saved = state.rng_key.clone()
        if i >= 2:
            expected.append(u)
    resumed = ft.dp_noisy_mean(1.0, 1.0, 2.0, seed=saved)
    got = _noise_draws(resumed, params, 2)
    for e, g in zip(expected, got):
        for x, y in zip(e, g):
            assert torch.equal(x, y)


# --- the noise distribution ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_noise_is_standard_normal_times_sigma_c_over_expected_batch(dtype):
    clip, sigma, expected_b = 0.8, 1.7, 5.0
    params = [torch.zeros(30000, dtype=dtype), torch.zeros(100, 200, dtype=dtype)]
    draws = _noise_draws(ft.dp_noisy_mean(clip, sigma, expected_b, seed=11), params, steps=3)
    std = sigma * clip / expected_b
    z = torch.cat([x.double().reshape(-1) for step in draws for x in step]) / std
    n = z.numel()  # 150000 draws
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n) + (0.01 if dtype == torch.bfloat16 else 0)
    kurtosis = float((z**4).mean())
    assert abs(kurtosis - 3) < 4 * math.sqrt(96 / n)
    # Tails: P(|z| > 3) = 0.0027 (truncation at ±6.66 is far beyond).
    tail = float((z.abs() > 3).double().mean())
    assert abs(tail - 0.0026998) < 4 * math.sqrt(0.0027 / n)


def test_noise_independent_across_leaves_and_steps():
    n = 20000
    params = [torch.zeros(n), torch.zeros(n), torch.zeros(n)]
    draws = _noise_draws(ft.dp_noisy_mean(1.0, 1.0, 1.0, seed=0), params, steps=3)
    vecs = [x for step in draws for x in step]  # 9 vectors of the same size
    z = torch.stack(vecs).double()
    corr = torch.corrcoef(z)
    off = corr[~torch.eye(len(vecs), dtype=torch.bool)]
    assert float(off.abs().max()) < 5 / math.sqrt(n)
    # Shifted copies (a leaf's noise reappearing at an offset in another) would also be caught.
    for lag in (1, 2, 64):
        c = torch.corrcoef(torch.stack([z[0, lag:], z[3, :-lag]]))[0, 1]
        assert abs(float(c)) < 5 / math.sqrt(n)


def test_noise_on_sum_is_sigma_c_and_divided_by_expected_not_realized_batch():
    loss_fn = lambda p, b: (b["x"] @ p["w"]).mean()  # noqa: E731
    params = {"w": torch.zeros(3000, dtype=torch.float64)}
    batch = {"x": torch.randn(5, 3000, dtype=torch.float64)}  # 5 examples, expected 8
    clip, sigma = 0.5, 2.0
    s = ft.clipped_grad_sum(loss_fn, params, batch, clip)
    quiet = ft.dp_noisy_mean(clip, 0.0, 8, seed=1)
    u0, _ = quiet.update(s.grad_sum, quiet.init(params), params)
    assert_trees_all_close(u0, tree.scale(1 / 8, s.grad_sum), rtol=1e-15, atol=0)
    noisy = ft.dp_noisy_mean(clip, sigma, 8, seed=1)
    u, _ = noisy.update(s.grad_sum, noisy.init(params), params)
    noise = (u["w"] - u0["w"]) * 8
    n = noise.numel()
    assert abs(float(noise.std()) / (sigma * clip) - 1) < 4 / math.sqrt(2 * n)


def test_complex_leaves_get_noise_in_both_parts():
    # A complex parameter's clipped sum has an imaginary part: it must be noised as well.
    params = [torch.zeros(40000, dtype=torch.complex64)]
    (u,) = _noise_draws(ft.dp_noisy_mean(1.0, 1.5, 3.0, seed=2), params, 1)[0:1]
    re, im = u[0].real.double(), u[0].imag.double()
    n, std = re.numel(), 1.5 / 3.0
    for part in (re, im):
        assert abs(float(part.std()) / std - 1) < 4 / math.sqrt(2 * n)
    assert abs(float(torch.corrcoef(torch.stack([re, im]))[0, 1])) < 5 / math.sqrt(n)


def test_half_precision_leaf_with_large_noise_std():
    # σ·C beyond float16's range (and a noisy sum that would overflow before the division).
    params = [torch.zeros(20000, dtype=torch.float16)]
    tx = ft.dp_noisy_mean(1e5, 1.0, 1e4, seed=0)
    (u,) = _noise_draws(tx, params, 1)
    assert u[0].dtype == torch.float16 and bool(torch.isfinite(u[0]).all())
    assert abs(float(u[0].double().std()) / 10.0 - 1) < 0.03


def test_multisteps_recipe_adds_the_noise_once_at_full_scale():
    # MultiSteps averages its K inputs: dp_noisy_mean(C/K, σ, B/K) inside it equals
    # dp_noisy_mean(C, σ, B) on the summed clipped sums (same key, same ξ), as documented.
    k, clip, sigma, b = 3, 0.5, 1.2, 12.0
    params = {"w": torch.zeros(500, dtype=torch.float64)}
    sums = [{"w": torch.randn(500, dtype=torch.float64)} for _ in range(k)]
    ref = ft.chain(ft.dp_noisy_mean(clip, sigma, b, seed=7), ft.sgd(0.1))
    expected, _ = ref.update(tree.add(*sums), ref.init(params), params)
    inner = ft.chain(ft.dp_noisy_mean(clip / k, sigma, b / k, seed=7), ft.sgd(0.1))
    ms = ft.MultiSteps(inner, every_k_schedule=k)
    state = ms.init(params)
    for s in sums:
        u, state = ms.update(s, state, params)
    assert_trees_all_close(u, expected, rtol=1e-12, atol=1e-15)


# --- clipping of the whole tree, with ghost clipping ------------------------------------------


def _tied_lm(p, t):
    return F.cross_entropy(F.linear(F.embedding(t, p["e"]), p["e"]).reshape(-1, 6), t.reshape(-1))


def _tied_mlp(p, x):
    return F.linear(torch.tanh(F.linear(x, p["w"])), p["w"]).square().sum(-1).mean()


_GEN = torch.Generator().manual_seed(5)


@pytest.mark.parametrize(
    "loss_fn,params,batch",
    [
        (
            _tied_lm,
            {"e": torch.randn(6, 3, dtype=torch.float64, generator=_GEN)},
            torch.randint(0, 6, (8, 7), generator=_GEN),
        ),
        (
            _tied_mlp,
            {"w": torch.randn(4, 4, dtype=torch.float64, generator=_GEN)},
            torch.randn(8, 4, dtype=torch.float64, generator=_GEN),
        ),
    ],
    ids=["tied_embedding_lm", "tied_linear"],
)
def test_ghost_clipping_of_tied_weights_matches_per_sample(loss_fn, params, batch):
    # A weight used by two layer calls: each example's gradient is the sum of both uses, so its
    # norm is not the root of the per-use squared norms. Under-estimated norms would under-clip.
    ps = ft.per_sample_grads(loss_fn, params, batch, method="vmap")
    norms = ft.per_sample_norms(ps).global_norm.sort().values
    # Between two examples' norms: a bound equal to one of them would make its count a tie that
    # rounding decides.
    clip = float(norms[3] + norms[4]) / 2
    lay = ft.clipped_grad_sum(loss_fn, params, batch, clip, method="layers")
    ref = ft.per_example_global_norm_clip(ps, clip)
    assert_trees_all_close(lay.grad_sum, ref[0], rtol=1e-10, atol=1e-13)
    assert int(lay.num_clipped) == int(ref[1])


# --- noise scale --------------------------------------------------------------------------


def test_noise_scale_estimate_unbiased_with_unequal_sizes():
    gen = torch.Generator().manual_seed(0)
    d, sizes, n = 5, [1, 3, 7, 5], 40000
    g_true = torch.randn(d, generator=gen, dtype=torch.float64)
    sd = torch.rand(d, generator=gen, dtype=torch.float64) * 2
    total = sum(sizes)
    g = g_true + sd * torch.randn(n, total, d, generator=gen, dtype=torch.float64)
    means = torch.stack([p.mean(1) for p in torch.split(g, sizes, dim=1)], 1)
    est = ft.noise_scale_estimate(
        (means**2).sum(-1), torch.tensor(sizes, dtype=torch.float64), (g.mean(1) ** 2).sum(-1)
    )
    for value, truth in ((est.trace_sigma, (sd**2).sum()), (est.grad_sq, g_true @ g_true)):
        se = value.std() / math.sqrt(n)
        assert abs(float((value.mean() - truth) / se)) < 4


def _regression_run(dtype, steps=60, **kw):
    gen = torch.Generator().manual_seed(0)
    d, n = 64, 64
    xs = torch.randn(n, d, generator=gen)
    ys = xs @ torch.randn(d, generator=gen) + 0.3 * torch.randn(n, generator=gen)

    def loss_fn(p, b):
        return ((b["x"] @ p["w"].float()) - b["y"]).square().mean()

    tx = ft.sgd(0.0)  # fixed parameters: every step estimates the same B_simple
    step = ft.make_train_step(
        loss_fn,
        tx,
        micro_batches=4,
        grad_stats=ft.noise_scale_hook(decay=0.9),
        donate=False,
        **kw,
    )
    state = ft.TrainState.create(params={"w": torch.zeros(d, dtype=dtype)}, tx=tx)
    for _ in range(steps):
        idx = torch.randint(0, n, (32,), generator=gen)
        state, metrics = step(state, {"x": xs[idx], "y": ys[idx]})
    return state, {k: float(v) for k, v in metrics.items() if k.startswith("noise_scale/")}


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_noise_scale_hook_bfloat16_params_match_float64(strategy):
    # The gradients are exact in bfloat16 here (zero parameters, float32 loss), so only the
    # hook's own arithmetic differs: bfloat16 norms and averages were off by about 3%.
    _, ref = _regression_run(torch.float64, strategy=strategy)
    state, got = _regression_run(torch.bfloat16, strategy=strategy)
    for name in ("b_simple", "trace_sigma", "grad_sq"):
        key = f"noise_scale/{name}"
        assert math.isclose(got[key], ref[key], rel_tol=2e-3), (name, got[key], ref[key])
    assert state.extra["noise_scale"].trace_sigma.dtype == torch.float32


@pytest.mark.parametrize(
    "options",
    [{}, {"strategy": "vmap"}, {"compile": {"backend": "aot_eager"}}],
    ids=["loop", "vmap", "compiled"],
)
def test_noise_scale_hook_unaffected_by_loss_scale(options):
    """grad_stats hooks see unscaled micro-batch gradients, like the combined gradient."""
    _, ref = _regression_run(torch.float32, steps=3, **options)
    _, got = _regression_run(torch.float32, steps=3, loss_scale=ft.DynamicLossScale(), **options)
    for key, value in ref.items():
        assert math.isclose(got[key], value, rel_tol=1e-4), (key, got[key], value)


def test_noise_scale_hook_needs_two_micro_batches():
    step = ft.make_train_step(
        lambda p, b: (p["w"] * b).mean(), ft.sgd(0.1), grad_stats=ft.noise_scale_hook()
    )
    state = ft.TrainState.create(params={"w": torch.ones(())}, tx=ft.sgd(0.1))
    with pytest.raises(ValueError, match="K >= 2"):
        step(state, torch.ones(4))


def test_hook_sizes_exact_with_bfloat16_loss():
    hook = ft.GradStatsHook(
        init=lambda params: None,
        per_micro_batch=lambda g, b: {},
        update=lambda stats, grads, s: ({"sizes": stats.sizes.double()}, s),
    )
    step = ft.make_train_step(
        lambda p, x: (x * p["w"]).mean(), ft.sgd(0.0), micro_batches=[257, 259, 3], grad_stats=hook
    )
    state = ft.TrainState.create(params={"w": torch.ones((), dtype=torch.bfloat16)}, tx=ft.sgd(0.0))
    _, metrics = step(state, torch.ones(519, dtype=torch.bfloat16))
    assert metrics["sizes"].tolist() == [257.0, 259.0, 3.0]


# --- clipped sums in half precision, hyperparameters that are not one number ---------------


@pytest.mark.parametrize("method", ["vmap", "layers"])
def test_bfloat16_clipped_sum_over_chunks_is_rounded_once(method):
    # 400 one-example chunks: a bfloat16 running sum lost 7% of the loss sum (38912 for a
    # float64 value of 41899); accumulated wide, chunking changes at most the last bit.
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 1, bias=False).to(torch.bfloat16)
    params = {"w": layer.weight.detach().clone()}
    x = (torch.randn(400, 8) * 3).to(torch.bfloat16)

    def loss_fn(p, b):
        return F.linear(b, p["w"]).square().mean()

    ref_loss = (x.double() @ params["w"].double().T).square().sum()
    whole = ft.clipped_grad_sum(loss_fn, params, x, 1e3, method=method)
    chunked = ft.clipped_grad_sum(loss_fn, params, x, 1e3, chunk_size=1, method=method)
    assert chunked.loss_sum.dtype == torch.bfloat16
    assert chunked.grad_sum["w"].dtype == torch.bfloat16
    bf16_spacing = 2.0**-7
    assert float(chunked.loss_sum) == pytest.approx(float(ref_loss), rel=bf16_spacing)
    assert float(chunked.loss_sum) == pytest.approx(float(whole.loss_sum), rel=bf16_spacing)
    assert_trees_all_close(chunked.grad_sum, whole.grad_sum, rtol=bf16_spacing, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda clip: ft.clipped_grad_sum(
            lambda p, b: (b @ p["w"]).mean(), {"w": torch.ones(2)}, torch.ones(3, 2), clip
        ),
        lambda clip: ft.dp_noisy_mean(clip, 1.0, expected_batch_size=4, seed=0),
        lambda clip: ft.dpsgd(0.1, clip, 1.0, seed=0),
    ],
)
@pytest.mark.parametrize(
    ("clip", "error", "match"),
    [
        (lambda count: 1.0, TypeError, "not a schedule"),
        (torch.tensor([0.5, 1.0]), ValueError, r"shape \(2,\)"),
        (torch.tensor(1), ValueError, "torch.int64"),
    ],
)
def test_clipping_norm_that_is_not_one_number_is_refused_at_the_call(make, clip, error, match):
    # These failed later, mid-update, with an unrelated "unsupported operand" error.
    with pytest.raises(error, match="l2_norm_clip") as info:
        make(clip)
    assert info.match(match)
