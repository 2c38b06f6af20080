"""Regressions found by the differential check against optax (``tools/optax_parity.py``).

The references are closed forms written here; CI does not install jax or optax. Each docstring
says what optax does.
"""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.adam(0.1, nesterov=True),
        lambda: ft.adamax(0.1),
        lambda: ft.ema(0.9),
        lambda: ft.rmsprop(0.1, bias_correction=True),
        lambda: ft.add_decayed_weights(lambda n: torch.tensor(0.5, dtype=torch.float64)),
        lambda: ft.lion(0.1, weight_decay=lambda n: torch.tensor(0.5, dtype=torch.float64)),
        lambda: ft.scale_by_schedule(lambda n: torch.tensor(-0.1, dtype=torch.float64)),
    ],
    ids=["nadam", "adamax", "ema", "rmsprop_bias_correction", "wd_schedule", "lion", "schedule"],
)
def test_zero_dim_float32_leaf_keeps_its_dtype(make: object) -> None:
    """optax returns every update leaf in its own dtype; a 0-d float32 leaf stays float32.

    The float64 bias correction (or a float64 schedule value) is itself 0-d, and torch promotes
    0-d with 0-d, so a 0-d float32 parameter used to get a float64 update.
    """
    tx = make()
    params = {"s": torch.tensor(1.0), "v": torch.ones(2)}
    updates, _ = tx.update({"s": torch.tensor(2.0), "v": torch.ones(2)}, tx.init(params), params)
    assert updates["s"].dtype == torch.float32
    assert updates["s"].shape == ()
    assert updates["v"].dtype == torch.float32


def test_zero_dim_ema_value() -> None:
    """optax's debiased EMA of a constant ``g`` is ``g`` at every step, in ``g``'s dtype."""
    tx = ft.ema(0.9)
    state = tx.init([torch.tensor(0.0)])
    for _ in range(3):
        u, state = tx.update([torch.tensor(2.5)], state)
        assert u[0].dtype == torch.float32
        torch.testing.assert_close(u[0], torch.tensor(2.5))


def test_exponential_decay_growth_overflow_is_inf_then_bounded() -> None:
    """optax computes ``init · rate ** p`` in floats: it overflows to ``inf`` (then clipped to
    ``end_value``) where Python's ``float ** float`` raised ``OverflowError`` for an int count.
    """
    bounded = ft.exponential_decay(1.0, 3, 1.5, staircase=True, end_value=4.0)
    assert bounded(10**6) == 4.0
    assert bounded(torch.tensor(10**6)).item() == 4.0
    unbounded = ft.exponential_decay(2.0, 1, 10.0)
    assert unbounded(10**4) == math.inf
    assert unbounded(3) == pytest.approx(2.0 * 10.0**3)


def test_amsgrad_alias_takes_bias_correction_flags() -> None:
    """optax's ``amsgrad`` alias has ``bias_correction_mu``/``bias_correction_nu`` (default True).

    Without corrections the first step is ``-lr · (1 − b1) g / (√((1 − b2) g²) + eps)``.
    """
    lr, b1, b2, g = 0.1, 0.9, 0.99, 2.0
    tx = ft.amsgrad(lr, b1, b2, eps=0.0, bias_correction_mu=False, bias_correction_nu=False)
    params = [torch.zeros((), dtype=torch.float64)]
    u, _ = tx.update([torch.tensor(g, dtype=torch.float64)], tx.init(params), params)
    expected = -lr * (1 - b1) * g / math.sqrt((1 - b2) * g * g)
    assert u[0].item() == pytest.approx(expected, rel=1e-12)
    tx = ft.amsgrad(lr, b1, b2, eps=0.0, bias_correction_mu=False)
    u, _ = tx.update([torch.tensor(g, dtype=torch.float64)], tx.init(params), params)
    assert u[0].item() == pytest.approx(-lr * (1 - b1) * g / abs(g), rel=1e-12)
