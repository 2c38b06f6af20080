"""Review tests: PoissonSampler against binomial statistics, the cosine accumulator against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import functrain as ft

# ---------------------------------------------------------------- PoissonSampler


def _rows(sampler: ft.PoissonSampler) -> torch.Tensor:
    """``(steps, N)`` float64 0/1 matrix: which examples each batch holds."""
    rows = torch.zeros(len(sampler), sampler.num_examples, dtype=torch.float64)
    for t, idx in enumerate(sampler):
        rows[t, idx] = 1.0
    return rows


def test_inclusion_batch_size_and_independence_match_the_binomial_model() -> None:
    n, q, steps = 300, 0.07, 4000
    rows = _rows(ft.PoissonSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(11)))
    # each example: Bernoulli(q) per step; pooled frequency within 3 standard errors
    assert abs(rows.mean() - q) < 3 * math.sqrt(q * (1 - q) / (n * steps))
    # per-example counts: their chi-square (N − 1 dof) within ~3 SD of its mean
    counts = rows.sum(0)
    chi2 = float(((counts - steps * q) ** 2).sum() / (steps * q * (1 - q)))
    assert abs(chi2 - n) < 3 * math.sqrt(2 * n)
    # batch sizes: Binomial(N, q) mean and variance, each within 3 standard errors
    sizes = rows.sum(1)
    mean, var = n * q, n * q * (1 - q)
    assert abs(float(sizes.mean()) - mean) < 3 * math.sqrt(var / steps)
    assert abs(float(sizes.var()) - var) < 3 * var * math.sqrt(2 / steps)
    # independence between examples: the off-diagonal correlations average 0 (SE ≈ 1/√(steps·pairs))
    corr = torch.corrcoef(rows.T)
    off = corr[~torch.eye(n, dtype=torch.bool)]
    assert abs(float(off.mean())) < 3 / math.sqrt(steps * n * (n - 1) / 2)
    assert float(off.abs().max()) < 6 / math.sqrt(steps)


def test_empty_batches_are_yielded_and_a_collate_fn_can_take_them_with_workers() -> None:
    # q·N = 0.4: about 2/3 of the batches are empty, and a DP step runs on each of them
    def sampler() -> ft.PoissonSampler:
        return ft.PoissonSampler(40, 0.01, steps=30, generator=torch.Generator().manual_seed(5))

    expected = list(sampler())
    assert len(expected) == 30 and expected.count([]) > 10
    loader = DataLoader(
        TensorDataset(torch.arange(40.0)),
        batch_sampler=sampler(),
        num_workers=2,
        collate_fn=lambda items: [float(x) for (x,) in items],
    )
    assert len(loader) == 30
    assert list(loader) == [[float(i) for i in idx] for idx in expected]


def test_replay_and_resume_from_the_generator_state_and_epochs_differ() -> None:
    gen = torch.Generator().manual_seed(3)
    sampler = ft.PoissonSampler(64, 0.2, steps=5, generator=gen)
    first = list(sampler)
    saved = gen.get_state()  # a checkpoint between epochs
    second, third = list(sampler), list(sampler)
    assert first != second != third  # each epoch continues the stream: new batches
    gen.set_state(saved)
    assert list(sampler) == second and list(sampler) == third


def test_rate_one_takes_everything_every_step() -> None:
    assert list(ft.PoissonSampler(7, 1.0, steps=3)) == [list(range(7))] * 3
    assert len(ft.PoissonSampler(7, 1.0)) == 1


@pytest.mark.parametrize("rate", [0, 0.0, -0.1, 1.0000001, math.nan, math.inf, "0.5", True])
def test_bad_rates_name_the_argument(rate: object) -> None:
    with pytest.raises(ValueError, match="sample_rate must be a number in"):
        ft.PoissonSampler(10, rate)  # type: ignore[arg-type]


def test_an_empty_dataset_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="num_examples must be an int >= 1, got 0"):
        ft.PoissonSampler(0, 0.5)


@pytest.mark.parametrize(
    ("rate", "steps"),
    [(np.float16(0.5), 2), (np.float32(0.25), 4), (np.float64(0.1), 10)],
)
def test_numpy_rates_are_accepted_without_warnings(rate: object, steps: int) -> None:
    # np.float16 rates warned ("overflow encountered in cast") comparing 1/q with sys.maxsize:
    # an error under -W error (as here).
    sampler = ft.PoissonSampler(10, rate)  # type: ignore[arg-type]
    assert len(sampler) == steps and isinstance(sampler.sample_rate, float)


@pytest.mark.parametrize("rate", [np.float32(1e-45), np.float64(5e-324)])
def test_tiny_numpy_rates_ask_for_steps_without_an_overflow_warning(rate: object) -> None:
    with pytest.raises(ValueError, match="too small for the default steps"):
        ft.PoissonSampler(10, rate)  # type: ignore[arg-type]
    assert len(ft.PoissonSampler(10, rate, steps=3)) == 3  # type: ignore[arg-type]


def test_same_semantics_as_opacus_uniform_with_replacement_sampler() -> None:
    opacus_sampler = pytest.importorskip("opacus.utils.uniform_sampler")
    n, q, steps = 200, 0.05, 2000
    ours = _rows(ft.PoissonSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(0)))
    theirs = torch.zeros(steps, n, dtype=torch.float64)
    ref = opacus_sampler.UniformWithReplacementSampler(
        num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(0), steps=steps
    )
    for t, idx in enumerate(ref):
        assert idx == sorted(idx)  # same form: increasing index lists, [] when empty
        theirs[t, idx] = 1.0
    # both draw each example independently with probability q: equal frequencies within 3 SE
    se = math.sqrt(2 * q * (1 - q) / (n * steps))
    assert abs(float(ours.mean() - theirs.mean())) < 3 * se
    # default length: Opacus truncates 1/q, ours rounds it (documented)
    assert len(opacus_sampler.UniformWithReplacementSampler(num_samples=n, sample_rate=0.3)) == 3
    assert len(ft.PoissonSampler(n, 0.3)) == 3 and len(ft.PoissonSampler(n, 0.15)) == 7


# ---------------------------------------------------------------- mean pairwise cosine


def _cosine_by_hand(grads: list[list[torch.Tensor]]) -> float:
    """Mean over ordered pairs i ≠ j of cos(gᵢ, gⱼ) in float64; zero gradients give cosine 0."""
    flat = [torch.cat([x.double().flatten() for x in g]) for g in grads]
    total, k = 0.0, len(flat)
    for i in range(k):
        for j in range(k):
            ni, nj = float(flat[i].norm()), float(flat[j].norm())
            if i != j and ni > 0 and nj > 0:
                total += float(flat[i] @ flat[j]) / (ni * nj)
    return total / (k * (k - 1))


def _accumulate(grads: list[list[torch.Tensor]], given_norm: bool = False) -> torch.Tensor:
    acc = ft.cosine_accumulator_init([torch.zeros_like(x) for x in grads[0]])
    for g in grads:
        sq = sum(float(x.double().square().sum()) for x in g) if given_norm else None
        acc = ft.cosine_accumulator_add(acc, g, None if sq is None else torch.tensor(sq))
    return ft.mean_pairwise_cosine(acc)


def _grads(seed: int, k: int, scale: float, dtype: torch.dtype) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(5, generator=gen), torch.randn(2, 3, generator=gen)]
    return [
        [((b + 0.7 * torch.randn(b.shape, generator=gen)) * scale).to(dtype) for b in base]
        for _ in range(k)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-21, 1e-12, 1.0, 1e12])
def test_tiny_gradients_give_the_float64_cosine(dtype: torch.dtype, scale: float) -> None:
    # ‖g‖² in float32 is subnormal below ‖g‖ ≈ 1e-19: the rsqrt of its clamp made the unit
    # vectors far too short (cosine −0.98 for 45° apart at 1e-20).
    grads = _grads(1, 4, scale, dtype)
    got = float(_accumulate(grads))
    tol = 1e-3 if scale < 1e-19 else 1e-5  # a subnormal square keeps about 13 bits at 1e-21
    assert math.isclose(got, _cosine_by_hand(grads), rel_tol=tol, abs_tol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e21, 1e30])
def test_gradients_whose_square_overflows_give_nan(dtype: torch.dtype, scale: float) -> None:
    # rsqrt(inf) = 0 counted every gradient as a zero-length "unit" vector: cosine −1/(K−1).
    assert math.isnan(float(_accumulate(_grads(1, 4, scale, dtype))))


def test_gradients_below_the_float32_range_of_squares_count_as_zero() -> None:
    grads = _grads(1, 4, 1e-30, torch.float32)
    acc = ft.cosine_accumulator_init([torch.zeros_like(x) for x in grads[0]])
    for g in grads:
        acc = ft.cosine_accumulator_add(acc, g)
    assert float(acc.unit_sq_sum) == 0 and float(ft.mean_pairwise_cosine(acc)) == 0


def test_an_overflowed_given_sq_norm_gives_nan_not_a_number() -> None:
    acc = ft.cosine_accumulator_init([torch.zeros(2)])
    acc = ft.cosine_accumulator_add(acc, [torch.tensor([1e20, 0.0])], torch.tensor(1e40).float())
    acc = ft.cosine_accumulator_add(acc, [torch.tensor([1.0, 1.0])])
    assert math.isnan(float(ft.mean_pairwise_cosine(acc)))


def test_non_finite_gradients_give_nan() -> None:
    for bad in (math.nan, math.inf):
        grads = [[torch.tensor([1.0, bad])], [torch.tensor([1.0, 1.0])]]
        assert math.isnan(float(_accumulate(grads)))


def test_zero_gradients_count_with_cosine_zero_as_documented() -> None:
    grads = [[torch.tensor([1.0, 0.0])], [torch.zeros(2)], [torch.tensor([1.0, 1.0])]]
    expected = 2 * math.cos(math.pi / 4) / 6  # one non-zero pair among 3·2 ordered pairs
    assert math.isclose(float(_accumulate(grads)), expected, rel_tol=1e-6)
    assert math.isclose(_cosine_by_hand(grads), expected, rel_tol=1e-12)


def test_half_precision_accumulates_in_float32_and_inputs_are_not_mutated() -> None:
    grads = _grads(2, 3, 1e-3, torch.float16)
    before = [[x.clone() for x in g] for g in grads]
    acc = ft.cosine_accumulator_init([torch.zeros_like(x) for x in grads[0]])
    for g in grads:
        acc = ft.cosine_accumulator_add(acc, g)
    assert all(x.dtype == torch.float32 for x in acc.unit_sum)
    assert all(torch.equal(a, b) for g, h in zip(grads, before) for a, b in zip(g, h))
    got = float(ft.mean_pairwise_cosine(acc))
    assert math.isclose(got, _cosine_by_hand(grads), rel_tol=1e-5, abs_tol=1e-6)


def test_empty_leaves_are_allowed() -> None:
    grads = [[torch.zeros(0), torch.tensor([1.0, 0.0])], [torch.zeros(0), torch.tensor([0.0, 2.0])]]
    assert abs(float(_accumulate(grads))) < 1e-6  # orthogonal


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 6),
    log_scale=st.floats(-15, 15),
    given_norm=st.booleans(),
    split=st.integers(1, 6),
)
def test_float64_gram_any_scale_any_chunking(
    seed: int, k: int, log_scale: float, given_norm: bool, split: int
) -> None:
    grads = _grads(seed, k, 10.0**log_scale, torch.float32)
    expected = _cosine_by_hand(grads)
    assert math.isclose(float(_accumulate(grads, given_norm)), expected, abs_tol=2e-6)
    # the same gradients chunked into different leaves: the same cosine
    chunked = [list(torch.cat([x.flatten() for x in g]).tensor_split(split)) for g in grads]
    assert math.isclose(float(_accumulate(chunked)), expected, abs_tol=2e-6)
    # and in another order
    assert math.isclose(float(_accumulate(grads[::-1])), expected, abs_tol=2e-6)
