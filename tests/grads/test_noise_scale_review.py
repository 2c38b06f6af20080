"""Review of the gradient-noise-scale machinery: empty micro-batches, half precision, decay.

References are float64 arithmetic done here by hand: per-micro-batch gradients from
``torch.func.grad``, the estimators' closed forms, cosines pair by pair, and Monte-Carlo draws
``ĝᵢ ~ N(G, Σ/bᵢ)`` whose means are checked against the truth within a few standard errors.
"""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import tree
from functrain.grads.stats import GradMoments

F64 = torch.float64
DIM = 5


def _truth() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(DIM, generator=g, dtype=F64)
    a = torch.randn(DIM, DIM, generator=g, dtype=F64)
    return grad, a @ a.T + 0.3 * torch.eye(DIM, dtype=F64)


# --------------------------------------------------------------- empty micro-batches (size 0)


def test_empty_micro_batches_left_out_and_estimates_stay_unbiased() -> None:
    # A LossSum micro-batch of padding only has size 0 and mean gradient 0/0: its squared norm
    # is NaN. It used to make every estimate NaN (so the step was silently dropped); it holds no
    # example, so leaving it out (K counting the others) keeps both estimators unbiased.
    grad, sigma = _truth()
    draws, k = 20000, 4
    g = torch.Generator().manual_seed(11)
    sizes = torch.randint(1, 9, (draws, k), generator=g).to(F64)
    sizes[torch.arange(draws), torch.randint(0, k, (draws,), generator=g)] = 0.0  # one empty
    sizes[: draws // 2, 0] = 0.0  # half the draws have two empty: K = 2 non-empty
    z = torch.randn(draws, k, DIM, generator=g, dtype=F64) @ torch.linalg.cholesky(sigma).T
    micro = grad + z / sizes.clamp_min(1).sqrt()[..., None]
    combined = (sizes[..., None] * micro).sum(1) / sizes.sum(1, keepdim=True)
    sq = torch.where(sizes > 0, (micro**2).sum(-1), torch.nan)
    est = ft.noise_scale_estimate(sq, sizes, (combined**2).sum(-1))
    for value, truth in ((est.trace_sigma, torch.trace(sigma)), (est.grad_sq, grad @ grad)):
        assert bool(torch.isfinite(value).all())
        se = float(value.std()) / math.sqrt(draws)
        assert abs(float(value.mean() - truth)) < 4 * se, (float(value.mean()), float(truth), se)


@settings(deadline=None, max_examples=40)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=5),
    empty_at=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    seed=st.integers(0, 10_000),
    as_tensor=st.booleans(),
)
def test_inserting_empty_micro_batches_changes_nothing(sizes, empty_at, seed, as_tensor) -> None:
    g = torch.Generator().manual_seed(seed)
    sq = (torch.rand(len(sizes), generator=g, dtype=F64) + 0.5).tolist()
    combined = 0.3
    all_sizes, all_sq = list(sizes), list(sq)
    for pos in empty_at:
        pos = min(pos, len(all_sizes))
        all_sizes.insert(pos, 0)
        all_sq.insert(pos, math.nan)
    total = sum(sizes)
    trace = (sum(b * s for b, s in zip(sizes, sq)) - total * combined) / (len(sizes) - 1)
    div = sum(b * b * s for b, s in zip(sizes, sq)) / (total**2 * combined)

    def wrap(v):
        return torch.tensor(v, dtype=F64) if as_tensor else v

    est = ft.noise_scale_estimate(torch.tensor(all_sq, dtype=F64), wrap(all_sizes), combined)
    assert math.isclose(float(est.trace_sigma), trace, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(float(est.grad_sq), combined - trace / total, rel_tol=1e-12, abs_tol=1e-12)
    got = ft.gradient_diversity(torch.tensor(all_sq, dtype=F64), combined, wrap(all_sizes))
    assert math.isclose(float(got), div, rel_tol=1e-12)


def test_fewer_than_two_non_empty_micro_batches_give_nan() -> None:
    est = ft.noise_scale_estimate(torch.tensor([math.nan, 2.0]), torch.tensor([0.0, 4.0]), 2.0)
    assert math.isnan(float(est.trace_sigma)) and math.isnan(float(est.grad_sq))


MASK = [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0]  # micro-batch 2 of 3 counts no token


def _token_loss(p: dict, b: dict) -> ft.LossSum:
    r = (b["x"] @ p["w"] - b["y"]) ** 2
    return ft.LossSum((r * b["m"]).sum(), b["m"].sum())


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_hook_leaves_out_a_micro_batch_without_tokens(strategy: str) -> None:
    g = torch.Generator().manual_seed(2)
    batch = {
        "x": torch.randn(12, 3, generator=g, dtype=F64),
        "y": torch.randn(12, generator=g, dtype=F64),
        "m": torch.tensor(MASK, dtype=F64),
    }
    params = {"w": torch.randn(3, generator=g, dtype=F64)}
    step = ft.make_train_step(
        _token_loss,
        ft.sgd(0.0),
        micro_batches=3,
        strategy=strategy,
        grad_stats=ft.noise_scale_hook(decay=0.5),
    )
    state = ft.TrainState.create(params=params, tx=ft.sgd(0.0))
    _, metrics = step(state, batch)
    # By hand: micro-batches 1 and 3 (tokens 2 and 3); ĝᵢ = ∇Tᵢ / Cᵢ, ĝ = Σ∇Tᵢ / ΣCᵢ.
    sums, counts = [], []
    for lo in (0, 8):
        mb = tree.map(lambda x, lo=lo: x[lo : lo + 4], batch)
        sums.append(torch.func.grad(lambda p, mb=mb: _token_loss(p, mb).total)(params)["w"])
        counts.append(float(mb["m"].sum()))
    means = [s / c for s, c in zip(sums, counts)]
    total = sum(counts)
    c2 = float(((sums[0] + sums[1]) / total).square().sum())
    sq = [float(m.square().sum()) for m in means]
    trace = (sum(b * s for b, s in zip(counts, sq)) - total * c2) / (2 - 1)
    grad_sq = c2 - trace / total
    diversity = sum(b * b * s for b, s in zip(counts, sq)) / (total**2 * c2)
    got = {k.removeprefix("noise_scale/"): float(v) for k, v in metrics.items() if "noise" in k}
    assert math.isclose(got["trace_sigma"], trace, rel_tol=1e-9)  # one step: corrected EMA = x
    assert math.isclose(got["grad_sq"], grad_sq, rel_tol=1e-9)
    assert math.isclose(got["b_simple"], trace / grad_sq, rel_tol=1e-9)
    assert math.isclose(got["gradient_diversity"], diversity, rel_tol=1e-9)


def test_hook_update_reads_nothing_on_the_host() -> None:
    # Meta tensors hold no values: any host read (.item(), bool(), float()) would raise.
    meta = torch.device("meta")
    hook = ft.noise_scale_hook(decay=torch.tensor(0.9, dtype=F64, device=meta))
    params = {"w": torch.empty(3, dtype=F64, device=meta)}
    k = 3
    stats = ft.MicroBatchStats(
        torch.empty(k, dtype=F64, device=meta),
        torch.empty(k, dtype=F64, device=meta),
        {"sq_norm": torch.empty(k, dtype=F64, device=meta)},
    )
    metrics, state = hook.update(stats, params, hook.init(params))
    assert all(v.device.type == "meta" for v in [*metrics.values(), *state])


# ------------------------------------------------------------------------- half precision


def _pairwise_cosine_by_hand(grads: list[torch.Tensor]) -> float:
    vs = [g.double() for g in grads]
    pairs = [(i, j) for i in range(len(vs)) for j in range(len(vs)) if i != j]
    return sum(float(vs[i] @ vs[j] / (vs[i].norm() * vs[j].norm())) for i, j in pairs) / len(pairs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-4, 1.0, 300.0])
def test_mean_pairwise_cosine_of_half_precision_gradients(dtype, scale) -> None:
    # float16 squared norms underflowed to 0 for small gradients (cosine 0: "zero gradients")
    # and overflowed for large ones (cosine -1.0); bfloat16 unit vectors cost the third digit.
    g = torch.Generator().manual_seed(4)
    base = torch.randn(40, generator=g)
    grads = [((base + torch.randn(40, generator=g)) * scale).to(dtype) for _ in range(4)]
    acc = ft.cosine_accumulator_init({"w": torch.zeros(40, dtype=dtype)})
    for i, grad in enumerate(grads):
        sq = tree.norm(grad.double(), squared=True) if i == 1 else None  # a given norm, too
        acc = ft.cosine_accumulator_add(acc, {"w": grad}, sq)
    got = float(ft.mean_pairwise_cosine(acc))
    assert math.isclose(got, _pairwise_cosine_by_hand(grads), rel_tol=1e-5, abs_tol=1e-6)


def test_moments_in_half_precision_are_reduced_in_float32() -> None:
    # bfloat16 moments were summed (per leaf, then over leaves) and differenced in bfloat16:
    # tr(Σ) off by 0.6% here. Reference: the same bfloat16 values in float64.
    g = torch.Generator().manual_seed(0)
    n = 64
    mean = {f"l{i}": (torch.randn(500, generator=g) * 0.05).bfloat16() for i in range(20)}
    m2 = {k: (torch.rand(500, generator=g) * 2 * n).bfloat16() for k in mean}
    half = GradMoments(n, mean, m2)
    wide = GradMoments(n, tree.map(lambda x: x.double(), mean), tree.map(lambda x: x.double(), m2))
    trace = sum(float(x.double().sum()) for x in m2.values()) / (n - 1)
    mean_sq = sum(float(x.double().square().sum()) for x in mean.values())
    est = ft.noise_scale_from_moments(half)
    assert est.trace_sigma.dtype == torch.float32 and est.grad_sq.dtype == torch.float32
    assert math.isclose(float(est.trace_sigma), trace, rel_tol=1e-5)
    assert math.isclose(float(est.grad_sq), mean_sq - trace / n, rel_tol=1e-5)
    sum_sq = sum(
        float((s.double() + n * m.double() ** 2).sum()) for m, s in zip(mean.values(), m2.values())
    )
    expected = float(ft.gradient_diversity_from_moments(wide))
    assert math.isclose(expected, sum_sq / (n * n * mean_sq), rel_tol=1e-12)
    assert math.isclose(float(ft.gradient_diversity_from_moments(half)), expected, rel_tol=1e-5)


# -------------------------------------------------------------------------------- decay


@pytest.mark.parametrize(
    ("decay", "error"),
    [
        (1.0, ValueError),  # averages stay 0: B_simple and the bias correction 0/0 for good
        (1.5, ValueError),
        (-0.1, ValueError),
        (math.nan, ValueError),
        (torch.tensor([0.9]), ValueError),  # would broadcast the state to shape (1,)
        ("0.9", TypeError),
    ],
)
def test_decay_outside_unit_interval_refused(decay, error) -> None:
    with pytest.raises(error, match="decay"):
        ft.noise_scale_hook(decay=decay)
    est = ft.NoiseScaleEstimate(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(error, match="decay"):
        ft.noise_scale_metrics(ft.noise_scale_init(), est, decay=decay)


# ------------------------------------------------------------- edges, checkpoint, compile


def _linear_loss(p: dict, b: dict) -> torch.Tensor:
    return ((b["x"] @ p["w"] - b["y"]) ** 2).mean()


def test_equal_gradients_give_zero_b_simple_and_zero_gradients_nan() -> None:
    tx = ft.sgd(0.0)
    step = ft.make_train_step(
        lambda p, b: (p["w"] - 2.0).square().sum() + 0 * b.sum(),
        tx,
        micro_batches=[1, 4, 3],
        grad_stats=ft.noise_scale_hook(decay=0.9),
    )
    # Every micro-batch has the same gradient: tr(Σ) = 0 and B_simple = 0, not NaN.
    state = ft.TrainState.create(params={"w": torch.zeros(3, dtype=F64)}, tx=tx)
    _, m = step(state, torch.ones(8, dtype=F64))
    assert abs(float(m["noise_scale/trace_sigma"])) < 1e-12
    assert math.isclose(float(m["noise_scale/grad_sq"]), 48.0, rel_tol=1e-12)  # ‖2(w − 2)‖²
    assert abs(float(m["noise_scale/b_simple"])) < 1e-12
    assert math.isclose(float(m["noise_scale/gradient_diversity"]), 26 / 64, rel_tol=1e-12)
    # All gradients zero (|G|² = 0): the averages are 0 and the documented ratios 0/0 NaN.
    state = ft.TrainState.create(params={"w": torch.full((3,), 2.0, dtype=F64)}, tx=tx)
    _, m = step(state, torch.ones(8, dtype=F64))
    assert float(m["noise_scale/trace_sigma"]) == 0.0 and float(m["noise_scale/grad_sq"]) == 0.0
    assert math.isnan(float(m["noise_scale/b_simple"]))
    assert math.isnan(float(m["noise_scale/gradient_diversity"]))


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(8, 3, generator=g), "y": torch.randn(8, generator=g)} for _ in range(n)
    ]


def test_checkpoint_round_trip_continues_the_averages() -> None:
    tx = ft.sgd(0.01)
    step = ft.make_train_step(
        _linear_loss, tx, micro_batches=[3, 5], grad_stats=ft.noise_scale_hook(decay=0.5)
    )
    state, batches = ft.TrainState.create(params={"w": torch.zeros(3)}, tx=tx), _batches(4)
    target = step.prepare(ft.TrainState.create(params={"w": torch.ones(3)}, tx=tx))
    for b in batches[:2]:
        state, _ = step(state, b)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt")
        ft.checkpoint.save(path, state)
        restored = ft.checkpoint.restore(path, target=target)
    assert isinstance(restored.extra["noise_scale"], ft.NoiseScaleState)
    ft.testing.assert_trees_all_equal(restored.extra["noise_scale"], state.extra["noise_scale"])
    for b in batches[2:]:
        state, want = step(state, b)
        restored, got = step(restored, b)
        ft.testing.assert_trees_all_equal(got, want)


def test_compiled_hook_keeps_state_dtypes_and_never_recompiles() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    tx = ft.sgd(0.01)
    step = ft.make_train_step(
        _linear_loss,
        tx,
        micro_batches=[3, 5],
        grad_stats=ft.noise_scale_hook(decay=0.5),
        compile={"backend": "aot_eager", "fullgraph": True},
    )
    state = ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.bfloat16)}, tx=tx)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for b in _batches(3):
            state, metrics = step(state, tree.map(lambda x: x.bfloat16(), b))
    ns = state.extra["noise_scale"]
    assert (ns.count.dtype, ns.trace_sigma.dtype, ns.grad_sq.dtype) == (
        torch.int32,
        torch.float32,
        torch.float32,
    )
    assert int(ns.count) == 3 and bool(torch.isfinite(metrics["noise_scale/b_simple"]))
