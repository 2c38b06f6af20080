"""Review of the PRV accountant: edge regimes, numerics, and a third, independent reference.

References here are independent of the code under test: closed forms (the Gaussian
mechanism), scipy/mpmath integrals of the subsampled Gaussian's densities, naive float64 sums,
and values of Google's ``dp_accounting`` 0.6 PLD accountant (connect-the-dots, pessimistic
rounding, remove direction), computed once by hand because CI does not install it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import optimize
from scipy.special import log_ndtr

import functrain as ft
from functrain.grads import _prv, prv


def _accountant(*entries: tuple[float, float, int]) -> ft.PRVAccountant:
    accountant = ft.PRVAccountant()
    for sigma, q, steps in entries:
        accountant.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    return accountant


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """``ε`` of the Gaussian mechanism with ``μ`` at ``delta``, in log space (``ε`` can be 2500)."""

    def log_delta(eps: float) -> float:
        a, b = log_ndtr(-eps / mu + mu / 2), eps + log_ndtr(-eps / mu - mu / 2)
        return a + math.log(-math.expm1(b - a)) - math.log(delta)

    return optimize.brentq(log_delta, 0.0, 10 * mu * mu + 100, xtol=1e-12)


def _kl(q: float, sigma: float) -> float:
    """``E_P[log(P/Q)]`` for the subsampled Gaussian, by mpmath quadrature over ω (30 digits)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(30):
        q_, s = mpmath.mpf(q), mpmath.mpf(sigma)

        def integrand(w):
            p = (1 - q_) * mpmath.exp(-((w / s) ** 2) / 2) + q_ * mpmath.exp(
                -(((w - 1) / s) ** 2) / 2
            )
            loss = mpmath.log(1 - q_ + q_ * mpmath.exp((2 * w - 1) / (2 * s * s)))
            return p * loss / (s * mpmath.sqrt(2 * mpmath.pi))

        # The densities peak at 0 and 1; the loss bends from log(1 − q) to linear at ω₀.
        points = [-20 * s, 0, mpmath.mpf(1) / 2, 1, 1 + 20 * s]
        if q < 1:
            bend = mpmath.mpf(1) / 2 + s * s * mpmath.log((1 - q_) / q_)
            points += [bend] if -20 * s < bend < 1 + 20 * s else []
        return float(mpmath.quad(integrand, sorted(points)))


# Small q or σ: nearly all of one step's loss lies within a mesh cell of log(1 − q). The old
# per-cell quadrature in t misplaced the mean by 1–2.5% of the mesh per step; over k steps the
# composed curve moved by about 2% of k·h (up to 7 times eps_error at 10⁶ steps).
@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [
        (0.4, 1e-6, 10_000),
        (0.4, 1e-5, 10_000),
        (0.5, 1e-5, 10_000),
        (0.7, 1e-5, 10_000),
        (2.0, 1e-5, 10_000),
        (0.3, 0.01, 100),
    ],
)
def test_the_mean_preserving_shift_keeps_the_true_mean(sigma: float, q: float, steps: int) -> None:
    delta_error = 1e-8
    h = _prv.mesh(steps, 0.01, delta_error)
    half_width = prv._half_width([(sigma, q, steps)], delta_error, 0.01)
    composed = _prv.compose([(sigma, q, steps)], half_width, h, 1e-5)
    mean = float(composed.pmf @ composed.grid())
    # The truncation to [−L, L] removes mass below 1e-12 per step: nothing visible here.
    assert mean == pytest.approx(steps * _kl(q, sigma), abs=1e-5 * h * steps)


@pytest.mark.parametrize(("sigma", "q"), [(1.0, 1e-6), (0.4, 1e-5), (0.3, 0.01), (200.0, 1.0)])
def test_truncated_mean_against_scipy(sigma: float, q: float) -> None:
    # Cells of 0.05 on [−50, 50] (all of the loss): its law is far narrower than a cell for
    # small q, and mostly in one cell of log(1 − q) at σ = 0.3.
    edges = (torch.arange(-1000, 1002, dtype=torch.float64) - 0.5) * 0.05
    mass, mean = _prv._cell_masses(edges, q, sigma)
    assert mean == pytest.approx(_kl(q, sigma), rel=1e-9, abs=1e-22)
    assert float(mass.sum()) == pytest.approx(1.0, abs=1e-14)
    assert float(mass.min()) >= 0.0


# dp_accounting 0.6, PLD of the remove direction (connect-the-dots, pessimistic rounding: an
# upper bound that converges as its discretisation shrinks). (0.4, 1e-5, 10⁵) at 1e-4 / 1e-5:
# 1.8710 / 1.8709 (δ = 1e-5), 0.2570 / 0.2566 (δ = 1e-3); (0.4, 1e-5, 10⁶) at 1e-4 / 3e-5 /
# 1e-5: 3.0761 / 3.0751 / 3.0748. The add direction is far lower (0.13, 0.08, 0.57), so
# PLDAccountant reports the same numbers. The old mean shift put the "upper bound" below them:
# 1.579, 0.101 (0.206 at eps_error = 0.01) and 2.723.
@pytest.mark.parametrize(
    ("entries", "delta", "reference", "eps_errors"),
    [
        ([(0.4, 1e-5, 100_000)], 1e-5, 1.8709, (0.05, 0.01)),
        ([(0.4, 1e-5, 100_000)], 1e-3, 0.2566, (0.05, 0.01)),
        ([(0.4, 1e-5, 1_000_000)], 1e-5, 3.0748, (0.05,)),
    ],
)
def test_narrow_losses_against_dp_accounting(entries, delta, reference, eps_errors) -> None:
    accountant = _accountant(*entries)
    for eps_error in eps_errors:
        low, estimate, high = accountant.get_epsilon_bounds(delta, eps_error=eps_error)
        assert low - 5e-4 <= reference <= high + 5e-4  # the reference's own error: < 5e-4
        assert abs(estimate - reference) < 2e-3


@pytest.mark.parametrize(
    ("entries", "delta"),
    [
        ([(0.4, 1e-5, 100_000)], 1e-2),
        ([(0.4, 1e-5, 100_000)], 1e-5),
        ([(1.0, 1e-4, 100_000)], 1e-8),
        ([(0.3, 0.01, 100)], 1e-5),
        ([(200.0, 1.0, 1000)], 1e-5),
        ([(1.0, 1e-6, 10_000)], 1e-5),
    ],
)
def test_a_finer_accuracy_nests_inside_a_coarser_one(entries, delta: float) -> None:
    accountant = _accountant(*entries)
    coarse = accountant.get_epsilon_bounds(delta, eps_error=0.05)
    fine = accountant.get_epsilon_bounds(delta, eps_error=0.005)
    assert coarse.lower <= fine.lower <= fine.estimate <= fine.upper <= coarse.upper
    assert all(math.isfinite(v) and v >= 0 for v in coarse + fine)


# ε beyond 709: e^{±t} overflows float64 on the grid (the old code raised ZeroDivisionError
# or "math domain error"); the Gaussian mechanism's closed form is the reference.
@pytest.mark.parametrize("sigma", [0.03, 0.02, 0.015])
def test_epsilon_in_the_thousands_is_bracketed_by_the_closed_form(sigma: float) -> None:
    truth = _gaussian_epsilon(1 / sigma, 1e-5)
    low, estimate, high = _accountant((sigma, 1.0, 1)).get_epsilon_bounds(1e-5)
    assert low <= truth <= high
    assert truth > 690
    assert abs(estimate - truth) < 1e-3


def test_a_noise_schedule_of_100_settings_is_bracketed_by_the_closed_form() -> None:
    # q = 1: the steps compose to one Gaussian mechanism with μ² = Σ kᵢ/σᵢ².
    entries = [(float(s), 1.0, 10) for s in np.linspace(5.0, 20.0, 100)]
    truth = _gaussian_epsilon(math.sqrt(sum(k / s**2 for s, _, k in entries)), 1e-5)
    low, estimate, high = _accountant(*entries).get_epsilon_bounds(1e-5)
    assert low <= truth <= high
    assert abs(estimate - truth) < 2e-3


def _naive_delta(p: np.ndarray, t: np.ndarray, eps: float) -> float:
    return math.fsum(float(pj) * -math.expm1(eps - float(tj)) for pj, tj in zip(p, t) if tj > eps)


@pytest.mark.parametrize(("mu", "half_width"), [(2.0, 50.0), (8.0, 50.0), (30.0, 800.0)])
def test_epsilon_for_inverts_the_naive_hockey_stick_sum(mu: float, half_width: float) -> None:
    # A Gaussian loss N(μ²/2, μ²) on a grid of half width L: up to e^{±50} in the sums at
    # L = 50 (cancellation in D1 − e^t·D2), beyond float64's exponent range at L = 800.
    h = 0.01
    centre = math.ceil(half_width / h)
    t = (np.arange(2 * centre + 1) - centre) * h
    p = np.exp(-0.5 * ((t - mu * mu / 2) / mu) ** 2)
    p /= p.sum()
    composed = _prv.Composed(torch.from_numpy(p), h, centre, 0.0)
    for delta in (1e-3, 1e-5, 1e-10):
        eps = _prv.epsilon_for(composed, delta)
        assert _naive_delta(p, t, eps) == pytest.approx(delta, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    h=st.sampled_from([1e-3, 0.7, 60.0, 300.0]),
    seed=st.integers(0, 2**31),
)
def test_discounted_suffix_sums_match_a_naive_loop(n: int, h: float, seed: int) -> None:
    # Blocks of at most 500 in t: h = 60 or 300 puts block boundaries inside the array.
    p = np.random.default_rng(seed).random(n) * (np.random.default_rng(seed + 1).random(n) < 0.7)
    got = _prv._discounted_suffix_sums(torch.from_numpy(p), h).numpy()
    want = [math.fsum(p[j] * math.exp(-(j - i) * h) for j in range(i, n)) for i in range(n)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-300)


def _mp_tails(t: float, q: float, sigma: float) -> tuple[float, float]:
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(60):
        t, q, s = mpmath.mpf(t), mpmath.mpf(q), mpmath.mpf(sigma)
        z = s**2 * mpmath.log((mpmath.exp(t) - (1 - q)) / q) + mpmath.mpf(1) / 2
        cdf = (1 - q) * mpmath.ncdf(z / s) + q * mpmath.ncdf((z - 1) / s)
        sf = (1 - q) * mpmath.ncdf(-z / s) + q * mpmath.ncdf(-(z - 1) / s)
        return float(cdf), float(sf)


@pytest.mark.parametrize(
    ("t", "q", "sigma"),
    [(5.0, 0.01, 1.0), (8.0, 0.01, 1.0), (20.0, 0.5, 1.0), (35.0, 0.1, 0.3), (150.0, 1.0, 0.1)],
)
def test_the_upper_tail_keeps_its_relative_precision(t: float, q: float, sigma: float) -> None:
    # S(t) from 1e-9 down to 1e-90: torch.special.ndtr lost it below 1e-16 (0 below −8.4).
    _, sf = _prv.tails(torch.tensor([t], dtype=torch.float64), q, sigma)
    want = _mp_tails(t, q, sigma)[1]
    assert want < 1e-8
    assert float(sf[0]) == pytest.approx(want, rel=1e-10, abs=0.0)


@pytest.mark.parametrize(("q", "sigma"), [(1e-6, 1.0), (1e-3, 0.1), (0.01, 0.3), (0.5, 0.2)])
@pytest.mark.parametrize("gap", [1e-12, 1e-10, 1e-8, 1e-4])
def test_the_lower_tail_near_log_one_minus_q(q: float, sigma: float, gap: float) -> None:
    # Just above log(1 − q) the CDF rises from 0 (no ω maps below it) and t's own rounding
    # moves F by far more than float64's ε: compare with mpmath at the same float t, to
    # within what moving t by 4 ulps does to the exact F and S.
    t = math.log1p(-q) + gap
    cdf, sf = _prv.tails(torch.tensor([t], dtype=torch.float64), q, sigma)
    want, moved = _mp_tails(t, q, sigma), _mp_tails(t + 4 * math.ulp(t), q, sigma)
    for got, exact, nearby in zip((cdf, sf), want, moved):
        assert float(got[0]) == pytest.approx(exact, rel=abs(nearby / exact - 1) + 1e-12, abs=0.0)
    below, _ = _prv.tails(torch.tensor([math.log1p(-q) - gap], dtype=torch.float64), q, sigma)
    assert float(below[0]) == 0.0


def test_a_vanishing_noise_multiplier_is_refused_clearly() -> None:
    with pytest.raises(_prv.GridTooLargeError, match=r"grid points .* raise eps_error"):
        _accountant((1e-3, 0.01, 10)).get_epsilon(1e-5)
    # An infinite RDP bound (1/σ² overflows) was an OverflowError from math.ceil.
    for sigma in (1e-200, 5e-324):
        with pytest.raises(_prv.GridTooLargeError, match="noise multiplier this close to 0"):
            _accountant((sigma, 0.01, 10)).get_epsilon(1e-5)


def test_numpy_scalars_are_numbers() -> None:
    accountant = _accountant((1.0, 0.01, 100))
    plain = accountant.get_epsilon(1e-5)
    assert accountant.get_epsilon(np.float64(1e-5), eps_error=np.float32(0.01)) == pytest.approx(
        plain, abs=1e-9
    )
    # A float32 delta is a number too (its default delta_error = delta / 1000 as well).
    assert accountant.get_epsilon(np.float32(1e-5)) == pytest.approx(plain, abs=1e-6)
    assert accountant.get_epsilon(1e-5, delta_error=np.float64(1e-8)) == plain
    with pytest.raises(TypeError, match="eps_error must be a number"):
        accountant.get_epsilon(1e-5, eps_error=None)
    with pytest.raises(ValueError, match="delta must be a number in"):
        accountant.get_epsilon(np.float32(1.5))


@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(200.0, 0.001, 1), (50.0, 1e-6, 100), (1.0, 1e-6, 1)]
)
def test_epsilon_that_should_be_zero(sigma: float, q: float, steps: int) -> None:
    # δ(0) is the total variation, at most steps·q·(2Φ(1/(2σ)) − 1) < 4e-4 here: below δ,
    # so the true ε is 0; the bounds hold it, and never go negative.
    assert steps * q * (2 * _norm_cdf(1 / (2 * sigma)) - 1) < 1e-2
    low, estimate, high = _accountant((sigma, q, steps)).get_epsilon_bounds(1e-2)
    assert low == 0.0
    assert 0.0 <= estimate < 1e-3
    assert high == pytest.approx(estimate + 0.01)


def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def test_large_delta_spends_nothing() -> None:
    # δ = 0.5 exceeds the total variation of a step with q = 0.01: ε = 0 satisfies it.
    assert _accountant((1.0, 0.01, 1000)).get_epsilon_bounds(0.5)[:2] == (0.0, 0.0)
