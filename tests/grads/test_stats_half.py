"""Half-precision gradient moments: accumulated in float32, checked against float64 by hand.

A float16 sum of squared deviations overflows long before the variance does: 64 gradients of
about 300 with a spread of 50 have ``m2 ≈ 1.6e5 > 65504`` but a variance of 2500. ``m2`` is
therefore kept in float32 for half-precision gradients while ``mean``, the variance and the
SNR keep the gradients' dtype, each rounded once.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

HALF = (torch.float16, torch.bfloat16)
# The unit roundoff: rounding to the nearest value is off by at most this, relatively.
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
N = 64


def _data(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """64 gradients of magnitude ~300 (their squares overflow float16), exact in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (300.0 + 50.0 * torch.randn(N, 6, generator=g)).to(dtype)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs() / want.abs()).max().item()


def _linear_problem(x: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any]]:
    """``Σ x·w`` per example: its per-sample gradient is ``x`` itself, in ``x``'s dtype."""
    params = {"w": torch.zeros(x.shape[1], dtype=x.dtype)}
    return (lambda p, b: (b["x"] * p["w"]).sum()), params, {"x": x}


@pytest.mark.parametrize("dtype", HALF)
def test_half_variance_of_large_gradients_is_float64_rounded_once(dtype) -> None:
    # Old code: float16 m2 was inf, so the variance and SNR were inf / 0.
    x = _data(dtype)
    ref = x.double()
    mean, m2, var = ref.mean(0), ((ref - ref.mean(0)) ** 2).sum(0), ref.var(0)
    assert (m2 > 65504).all()  # the sum overflows float16, the variance does not
    assert (var < 65504).all()
    u = UNIT[dtype]
    m = ft.grad_moments({"w": x})
    assert m.count == N
    assert m.mean["w"].dtype == dtype and m.m2["w"].dtype == torch.float32
    assert _rel_err(m.mean["w"], mean) <= u * (1 + 1e-3)
    assert _rel_err(m.m2["w"], m2) <= 1e-6  # float32 accumulation
    v = ft.grad_variance(m)["w"]
    assert v.dtype == dtype and torch.isfinite(v).all()
    assert _rel_err(v, var) <= u * (1 + 1e-3)
    v0 = ft.grad_variance(m, ddof=0)["w"]
    assert _rel_err(v0, m2 / N) <= u * (1 + 1e-3)
    # SNR from the rounded mean (off by u, squared: 2u) and one more rounding.
    snr = ft.grad_snr(m)["w"]
    assert snr.dtype == dtype
    assert _rel_err(snr, mean * mean / var) <= 3 * u * (1 + 1e-3)


@pytest.mark.parametrize("dtype", HALF)
def test_half_sum_and_mean_of_squares(dtype) -> None:
    # Old code: the float16 sum of squares (and the mean² inside it) overflowed to inf.
    x = _data(dtype)
    ref = x.double()
    m = ft.grad_moments({"w": x})
    sos = m.sum_of_squares()["w"]
    assert sos.dtype == torch.float32
    # float32 m2 plus n·mean² with the mean rounded to half: relative error about 2u.
    assert _rel_err(sos, (ref * ref).sum(0)) <= 2 * UNIT[dtype] * (1 + 1e-3)
    small = (x / 4).to(dtype)  # mean square ~6e3 fits float16
    ms = ft.grad_moments({"w": small}).mean_square()["w"]
    assert ms.dtype == dtype
    r = small.double()
    assert _rel_err(ms, (r * r).mean(0)) <= 3 * UNIT[dtype] * (1 + 1e-3)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 16])
def test_streamed_half_moments_equal_unchunked(dtype, chunk_size) -> None:
    # Old code: per_sample_grad_moments rounded m2 to float16: inf.
    x = _data(dtype, seed=1)
    ref = x.double()
    loss_fn, params, batch = _linear_problem(x)
    m = ft.per_sample_grad_moments(loss_fn, params, batch, chunk_size=chunk_size)
    assert m.m2["w"].dtype == torch.float32 and m.mean["w"].dtype == dtype
    assert _rel_err(m.m2["w"], ((ref - ref.mean(0)) ** 2).sum(0)) <= 1e-6
    assert _rel_err(ft.grad_variance(m)["w"], ref.var(0)) <= UNIT[dtype] * (1 + 1e-3)


def _merged(x: torch.Tensor, cuts: list[int]) -> ft.GradMoments:
    bounds = [0, *cuts, x.shape[0]]
    parts = [ft.grad_moments({"w": x[a:b]}) for a, b in itertools.pairwise(bounds)]
    out = parts[0]
    for p in parts[1:]:
        out = ft.merge_grad_moments(out, p)
    return out


def _merge_tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # merge_grad_moments documents a relative error of about ε·|mean|/std from the rounded
    # partial means (here rounded to half precision); a factor 2 and one final rounding on top.
    ratio = (ref.mean(0).abs() / ref.std(0)).max().item()
    return 2 * UNIT[dtype] * (1 + ratio)


@pytest.mark.parametrize("dtype", HALF)
def test_merged_half_moments_equal_unchunked(dtype) -> None:
    # Old code: each float16 merge rounded m2 (inf past 65504); bfloat16 lost bits per merge.
    x = _data(dtype, seed=2)
    ref = x.double()
    whole = ft.grad_moments({"w": x})
    for cuts in ([32], [8, 16, 24, 32, 40, 48, 56], list(range(1, N))):
        m = _merged(x, cuts)
        assert m.count == N
        assert m.mean["w"].dtype == dtype and m.m2["w"].dtype == torch.float32
        assert torch.isfinite(m.m2["w"]).all()
        tol = _merge_tolerance(ref, dtype)
        assert _rel_err(m.m2["w"], whole.m2["w"].double()) <= tol
        assert _rel_err(ft.grad_variance(m)["w"], ref.var(0)) <= tol
        # Each merge rounds the merged mean once more (documented): k merges, k roundings.
        assert _rel_err(m.mean["w"], ref.mean(0)) <= (len(cuts) + 1) * UNIT[dtype]


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(HALF),
    cuts=st.lists(st.integers(1, N - 1), max_size=20, unique=True).map(sorted),
    seed=st.integers(0, 3),
)
def test_merge_over_any_split_matches_float64(dtype, cuts, seed) -> None:
    x = _data(dtype, seed)
    ref = x.double()
    m = _merged(x, cuts)
    assert m.count == N and m.m2["w"].dtype == torch.float32
    tol = _merge_tolerance(ref, dtype)
    assert _rel_err(m.m2["w"], ((ref - ref.mean(0)) ** 2).sum(0)) <= tol
    assert _rel_err(ft.grad_variance(m)["w"], ref.var(0)) <= tol


def test_merge_widens_half_m2_given_by_hand() -> None:
    # Moments built by hand with a float16 m2 (the old layout) merge without overflow.
    a = ft.GradMoments(
        32,
        {"w": torch.tensor([300.0], dtype=torch.float16)},
        {"w": torch.tensor([60000.0], dtype=torch.float16)},
    )
    b = ft.GradMoments(
        32,
        {"w": torch.tensor([310.0], dtype=torch.float16)},
        {"w": torch.tensor([60000.0], dtype=torch.float16)},
    )
    m = ft.merge_grad_moments(a, b)
    assert m.m2["w"].dtype == torch.float32 and m.mean["w"].dtype == torch.float16
    assert m.m2["w"].item() == 120000.0 + 10.0**2 * 32 * 32 / 64
    assert m.mean["w"].item() == 305.0
    assert ft.grad_variance(m)["w"].item() == pytest.approx(121600 / 63, rel=2**-11)
