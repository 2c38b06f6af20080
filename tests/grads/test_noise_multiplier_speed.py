"""get_noise_multiplier's faster search finds a σ the old bisection would accept.

The search skips fractional orders that cannot be the best one and replaces the bisection by
false position on ``log σ``; neither may change the answer beyond the requested tolerance. The
references are the public :func:`compute_rdp` / :func:`get_privacy_spent` over every order
(what the old search evaluated) and the old bisection itself, written out here.
"""

from __future__ import annotations

import itertools
import math

import pytest

import functrain as ft
from functrain.grads import accounting

ORDERS = accounting.DEFAULT_ORDERS

# 35 cases: (target ε, δ) × (q, steps), from small to large ε and q.
CASES = [
    (eps, delta, q, steps)
    for (eps, delta), (q, steps) in itertools.product(
        [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-6), (8.0, 1e-8), (30.0, 1e-5)],
        [
            (1e-4, 100_000),
            (1e-3, 100),
            (0.01, 1000),
            (256 / 60000, 14000),
            (0.1, 50),
            (0.5, 20),
            (1.0, 5),
        ],
    )
]


def _full_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    return ft.get_privacy_spent(ORDERS, ft.compute_rdp(q, sigma, steps), delta)[0]


def _old_noise_multiplier(target: float, delta: float, q: float, steps: int, tol: float) -> float:
    """The bisection get_noise_multiplier used before, over every order (Opacus' algorithm)."""
    low, high = 0.0, 10.0
    while _full_epsilon(q, high, steps, delta) > target:
        low, high = high, 2 * high
    while True:
        mid = (low + high) / 2
        eps = _full_epsilon(q, mid, steps, delta)
        if eps > target:
            low = mid
        else:
            high = mid
            if eps >= target - tol:
                return high
        if high - low < 1e-12 * high:
            return high


@pytest.mark.parametrize(("target", "delta", "q", "steps"), CASES)
def test_sigma_spends_the_target_to_the_tolerance(target, delta, q, steps):
    tol = 0.01
    sigma = ft.get_noise_multiplier(target, delta, q, steps, epsilon_tolerance=tol)
    assert target - tol <= _full_epsilon(q, sigma, steps, delta) <= target


@pytest.mark.parametrize(("target", "delta", "q", "steps"), CASES)
def test_sigma_matches_the_old_bisection_at_a_tight_tolerance(target, delta, q, steps):
    tol = 1e-7
    ours = ft.get_noise_multiplier(target, delta, q, steps, epsilon_tolerance=tol)
    theirs = _old_noise_multiplier(target, delta, q, steps, tol)
    # Both spend ε in [target − tol, target]; ε is steep enough in σ for 1e-6 relative.
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert target - tol <= _full_epsilon(q, ours, steps, delta) <= target


@pytest.mark.parametrize(("target", "delta", "q", "steps"), CASES[::3])
@pytest.mark.parametrize("sigma", [0.3, 0.9, 2.5, 12.0])
def test_pruned_epsilon_is_the_full_minimum(target, delta, q, steps, sigma):
    ours = accounting._min_epsilon(q, sigma, steps, ORDERS, delta)
    assert ours == pytest.approx(_full_epsilon(q, sigma, steps, delta), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "orders", [[1.5, 2.5, 3.5, 7.25], [1.01, 1.99, 40.5], [2.0, 3.0, 4.5, 5.0], [1.1, 256.0]]
)
def test_pruned_epsilon_with_custom_orders(orders):
    q, steps, delta = 0.02, 500, 1e-6
    for sigma in (0.5, 1.0, 4.0):
        full = ft.get_privacy_spent(orders, ft.compute_rdp(q, sigma, steps, orders), delta)[0]
        ours = accounting._min_epsilon(q, sigma, steps, tuple(orders), delta)
        assert ours == pytest.approx(full, rel=1e-12, abs=1e-15)
        assert math.isfinite(ours)
