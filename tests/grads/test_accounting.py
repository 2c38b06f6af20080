"""The RDP accountant against a 40-digit quadrature of its definition, Opacus, and its laws."""

import math
import warnings

import mpmath
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain.grads import _rdp, accounting


def _rdp_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    """``log(A_α)/(α − 1)`` with ``A_α − 1 = ∫ N(z; 0, σ²)((1 − q + q·e^{(2z−1)/(2σ²)})^α − 1) dz``
    integrated by mpmath at 40 digits: the definition (Mironov et al. 2019), independently of
    the series and the trapezoidal rule the library uses."""
    with mpmath.workdps(40):
        q_, s, a = mpmath.mpf(q), mpmath.mpf(sigma), mpmath.mpf(alpha)

        def integrand(z):
            mix = (1 - q_) + q_ * mpmath.e ** ((2 * z - 1) / (2 * s**2))
            return mpmath.npdf(z, 0, s) * (mix**a - 1)

        breaks = [-mpmath.inf, -10 * s, 0, 0.5, 1, a, a + 10 * s, mpmath.inf]
        return float(mpmath.log1p(mpmath.quad(integrand, breaks)) / (a - 1))


CASES = [
    # (q, sigma, alpha): typical DP-SGD settings, large q, small sigma, integer and fractional
    (0.01, 1.0, 1.5),
    (0.01, 1.1, 32.0),
    (0.01, 1.1, 32.5),
    (256 / 60000, 1.1, 10.9),
    (0.001, 5.0, 3.3),
    (0.001, 2.0, 1.3),
    (0.5, 0.7, 2.5),
    (0.3, 0.4, 7.7),
    (0.9, 0.5, 10.9),
    (0.9, 0.5, 63.0),
    (0.05, 0.25, 3.5),
    (0.02, 0.15, 1.9),
    (1e-4, 20.0, 1.1),  # A_α − 1 ≈ 1e-12: where a plain log(A_α) loses every digit
    (1e-5, 50.0, 2.0),
]


@pytest.mark.parametrize(("q", "sigma", "alpha"), CASES)
def test_rdp_of_one_step_equals_the_definition(q, sigma, alpha):
    expected = _rdp_by_quadrature(q, sigma, alpha)
    (got,) = ft.compute_rdp(q, sigma, steps=1, orders=[alpha])
    assert got == pytest.approx(expected, rel=1e-9, abs=0)


def test_rdp_without_subsampling_is_the_gaussian_mechanism():
    orders = [1.5, 2.0, 7.25, 63.0]
    got = ft.compute_rdp(1.0, 1.7, steps=5, orders=orders)
    assert got == pytest.approx([5 * a / (2 * 1.7**2) for a in orders], rel=1e-15)


def test_edge_rates_and_noise():
    assert ft.compute_rdp(0.0, 1.0, steps=100, orders=[2.0, 2.5]) == [0.0, 0.0]
    assert ft.compute_rdp(0.1, 0.0, steps=1, orders=[2.0, 2.5]) == [math.inf, math.inf]
    assert ft.compute_rdp(0.1, 1.0, steps=0, orders=[2.0]) == [0.0]
    assert ft.get_privacy_spent([2.0, 3.0], [math.inf, math.inf], 1e-5)[0] == math.inf


def test_integer_and_fractional_methods_agree_across_an_integer_order():
    # Integer orders take the exact binomial sum, others the quadrature: the RDP curve must
    # be continuous where the two meet.
    for q, sigma in [(0.01, 1.0), (0.2, 0.6), (1e-4, 10.0)]:
        below, at, above = ft.compute_rdp(q, sigma, 1, [3 - 1e-7, 3.0, 3 + 1e-7])
        assert below <= at <= above
        assert above - below == pytest.approx(0, abs=1e-6 * at)


@pytest.mark.parametrize(
    ("q", "sigma", "alpha"),
    [(0.01, 0.05, 5000), (0.3, 0.2, 2000), (0.01, 1.0, 9000), (1e-3, 0.5, 3000)],
)
def test_large_orders_at_small_noise_match_the_binomial_sum(q, sigma, alpha):
    # A whole-line grid here would take up to 8e6 nodes per order; the quadrature integrates
    # windows around the integrand's peaks instead, and must still equal the exact sum.
    exact = _rdp._log_a_integer(q, sigma, alpha)
    (windowed,) = _rdp._log_a_fractional(q, sigma, [float(alpha)])
    assert windowed == pytest.approx(exact, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    q=st.floats(1e-4, 0.99),
    sigma=st.floats(0.3, 10.0),
    alpha=st.sampled_from([1.5, 2.5, 7.3, 31.7, 63.5, 200.5]),
)
def test_windowed_quadrature_equals_the_whole_line_grid(q, sigma, alpha):
    whole = _rdp._log_a_fractional(q, sigma, [alpha])
    saved = _rdp._MAX_NODES
    _rdp._MAX_NODES = 0  # every order integrated over windows
    try:
        windowed = _rdp._log_a_fractional(q, sigma, [alpha])
    finally:
        _rdp._MAX_NODES = saved
    assert windowed == pytest.approx(whole, rel=1e-11, abs=1e-300)


@settings(max_examples=40, deadline=None)
@given(
    q=st.floats(1e-4, 0.9),
    sigma=st.floats(0.5, 10.0),
    alpha=st.sampled_from([1.5, 2.0, 4.5, 8.0, 20.5]),
)
def test_rdp_grows_with_the_rate_and_shrinks_with_the_noise(q, sigma, alpha):
    (base,) = ft.compute_rdp(q, sigma, 1, [alpha])
    (more_rate,) = ft.compute_rdp(min(1.0, q * 1.5), sigma, 1, [alpha])
    (more_noise,) = ft.compute_rdp(q, sigma * 1.5, 1, [alpha])
    assert more_noise <= base <= more_rate
    # composition is additive
    assert ft.compute_rdp(q, sigma, 7, [alpha])[0] == pytest.approx(7 * base, rel=1e-12)


def test_epsilon_is_the_best_conversion_over_the_orders():
    orders = [1.5, 2.0, 4.0, 16.0]
    rdp = [0.3, 0.5, 1.2, 6.0]
    delta = 1e-5
    by_order = [
        r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a, r in zip(orders, rdp)
    ]
    eps, order = ft.get_privacy_spent(orders, rdp, delta)
    assert eps == pytest.approx(min(by_order), rel=1e-14)
    assert order == orders[by_order.index(min(by_order))]


@settings(max_examples=25, deadline=None)
@given(
    q=st.floats(1e-3, 0.2),
    sigma=st.floats(0.6, 4.0),
    steps=st.integers(1, 10_000),
    delta=st.floats(1e-9, 1e-3),
)
def test_epsilon_grows_with_steps_and_shrinks_with_delta(q, sigma, steps, delta):
    orders = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0]

    def eps(steps: int, delta: float) -> float:
        return ft.get_privacy_spent(orders, ft.compute_rdp(q, sigma, steps, orders), delta)[0]

    assert eps(steps, delta) <= eps(2 * steps, delta)
    assert eps(steps, 10 * delta) <= eps(steps, delta)


# ------------------------------------------------------------------------------ vs Opacus

opacus_rdp = pytest.importorskip("opacus.accountants.analysis.rdp")


@pytest.mark.parametrize(
    ("q", "sigma", "steps"),
    [
        (0.01, 1.1, 1000),
        (256 / 60000, 1.1, 14_000),
        (0.1, 0.8, 50),
        (0.5, 2.0, 10),
        (0.004, 0.5, 300),
    ],
)
def test_rdp_and_epsilon_match_opacus(q, sigma, steps):
    orders = list(accounting.DEFAULT_ORDERS)
    ours = ft.compute_rdp(q, sigma, steps)
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    assert ours == pytest.approx(list(theirs), rel=1e-7)
    for delta in (1e-5, 1e-8):
        eps, order = ft.get_privacy_spent(orders, ours, delta)
        ref_eps, ref_order = opacus_rdp.get_privacy_spent(orders=orders, rdp=theirs, delta=delta)
        assert eps == pytest.approx(float(ref_eps), rel=1e-9)
        assert order == ref_order


def test_accountant_matches_opacus_over_a_changing_schedule():
    from opacus.accountants import RDPAccountant as OpacusAccountant

    ours, theirs = ft.RDPAccountant(), OpacusAccountant()
    for sigma, q, steps in [(1.1, 0.01, 300), (1.1, 0.01, 200), (0.9, 0.02, 100), (2.0, 0.01, 50)]:
        ours.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
        for _ in range(steps):
            theirs.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.history == theirs.history == [(1.1, 0.01, 500), (0.9, 0.02, 100), (2.0, 0.01, 50)]
    assert len(ours) == 650  # steps (Opacus' len counts history entries)
    for delta in (1e-5, 1e-6):
        assert ours.get_epsilon(delta) == pytest.approx(theirs.get_epsilon(delta), rel=1e-9)


def test_noise_multiplier_search_spends_just_under_the_target():
    from opacus.accountants.utils import get_noise_multiplier as opacus_noise_multiplier

    q, steps, delta = 256 / 60000, 3000, 1e-5
    for target in (1.0, 3.0, 8.0):
        sigma = ft.get_noise_multiplier(target, delta, q, steps, epsilon_tolerance=0.01)
        spent = ft.get_privacy_spent(
            accounting.DEFAULT_ORDERS, ft.compute_rdp(q, sigma, steps), delta
        )[0]
        assert target - 0.01 <= spent <= target
        with warnings.catch_warnings():  # Opacus warns when the best order is at the edge
            warnings.simplefilter("ignore")
            theirs = opacus_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                epsilon_tolerance=0.01,
            )
        assert sigma == pytest.approx(theirs, rel=0.02)


# ------------------------------------------------------------------------------ usage


def test_accountant_state_round_trips_and_bad_states_change_nothing():
    accountant = ft.RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    restored = ft.RDPAccountant()
    restored.load_state_dict(accountant.state_dict())
    assert restored.history == accountant.history
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    for bad in (
        {},
        {"history": [[1.0, 2.0, 3]]},
        {"history": [[1.0, 0.1]]},
        {"history": [[1.0, 0.1, -1]]},
    ):
        with pytest.raises(ValueError):
            restored.load_state_dict(bad)
        assert restored.history == accountant.history


def test_nothing_spent_is_epsilon_zero_not_the_conversions_floor():
    # RDP 0 at any order means identical output distributions: ε = 0 exactly (the conversion
    # formula alone would give about 0.1 here, as Opacus reports for an empty history).
    assert ft.RDPAccountant().get_epsilon(1e-5) == 0.0
    assert ft.get_privacy_spent([2.0, 4.0], ft.compute_rdp(0.0, 1.0, 100, [2.0, 4.0]), 1e-5)[0] == 0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: ft.compute_rdp(1.5, 1.0, 1), "sample_rate must be in"),
        (lambda: ft.compute_rdp(-0.1, 1.0, 1), "sample_rate must be finite and >= 0"),
        (lambda: ft.compute_rdp(0.1, math.nan, 1), "noise_multiplier must be finite"),
        (lambda: ft.compute_rdp(0.1, True, 1), "noise_multiplier must be a number"),
        (lambda: ft.compute_rdp(0.1, 1.0, 2.5), "steps must be an int"),
        (lambda: ft.compute_rdp(0.1, 1.0, 1, orders=[1.0]), "order must be a number > 1"),
        (lambda: ft.get_privacy_spent([2.0], [0.1], 0.0), "delta must be a number in"),
        (lambda: ft.get_privacy_spent([2.0, 3.0], [0.1], 1e-5), "1 values for 2 orders"),
        (lambda: ft.get_noise_multiplier(0.0, 1e-5, 0.01, 100), "target_epsilon must be"),
        (lambda: ft.get_noise_multiplier(1.0, 1e-5, 0.0, 100), "sample_rate must be > 0"),
        # the conversion's floor (about 0.1 at these orders for this delta): no noise reaches it
        (lambda: ft.get_noise_multiplier(0.01, 1e-5, 0.01, 100), "below what any noise"),
    ],
)
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_accountant_state_travels_in_checkpoint_metadata(tmp_path):
    import torch

    accountant = ft.RDPAccountant()
    accountant.step(noise_multiplier=1.1, sample_rate=0.02, steps=120)
    accountant.step(noise_multiplier=0.9, sample_rate=0.02, steps=30)
    path = tmp_path / "ckpt.safetensors"
    ft.checkpoint.save(
        path, {"w": torch.zeros(2)}, metadata={"accountant": accountant.state_dict()}
    )
    resumed = ft.RDPAccountant()
    resumed.load_state_dict(ft.checkpoint.read_metadata(path)["accountant"])
    assert resumed.history == accountant.history
    assert resumed.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
