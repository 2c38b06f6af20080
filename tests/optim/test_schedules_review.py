"""Review of schedule edges: counts in narrow integer dtypes, huge steps, result kinds and devices.

References are closed forms evaluated by hand in float64 (optax's documented formulas), never
the schedule's own Python path.
"""

from __future__ import annotations

import math

import pytest
import torch

import functrain as ft

I32 = torch.int32


def _count(value: int | list[int], dtype: torch.dtype = I32) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


# (name, schedule, count dtype, count, closed-form value). Each step or boundary lies beyond
# the count's dtype: torch wraps such a Python int instead of raising
# (``tensor(5, dtype=int32) < 2**31`` is False), which silently gave the later value.
WIDE_CASES = [
    ("piecewise_constant", ft.piecewise_constant_schedule(1.0, {2**31: 0.5}), I32, 5, 1.0),
    (
        "piecewise_constant_uint8",
        ft.piecewise_constant_schedule(1.0, {300: 0.5}),
        torch.uint8,
        100,
        1.0,
    ),
    (
        "piecewise_constant_int16",
        ft.piecewise_constant_schedule(2.0, {40_000: 0.5}),
        torch.int16,
        30_000,
        2.0,
    ),
    (
        "join",
        ft.join_schedules([ft.constant_schedule(1.0), ft.constant_schedule(2.0)], [2**31]),
        I32,
        5,
        1.0,
    ),
    ("linear_begin", ft.linear_schedule(1.0, 0.0, 10, transition_begin=2**32), I32, 5, 1.0),
    # Unsigned: 5 - 10 wrapped to 251, past the whole transition.
    ("linear_begin_uint8", ft.linear_schedule(1.0, 0.0, 20, 10), torch.uint8, 5, 1.0),
    (
        "exponential_begin",
        ft.exponential_decay(1.0, 10, 0.5, transition_begin=2**32 + 3),
        I32,
        5,
        1.0,
    ),
    (
        "interpolate",
        ft.piecewise_interpolate_schedule("linear", 1.0, {2**31: 0.5}),
        I32,
        2**30,
        1.0 + (0.5 - 1.0) * 2**30 / 2**31,
    ),
    # These raised "value cannot be converted to type int without overflow".
    ("linear_steps", ft.linear_schedule(1.0, 0.0, 2**31), I32, 2**30, 0.5),
    (
        "cosine_steps",
        ft.cosine_decay_schedule(1.0, 2**31),
        I32,
        2**30,
        0.5 * (1 + math.cos(math.pi / 2)),
    ),
]


@pytest.mark.parametrize(
    ("name", "sched", "dtype", "count", "expected"), WIDE_CASES, ids=[c[0] for c in WIDE_CASES]
)
def test_integer_counts_compare_with_steps_beyond_their_dtype(name, sched, dtype, count, expected):
    out = sched(_count(count, dtype))
    assert out.dtype == torch.float32
    assert float(out) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_wide_steps_stay_exact_for_int32_counts_under_compile():
    sched = ft.piecewise_constant_schedule(1.0, {2**31: 0.5, 3: 0.1})
    compiled = torch.compile(sched, fullgraph=True)
    expected = [1.0, 1.0, 1.0, 0.1, 0.1]
    got = [float(compiled(_count(c))) for c in range(5)]
    assert got == pytest.approx(expected, rel=1e-7)


def test_constant_schedule_integer_tensor_value_gives_a_float_tensor():
    # Every schedule returns a floating value for a tensor count (the Schedule contract).
    out = ft.constant_schedule(torch.tensor(5))(_count(3))
    assert out.is_floating_point()
    assert float(out) == 5.0


def test_join_schedules_python_count_gives_a_python_float():
    sched = ft.join_schedules([lambda c: 1, lambda c: 2], boundaries=[3])
    values = [sched(c) for c in range(5)]
    assert values == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert all(type(v) is float for v in values)


ALL = {
    "constant": ft.constant_schedule(0.5),
    "linear": ft.linear_schedule(1.0, 0.1, 5, 2),
    "polynomial": ft.polynomial_schedule(1.0, 0.1, 2.0, 5, 2),
    "cosine": ft.cosine_decay_schedule(1.0, 5, 0.1, 2.0),
    "exponential": ft.exponential_decay(1.0, 3, 0.5, 2, True, 0.2),
    "piecewise_constant": ft.piecewise_constant_schedule(1.0, {3: 0.5, 6: 0.1}),
    "interp_cos": ft.piecewise_interpolate_schedule("cosine", 1.0, {3: 0.5, 6: 0.1}),
    "warmup_cosine": ft.warmup_cosine_decay_schedule(0.0, 1.0, 3, 8, 0.1),
    "warmup_exp": ft.warmup_exponential_decay_schedule(0.0, 1.0, 3, 2, 0.5),
    "onecycle": ft.cosine_onecycle_schedule(10, 1.0),
    "sgdr": ft.sgdr_schedule(
        [dict(init_value=0.0, peak_value=1.0, warmup_steps=1, decay_steps=3)] * 2
    ),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_results_follow_the_counts_device_and_shape(name):
    # The meta device stands in for an accelerator: a value built on the CPU would show here.
    out = ALL[name](torch.arange(4, device="meta"))
    assert out.device.type == "meta"
    assert out.is_floating_point()
    assert out.shape == (4,)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_transition_steps_exactly_match_closed_forms(dtype):
    # Boundaries exactly at the transition step take the later piece (optax's ``<=``/``>=``).
    counts = _count([0, 2, 3, 5, 6, 7], dtype)
    pc = ft.piecewise_constant_schedule(2.0, {3: 0.5, 6: 0.1})(counts)
    assert pc.tolist() == pytest.approx([2.0, 2.0, 1.0, 1.0, 0.1, 0.1])
    join = ft.join_schedules([ft.constant_schedule(1.0), ft.linear_schedule(1.0, 0.0, 2)], [3])
    assert join(counts).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    stair = ft.exponential_decay(1.0, 3, 0.5, staircase=True)(counts)
    assert stair.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
