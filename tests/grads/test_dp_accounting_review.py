"""Review of the accountant's public edges and of PoissonSampler.

References: the Gaussian mechanism's closed form (no subsampling, ``RDP(α) = T·α/(2σ²)``) and
the conversion formula written out by hand; the sampler against its definition.
"""

import json
import math
import signal
from contextlib import contextmanager

import pytest
import torch

import functrain as ft

ORDERS = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0]


@contextmanager
def _deadline(seconds: int):
    """Raises TimeoutError in the test if the body runs longer (a hang is a failure)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _gaussian_epsilon(sigma: float, steps: int, delta: float, orders=ORDERS) -> float:
    """ε of ``steps`` Gaussian mechanisms (``q = 1``), by hand: Balle et al.'s conversion of
    ``RDP(α) = steps·α/(2σ²)``, minimized over the orders."""
    return max(
        0.0,
        min(
            steps * a / (2 * sigma**2)
            + math.log((a - 1) / a)
            - (math.log(delta) + math.log(a)) / (a - 1)
            for a in orders
        ),
    )


# ------------------------------------------------------------------------- get_noise_multiplier


def test_noise_multiplier_for_no_steps_is_refused_not_searched_forever():
    # Nothing is spent at any noise, so the bisection used to halve sigma towards 0 for ever.
    with _deadline(20), pytest.raises(ValueError, match="steps must be >= 1"):
        ft.get_noise_multiplier(1.0, 1e-5, 0.01, 0)


@pytest.mark.parametrize(("target", "steps"), [(0.5, 1), (1.0, 10), (4.0, 100), (50.0, 3)])
def test_noise_multiplier_without_subsampling_matches_the_closed_form(target, steps):
    delta, tol = 1e-6, 0.01
    sigma = ft.get_noise_multiplier(target, delta, 1.0, steps, orders=ORDERS, epsilon_tolerance=tol)
    assert target - tol <= _gaussian_epsilon(sigma, steps, delta) <= target


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_delta": 2.0}, ValueError, r"target_delta must be a number in \(0, 1\)"),
        ({"target_delta": 0.0}, ValueError, r"target_delta must be a number in \(0, 1\)"),
        ({"epsilon_tolerance": True}, ValueError, "epsilon_tolerance must be a number > 0"),
        ({"orders": [2.0, math.inf]}, ValueError, "order must be finite"),
        ({"steps": -1}, ValueError, "steps must be an int"),
    ],
)
def test_noise_multiplier_names_the_bad_argument(kwargs, error, match):
    args = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.01, "steps": 10}
    with pytest.raises(error, match=match):
        ft.get_noise_multiplier(**{**args, **kwargs})


# ----------------------------------------------------------------------- orders and conversion


@pytest.mark.parametrize(
    "call",
    [
        lambda orders: ft.compute_rdp(0.01, 1.0, 10, orders=orders),
        lambda orders: ft.compute_rdp(1.0, 1.0, 10, orders=orders),
        lambda orders: ft.get_privacy_spent(orders, [0.5] * len(orders), 1e-5),
        lambda orders: ft.RDPAccountant().get_epsilon(1e-5, orders=orders),
    ],
)
def test_infinite_orders_are_refused(call):
    # Before: compute_rdp crashed in the quadrature ("cannot convert float NaN to integer"),
    # and get_privacy_spent silently skipped the order (its formula gives NaN there).
    with pytest.raises(ValueError, match="order must be finite"):
        call([2.0, math.inf])


def test_rdp_values_that_are_not_numbers_are_named():
    with pytest.raises(ValueError, match="rdp must be a sequence of numbers"):
        ft.get_privacy_spent([2.0], ["x"], 1e-5)


def test_epsilon_of_a_gaussian_run_is_the_conversion_by_hand():
    sigma, steps, delta = 3.0, 20, 1e-5
    rdp = ft.compute_rdp(1.0, sigma, steps, ORDERS)
    eps, order = ft.get_privacy_spent(ORDERS, rdp, delta)
    assert eps == pytest.approx(_gaussian_epsilon(sigma, steps, delta), rel=1e-13)
    assert order in ORDERS


# --------------------------------------------------------------------------------- accountant


def test_accountant_composes_a_changing_schedule_as_the_sum_of_its_parts():
    schedule = [(1.2, 0.02, 40), (0.8, 0.05, 0), (0.8, 0.05, 15), (1.2, 0.02, 5)]
    accountant = ft.RDPAccountant()
    for sigma, q, steps in schedule:
        accountant.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
    by_hand = [0.0] * len(ORDERS)
    for sigma, q, steps in schedule:
        by_hand = [t + r for t, r in zip(by_hand, ft.compute_rdp(q, sigma, steps, ORDERS))]
    eps, order = accountant.get_privacy_spent(delta=1e-6, orders=ORDERS)
    assert (eps, order) == ft.get_privacy_spent(ORDERS, by_hand, 1e-6)
    assert len(accountant) == 60


def test_accountant_state_survives_json_and_bad_states_change_nothing():
    accountant = ft.RDPAccountant()
    accountant.step(noise_multiplier=1.1, sample_rate=0.02, steps=7)
    accountant.step(noise_multiplier=0.9, sample_rate=0.01, steps=3)
    restored = ft.RDPAccountant()
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.history == accountant.history
    assert restored.get_epsilon(1e-5) == accountant.get_epsilon(1e-5)
    kept = list(restored.history)
    for bad in (
        None,
        {"history": "x"},
        {"history": [[1.0, 0.1, 3], [math.nan, 0.1, 3]]},  # the first entry is fine
        {"history": [[1.0, math.inf, 3]]},
        {"history": [[1.0, 0.1, True]]},
        {"history": [[1.0, 0.1, 2.0]]},
        {"history": [[-1.0, 0.1, 2]]},
    ):
        with pytest.raises((ValueError, TypeError)):
            restored.load_state_dict(bad)
        assert restored.history == kept


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan, True])
def test_accountant_refuses_delta_out_of_range(delta):
    accountant = ft.RDPAccountant()
    accountant.step(noise_multiplier=1.0, sample_rate=0.01, steps=10)
    with pytest.raises(ValueError, match="delta must be a number in"):
        accountant.get_epsilon(delta)


# ------------------------------------------------------------------------------ PoissonSampler


def test_sample_rate_one_takes_every_example_every_step():
    sampler = ft.PoissonSampler(17, 1.0, generator=torch.Generator().manual_seed(0))
    assert len(sampler) == 1 and sampler.expected_batch_size == 17.0
    batches = list(ft.PoissonSampler(17, 1, steps=4))
    assert batches == [list(range(17))] * 4


def test_a_rate_too_small_for_the_default_steps_is_a_clear_error():
    # Before: OverflowError from round(1/q) or from len().
    for q in (5e-324, 1e-300):
        with pytest.raises(ValueError, match="pass steps"):
            ft.PoissonSampler(10, q)
    assert len(ft.PoissonSampler(10, 1e-300, steps=3)) == 3


def test_iterating_again_continues_the_stream_and_a_fresh_seed_replays_it():
    sampler = ft.PoissonSampler(60, 0.2, steps=4, generator=torch.Generator().manual_seed(9))
    first, second = list(sampler), list(sampler)
    assert first != second
    replay = ft.PoissonSampler(60, 0.2, steps=8, generator=torch.Generator().manual_seed(9))
    assert list(replay) == first + second


def test_batches_are_the_definition_applied_to_the_generators_draws():
    gen = torch.Generator().manual_seed(3)
    batches = list(ft.PoissonSampler(50, 0.3, steps=3, generator=gen))
    gen = torch.Generator().manual_seed(3)
    for idx in batches:
        draws = torch.rand(50, generator=gen, dtype=torch.float64)
        assert idx == [i for i in range(50) if float(draws[i]) < 0.3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_generator_draws_on_its_device():
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = list(ft.PoissonSampler(100, 0.1, steps=3, generator=gen))
    assert len(batches) == 3 and all(idx == sorted(idx) for idx in batches)
