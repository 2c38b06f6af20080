"""Second review of the RDP accountant: extreme noise multipliers, NumPy scalars, RDP laws.

References: the binomial sum for integer orders and the defining integral, both in mpmath at
60 digits; the first-order expansion ``RDP(α) = αq²/(2σ²)`` for huge ``σ`` (exact to
``O(σ⁻⁴)``); for tiny ``σ`` the dominant half-line piece of the integral in closed form
(``qᵅ·e^{α(α−1)/(2σ²)}·Φ((α − z₀)/σ)``, a lower bound); and the laws every Rényi divergence
obeys (non-decreasing in ``α``, ``log A_α`` convex with ``A_1 = 1``).
"""

import itertools
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.grads import _rdp, accounting


def _rdp_integer(q: float, sigma: float, alpha: int) -> float:
    """One step's RDP at an integer order: the binomial sum of ``A_α − 1`` at 60 digits."""
    with mpmath.workdps(60):
        q_, s = mpmath.mpf(q), mpmath.mpf(sigma)
        excess = mpmath.fsum(
            mpmath.binomial(alpha, k)
            * (1 - q_) ** (alpha - k)
            * q_**k
            * mpmath.expm1(mpmath.mpf(k * k - k) / (2 * s * s))
            for k in range(2, alpha + 1)
        )
        return float(mpmath.log1p(excess) / (alpha - 1))


def _rdp_quadrature(q: float, sigma: float, alpha: float) -> float:
    """One step's RDP by mpmath quadrature of the definition, split at the integrand's peaks."""
    with mpmath.workdps(50):
        q_, s, a = mpmath.mpf(q), mpmath.mpf(sigma), mpmath.mpf(alpha)
        z0 = mpmath.mpf(0.5) + s**2 * mpmath.log((1 - q_) / q_)

        def integrand(z):
            mix = (1 - q_) + q_ * mpmath.e ** ((2 * z - 1) / (2 * s**2))
            return mpmath.npdf(z, 0, s) * (mix**a - 1)

        points = sorted({-30 * s, -10 * s, mpmath.mpf(0), z0, a, a + 10 * s, a + 30 * s})
        fine = [x + (y - x) * i / 16 for x, y in itertools.pairwise(points) for i in range(16)]
        breaks = [-mpmath.inf, *fine, points[-1], mpmath.inf]
        return float(mpmath.log1p(mpmath.quad(integrand, breaks)) / (a - 1))


def _rdp_lower_tiny_sigma(q: float, sigma: float, alpha: float) -> float:
    """A lower bound on one step's RDP: ``A_α`` is at least its integral over ``z ≥ z₀``
    (where ``q·eʷ ≥ 1 − q``) of ``N(z; 0, σ²)(q·eʷ)^α``, a Gaussian integral."""
    with mpmath.workdps(60):
        q_, s, a = mpmath.mpf(q), mpmath.mpf(sigma), mpmath.mpf(alpha)
        z0 = mpmath.mpf(0.5) + s**2 * mpmath.log((1 - q_) / q_)
        log_a = (
            a * mpmath.log(q_) + a * (a - 1) / (2 * s**2) + mpmath.log(mpmath.ncdf((a - z0) / s))
        )
        return float(log_a / (a - 1))


# ----------------------------------------------------------------------------- huge noise


@pytest.mark.parametrize("sigma", [1e145, 1e155, 1e200, 1e300])
@pytest.mark.parametrize("q", [1e-3, 0.3, 1.0])
def test_huge_noise_multiplier_is_the_first_order_expansion_not_an_overflow(q, sigma):
    orders = [2.0, 2.5, 32.0]
    got = ft.compute_rdp(q, sigma, 7, orders)
    # A_α − 1 = α(α−1)q²/(2σ²)(1 + O(σ⁻²)); the product rounds to 0 or a subnormal.
    want = [
        float(7 * mpmath.mpf(a) * mpmath.mpf(q) ** 2 / (2 * mpmath.mpf(sigma) ** 2)) for a in orders
    ]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-320)
    accountant = ft.RDPAccountant()
    accountant.step(noise_multiplier=sigma, sample_rate=q, steps=10)
    accountant.step(noise_multiplier=1.1, sample_rate=0.01, steps=100)
    mixed = accountant.get_epsilon(1e-5)
    alone = ft.get_privacy_spent(accounting.DEFAULT_ORDERS, ft.compute_rdp(0.01, 1.1, 100), 1e-5)[0]
    assert mixed == pytest.approx(alone, rel=1e-12)


@pytest.mark.parametrize("sigma", [1e100, 1e139])
def test_large_noise_multipliers_below_the_expansion_match_the_binomial_sum(sigma):
    got = ft.compute_rdp(0.2, sigma, 1, [2.0, 5.0])
    assert got == pytest.approx([_rdp_integer(0.2, sigma, a) for a in (2, 5)], rel=1e-10)


# ----------------------------------------------------------------------------- tiny noise


@pytest.mark.parametrize("sigma", [1e-5, 1e-30, 1e-100])
@pytest.mark.parametrize(("q", "alpha"), [(0.01, 2.5), (0.5, 1.5), (0.9, 10.9)])
def test_tiny_noise_multiplier_at_fractional_orders_is_a_tight_upper_bound(q, alpha, sigma):
    """Old code: ZeroDivisionError at σ = 1e-30 (a window rounds to one node), and gigabytes
    of nodes at σ = 1e-6."""
    got = ft.compute_rdp(q, sigma, 1, [alpha])[0]
    lower = _rdp_lower_tiny_sigma(q, sigma, alpha)
    assert lower * (1 - 1e-15) <= got <= lower + math.log(2) * (1 + 1e-9) + 1e-15 * lower


@pytest.mark.parametrize(("q", "sigma", "alpha"), [(0.1, 2e-3, 2.5), (0.5, 1e-3, 1.5)])
def test_the_tiny_noise_bound_is_within_log_2_of_the_definition(monkeypatch, q, sigma, alpha):
    exact = _rdp_quadrature(q, sigma, alpha)
    assert ft.compute_rdp(q, sigma, 1, [alpha])[0] == pytest.approx(exact, rel=1e-12)
    monkeypatch.setattr(_rdp, "_MAX_WINDOW_NODES", 10)  # force the bound here
    bound = ft.compute_rdp(q, sigma, 1, [alpha])[0]
    assert exact <= bound <= exact + math.log(2) + 1e-9 * exact


def test_subnormal_and_zero_variance_noise_spends_everything():
    for sigma in [1e-200, 5e-324]:
        assert ft.compute_rdp(0.01, sigma, 1, [2.0, 2.5]) == [math.inf, math.inf]
        assert ft.compute_rdp(1.0, sigma, 1, [2.5]) == [math.inf]


# ----------------------------------------------------------------------------- laws


@settings(max_examples=40, deadline=None)
@given(
    q=st.floats(1e-6, 1.0),
    log_sigma=st.floats(-4.5, 3.0),
    alphas=st.lists(st.floats(1.01, 40.0), min_size=2, max_size=4, unique=True),
)
def test_rdp_is_non_decreasing_in_the_order(q, log_sigma, alphas):
    """A Rényi divergence is non-decreasing in its order, on both sides of the switch from
    the grid to the tiny-noise bound and between integer and fractional orders."""
    sigma = 10.0**log_sigma
    orders = sorted({*alphas, *(float(math.ceil(a)) for a in alphas)})
    values = ft.compute_rdp(q, sigma, 1, orders)
    for (a, low), (b, high) in itertools.pairwise(zip(orders, values)):
        assert low <= high * (1 + 1e-9) + 1e-300, (a, b, low, high)


# ----------------------------------------------------------------------------- argument types


def test_numpy_scalars_are_numbers():
    """Old code: np.float32 / np.int64 arguments were refused (TypeError / ValueError)."""
    q, sigma = np.float32(0.01), np.float32(1.1)
    orders = np.array([2.0, 2.5], dtype=np.float32)
    got = ft.compute_rdp(q, sigma, np.int64(100), orders)
    assert got == ft.compute_rdp(float(q), float(sigma), 100, [2.0, 2.5])
    assert ft.get_privacy_spent(orders, got, np.float32(1e-5))[1] in (2.0, 2.5)
    accountant = ft.RDPAccountant()
    accountant.step(noise_multiplier=sigma, sample_rate=q, steps=np.int64(3))
    assert len(accountant) == 3 and type(accountant.history[0][2]) is int
    sampler = ft.PoissonSampler(np.int64(100), np.float64(0.1), steps=np.int32(2))
    assert (len(sampler), sampler.expected_batch_size) == (2, 10.0)
    assert type(sampler.num_examples) is int and type(sampler.steps) is int
    assert ft.get_noise_multiplier(np.float32(3.0), 1e-5, np.float64(0.01), np.int64(100)) > 0


@pytest.mark.parametrize("bad", ["1.0", True, b"1"])
def test_rdp_values_that_are_strings_or_bools_are_refused(bad):
    with pytest.raises(ValueError, match="rdp must be a sequence of numbers"):
        ft.get_privacy_spent([2.0, 3.0], [1.0, bad], 1e-5)
