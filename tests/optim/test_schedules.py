"""Schedules against closed forms written here with ``math``, and against torch.optim.lr_scheduler.

Each schedule is evaluated at many steps three ways: with Python ints (double precision, must
match the closed form to 1e-12), with int32/int64 count tensors (default float32 results), and
with float64 count tensors (float64 results, 1e-12).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.optim import lr_scheduler as lrs

import functrain as ft

N = 120  # steps checked per schedule


def _lerp(a: float, b: float, frac: float) -> float:
    return a + (b - a) * frac


def _half_cos(a: float, b: float, frac: float) -> float:
    # From a to b along half a cosine period.
    return b + (a - b) * (1 + math.cos(math.pi * frac)) / 2


def poly_ref(init, end, power, steps, begin=0):
    def f(t):
        if steps <= 0 or t <= begin:
            return init
        if t >= begin + steps:
            return end
        return (init - end) * (1 - (t - begin) / steps) ** power + end

    return f


def linear_ref(init, end, steps, begin=0):
    def f(t):
        if t <= begin:
            return init
        if t >= begin + steps:
            return end
        return _lerp(init, end, (t - begin) / steps)

    return f


def cosine_ref(init, decay_steps, alpha=0.0, exponent=1.0):
    def f(t):
        t = min(t, decay_steps)
        return (
            alpha * init
            + (1 - alpha) * init * (0.5 + 0.5 * math.cos(math.pi * t / decay_steps)) ** exponent
        )

    return f


def exp_ref(init, steps, rate, begin=0, staircase=False, end=None):
    def f(t):
        if t <= begin:
            value = init
        else:
            e = (t - begin) / steps
            value = init * rate ** (math.floor(e) if staircase else e)
        if end is not None:
            value = max(value, end) if rate < 1 else min(value, end)
        return value

    return f


def piecewise_constant_ref(init, boundaries_and_scales):
    def f(t):
        value = init
        for b, s in boundaries_and_scales.items():
            if t >= b:
                value *= s
        return value

    return f


def knots_ref(knots: list[tuple[int, float]], shape: Callable[[float, float, float], float]):
    """Interpolation between (step, value) knots; the last value after the last knot."""

    def f(t):
        if t >= knots[-1][0]:
            return knots[-1][1]
        for (b0, v0), (b1, v1) in itertools.pairwise(knots):
            if b0 <= t < b1:
                return shape(v0, v1, (t - b0) / (b1 - b0))
        raise AssertionError("unreachable")

    return f


def warmup_cosine_ref(init, peak, warmup, decay_steps, end=0.0, exponent=1.0):
    def f(t):
        if t < warmup:
            return _lerp(init, peak, t / warmup)
        s = min(t - warmup, decay_steps - warmup)
        c = (0.5 * (1 + math.cos(math.pi * s / (decay_steps - warmup)))) ** exponent
        return end + (peak - end) * c

    return f


def warmup_exp_ref(init, peak, warmup, steps, rate, begin=0, staircase=False, end=None):
    decay = exp_ref(peak, steps, rate, begin, staircase, end)

    def f(t):
        return _lerp(init, peak, t / warmup) if t < warmup else decay(t - warmup)

    return f


def sgdr_ref(cycles):
    def f(t):
        start = 0
        for i, c in enumerate(cycles):
            last = i == len(cycles) - 1
            if t < start + c["decay_steps"] or last:
                return warmup_cosine_ref(**c)(t - start)
            start += c["decay_steps"]
        raise AssertionError("unreachable")

    return f


# (name, schedule, closed form, float32 atol relative to the scale of the values)
CASES = [
    ("constant", ft.constant_schedule(0.3), lambda t: 0.3),
    ("linear", ft.linear_schedule(0.9, 0.05, 50), linear_ref(0.9, 0.05, 50)),
    ("linear_begin", ft.linear_schedule(0.1, 1.0, 37, 11), linear_ref(0.1, 1.0, 37, 11)),
    ("linear_up_negative", ft.linear_schedule(-1.0, 2.0, 64), linear_ref(-1.0, 2.0, 64)),
    ("polynomial", ft.polynomial_schedule(1.0, 0.01, 2, 100), poly_ref(1.0, 0.01, 2, 100)),
    (
        "polynomial_frac_power_begin",
        ft.polynomial_schedule(0.5, 0.1, 0.7, 40, 15),
        poly_ref(0.5, 0.1, 0.7, 40, 15),
    ),
    ("cosine", ft.cosine_decay_schedule(2.0, 80), cosine_ref(2.0, 80)),
    (
        "cosine_alpha_exponent",
        ft.cosine_decay_schedule(1.5, 77, alpha=0.1, exponent=2.0),
        cosine_ref(1.5, 77, 0.1, 2.0),
    ),
    ("exponential", ft.exponential_decay(1.0, 10, 0.5), exp_ref(1.0, 10, 0.5)),
    (
        "exponential_staircase_begin_end",
        ft.exponential_decay(2.0, 7, 0.8, transition_begin=13, staircase=True, end_value=0.5),
        exp_ref(2.0, 7, 0.8, 13, True, 0.5),
    ),
    (
        "exponential_growth_capped",
        ft.exponential_decay(0.1, 5, 1.3, end_value=2.0),
        exp_ref(0.1, 5, 1.3, 0, False, 2.0),
    ),
    (
        "piecewise_constant",
        ft.piecewise_constant_schedule(1.0, {60: 0.1, 30: 0.5, 90: 2.0}),
        piecewise_constant_ref(1.0, {30: 0.5, 60: 0.1, 90: 2.0}),
    ),
    (
        "piecewise_interpolate_linear",
        ft.piecewise_interpolate_schedule("linear", 1.0, {20: 0.1, 50: 4.0, 70: 0.5}),
        knots_ref([(0, 1.0), (20, 0.1), (50, 0.4), (70, 0.2)], _lerp),
    ),
    (
        "piecewise_interpolate_cosine",
        ft.piecewise_interpolate_schedule("cosine", 2.0, {25: 0.5, 100: 0.01}),
        knots_ref([(0, 2.0), (25, 1.0), (100, 0.01)], _half_cos),
    ),
    (
        "warmup_constant",
        ft.warmup_constant_schedule(0.0, 0.7, 25),
        knots_ref([(0, 0.0), (25, 0.7)], _lerp),
    ),
    (
        "warmup_cosine",
        ft.warmup_cosine_decay_schedule(0.01, 1.0, 10, 100, end_value=0.05),
        warmup_cosine_ref(0.01, 1.0, 10, 100, 0.05),
    ),
    (
        "warmup_cosine_exponent",
        ft.warmup_cosine_decay_schedule(0.0, 0.5, 7, 60, exponent=1.5),
        warmup_cosine_ref(0.0, 0.5, 7, 60, 0.0, 1.5),
    ),
    (
        "warmup_exponential",
        ft.warmup_exponential_decay_schedule(0.0, 1.0, 12, 8, 0.7, transition_begin=5),
        warmup_exp_ref(0.0, 1.0, 12, 8, 0.7, 5),
    ),
    (
        "warmup_exponential_staircase_end",
        ft.warmup_exponential_decay_schedule(0.1, 1.0, 5, 10, 0.5, staircase=True, end_value=0.2),
        warmup_exp_ref(0.1, 1.0, 5, 10, 0.5, 0, True, 0.2),
    ),
    (
        "linear_onecycle",
        ft.linear_onecycle_schedule(100, 2.0),
        # Knots from the docstring: peak/25 -> peak at 30 -> peak/25 at 85 -> peak/25/1e4 at 100.
        knots_ref([(0, 0.08), (30, 2.0), (85, 0.08), (100, 0.08 / 1e4)], _lerp),
    ),
    (
        "cosine_onecycle",
        ft.cosine_onecycle_schedule(
            90, 1.0, pct_start=0.25, div_factor=10.0, final_div_factor=100.0
        ),
        knots_ref([(0, 0.1), (22, 1.0), (90, 0.001)], _half_cos),
    ),
    (
        "sgdr",
        ft.sgdr_schedule(
            [
                dict(init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=40),
                dict(
                    init_value=0.1, peak_value=0.5, warmup_steps=0, decay_steps=30, end_value=0.01
                ),
                dict(init_value=0.2, peak_value=0.3, warmup_steps=10, decay_steps=25),
            ]
        ),
        sgdr_ref(
            [
                dict(init=0.0, peak=1.0, warmup=5, decay_steps=40),
                dict(init=0.1, peak=0.5, warmup=0, decay_steps=30, end=0.01),
                dict(init=0.2, peak=0.3, warmup=10, decay_steps=25),
            ]
        ),
    ),
    (
        "join",
        ft.join_schedules(
            [
                ft.constant_schedule(1.0),
                ft.linear_schedule(1.0, 0.0, 20),
                ft.constant_schedule(0.3),
            ],
            [15, 50],
        ),
        lambda t: 1.0 if t < 15 else (max(0.0, 1.0 - (t - 15) / 20) if t < 50 else 0.3),
    ),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("name", "sched", "ref"), CASES, ids=IDS)
def test_python_int_counts_match_closed_form(name, sched, ref):
    for t in range(N):
        got = sched(t)
        assert type(got) is float, (name, t, type(got))
        assert got == pytest.approx(ref(t), rel=1e-12, abs=1e-14), (name, t)


@pytest.mark.parametrize(("name", "sched", "ref"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_integer_tensor_counts_match_closed_form(name, sched, ref, dtype):
    counts = torch.arange(N, dtype=dtype)
    got = sched(counts)
    assert got.dtype == torch.float32 and got.shape == counts.shape
    expected = torch.tensor([ref(t) for t in range(N)], dtype=torch.float64)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=2e-6 * scale)
    # A 0-d count gives a 0-d tensor (this is how transforms call schedules).
    zero_d = sched(torch.tensor(N // 3, dtype=dtype))
    assert zero_d.shape == () and zero_d.dtype == torch.float32
    assert zero_d.item() == pytest.approx(ref(N // 3), rel=2e-6, abs=2e-6 * scale)


@pytest.mark.parametrize(("name", "sched", "ref"), CASES, ids=IDS)
def test_float64_tensor_counts_match_closed_form(name, sched, ref):
    counts = torch.arange(N, dtype=torch.float64)
    got = sched(counts)
    assert got.dtype == torch.float64
    expected = torch.tensor([ref(t) for t in range(N)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("name", "sched", "ref"), CASES, ids=IDS)
def test_default_dtype_float64_gives_float64(name, sched, ref):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = sched(torch.arange(N, dtype=torch.int32))
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == torch.float64
    expected = torch.tensor([ref(t) for t in range(N)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_schedules_compile_fullgraph_without_recompiling():
    from torch._dynamo.testing import CompileCounter

    for name, sched, ref in CASES:
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(lambda c, s=sched: s(c), backend=counter, fullgraph=True)
        for t in (0, 1, 17, 63, 110):
            got = compiled(torch.tensor(t, dtype=torch.int32))
            assert got.item() == pytest.approx(ref(t), rel=2e-6, abs=1e-6), (name, t)
        assert counter.frame_count == 1, name


# --- torch.optim.lr_scheduler sequences where the maths coincides -------------------------


def torch_lrs(make_scheduler, lr: float, steps: int) -> list[float]:
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    scheduler = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def assert_sequence(sched, expected: list[float], rel: float = 1e-9) -> None:
    for t, e in enumerate(expected):
        assert sched(t) == pytest.approx(e, rel=rel, abs=1e-13), t
    got = sched(torch.arange(len(expected), dtype=torch.float64))
    torch.testing.assert_close(
        got, torch.tensor(expected, dtype=torch.float64), rtol=rel, atol=1e-13
    )


def test_linear_matches_linear_lr():
    expected = torch_lrs(
        lambda o: lrs.LinearLR(o, start_factor=0.8, end_factor=0.1, total_iters=40), 0.5, 60
    )
    assert_sequence(ft.linear_schedule(0.4, 0.05, 40), expected)


def test_warmup_constant_matches_linear_lr():
    expected = torch_lrs(lambda o: lrs.LinearLR(o, start_factor=0.1, total_iters=15), 2.0, 40)
    assert_sequence(ft.warmup_constant_schedule(0.2, 2.0, 15), expected)


def test_polynomial_matches_polynomial_lr():
    expected = torch_lrs(lambda o: lrs.PolynomialLR(o, total_iters=30, power=2.0), 0.3, 45)
    assert_sequence(ft.polynomial_schedule(0.3, 0.0, 2.0, 30), expected)


def test_cosine_matches_cosine_annealing_up_to_decay_steps():
    expected = torch_lrs(lambda o: lrs.CosineAnnealingLR(o, T_max=50, eta_min=0.02), 0.4, 51)
    assert_sequence(ft.cosine_decay_schedule(0.4, 50, alpha=0.05), expected)


def test_exponential_matches_exponential_lr_and_step_lr():
    expected = torch_lrs(lambda o: lrs.ExponentialLR(o, gamma=0.95), 0.7, 80)
    assert_sequence(ft.exponential_decay(0.7, 1, 0.95), expected)
    expected = torch_lrs(lambda o: lrs.StepLR(o, step_size=7, gamma=0.5), 0.7, 80)
    assert_sequence(ft.exponential_decay(0.7, 7, 0.5, staircase=True), expected)


def test_piecewise_constant_matches_multistep_lr():
    expected = torch_lrs(lambda o: lrs.MultiStepLR(o, milestones=[10, 25, 40], gamma=0.3), 1.0, 60)
    sched = ft.piecewise_constant_schedule(1.0, {10: 0.3, 25: 0.3, 40: 0.3})
    assert_sequence(sched, expected)


def test_warmup_cosine_matches_sequential_linear_then_cosine_annealing():
    init, peak, warmup, decay, end = 0.05, 1.0, 10, 70, 0.01

    def make(o):
        return lrs.SequentialLR(
            o,
            [
                lrs.LinearLR(o, start_factor=init / peak, end_factor=1.0, total_iters=warmup),
                lrs.CosineAnnealingLR(o, T_max=decay - warmup, eta_min=end),
            ],
            milestones=[warmup],
        )

    expected = torch_lrs(make, peak, decay + 1)
    assert_sequence(ft.warmup_cosine_decay_schedule(init, peak, warmup, decay, end), expected)


def test_warmup_exponential_matches_sequential_linear_then_exponential():
    def make(o):
        return lrs.SequentialLR(
            o,
            [lrs.LinearLR(o, start_factor=0.1, total_iters=8), lrs.ExponentialLR(o, gamma=0.9)],
            milestones=[8],
        )

    expected = torch_lrs(make, 0.5, 50)
    assert_sequence(ft.warmup_exponential_decay_schedule(0.05, 0.5, 8, 1, 0.9), expected)


def test_sgdr_matches_cosine_annealing_warm_restarts():
    expected = torch_lrs(
        lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=20, eta_min=0.001), 0.1, 80
    )
    cycle = dict(init_value=0.1, peak_value=0.1, warmup_steps=0, decay_steps=20, end_value=0.001)
    assert_sequence(ft.sgdr_schedule([cycle] * 4), expected)


# --- consistency, argument handling ------------------------------------------------------


@given(
    init=st.floats(-10, 10),
    end=st.floats(-10, 10),
    power=st.floats(0.1, 4),
    steps=st.integers(1, 500),
    begin=st.integers(0, 100),
    t=st.integers(0, 1000),
)
def test_polynomial_tensor_and_python_paths_agree(init, end, power, steps, begin, t):
    sched = ft.polynomial_schedule(init, end, power, steps, begin)
    ref = poly_ref(init, end, power, steps, begin)(t)
    assert sched(t) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    assert sched(torch.tensor(float(t), dtype=torch.float64)).item() == pytest.approx(
        ref, rel=1e-12, abs=1e-12
    )


@given(
    boundaries=st.dictionaries(st.integers(0, 300), st.floats(0, 3), max_size=5),
    kind=st.sampled_from(["linear", "cosine"]),
    t=st.integers(0, 400),
)
def test_piecewise_interpolate_tensor_and_python_paths_agree(boundaries, kind, t):
    sched = ft.piecewise_interpolate_schedule(kind, 1.5, boundaries)
    got64 = sched(torch.tensor(float(t), dtype=torch.float64)).item()
    assert got64 == pytest.approx(sched(t), rel=1e-12, abs=1e-12)


def test_tensor_values_and_devices():
    sched = ft.warmup_cosine_decay_schedule(torch.tensor(0.0), torch.tensor(1.0), 5, 20)
    assert sched(10).item() == pytest.approx(warmup_cosine_ref(0.0, 1.0, 5, 20)(10), rel=1e-6)
    const = ft.constant_schedule(torch.tensor(0.25, dtype=torch.float64))
    assert const(torch.tensor(3)).dtype == torch.float64
    assert ft.constant_schedule(2)(5) == 2.0 and type(ft.constant_schedule(2)(5)) is float


def test_degenerate_arguments_follow_optax(caplog):
    with caplog.at_level(logging.INFO, logger="functrain.optim.schedules"):
        sched = ft.linear_schedule(0.3, 0.0, transition_steps=0)
    assert [sched(t) for t in (0, 5, 100)] == [0.3, 0.3, 0.3]
    assert sched(torch.tensor(4)).item() == pytest.approx(0.3)
    assert "non-positive `transition_steps`" in caplog.text
    assert ft.exponential_decay(0.5, 0, 0.5)(10) == 0.5
    assert ft.exponential_decay(0.5, 10, 0.0)(10) == 0.5
    # A negative transition_begin falls back to 0.
    assert ft.linear_schedule(1.0, 0.0, 10, transition_begin=-5)(5) == 0.5
    # Empty boundaries: constant (piecewise_interpolate is 0 for negative counts, as optax).
    assert ft.piecewise_constant_schedule(0.7)(50) == 0.7
    assert ft.piecewise_interpolate_schedule("linear", 0.7)(50) == 0.7
    assert ft.piecewise_interpolate_schedule("linear", 0.7)(-1) == 0.0


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ft.cosine_decay_schedule(1.0, 0), ValueError, "positive decay_steps"),
        (
            lambda: ft.warmup_cosine_decay_schedule(0.0, 1.0, 10, 10),
            ValueError,
            "decay_steps > warmup",
        ),
        (lambda: ft.piecewise_constant_schedule(1.0, {5: -0.1}), ValueError, "non-negative"),
        (
            lambda: ft.piecewise_interpolate_schedule("linear", 1.0, {5: -1.0}),
            ValueError,
            "non-negative",
        ),
        (
            lambda: ft.piecewise_interpolate_schedule("quadratic", 1.0),
            ValueError,
            "'cosine' or 'linear'",
        ),
        (lambda: ft.exponential_decay(1.0, 10, -0.5), ValueError, "non-negative"),
        (lambda: ft.linear_onecycle_schedule(0, 1.0), ValueError, "non-positive"),
        (lambda: ft.cosine_onecycle_schedule(-3, 1.0), ValueError, "non-positive"),
        (lambda: ft.join_schedules([ft.constant_schedule(1.0)] * 3, [10, 5]), ValueError, "sorted"),
        (
            lambda: ft.join_schedules([ft.constant_schedule(1.0)] * 2, [1, 2]),
            ValueError,
            "one boundary fewer",
        ),
        (
            lambda: ft.join_schedules([1.0, ft.constant_schedule(1.0)], [1]),
            TypeError,
            r"schedules\[0\]",
        ),
        (
            lambda: ft.sgdr_schedule([dict(init_value=0.0, peak_value=1.0, warmup_steps=0)]),
            ValueError,
            "decay_steps",
        ),
        (lambda: ft.linear_schedule(1.0, 0.0, "10"), TypeError, "transition_steps"),
    ],
)
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("count", ["3", None, True, torch.tensor(True), torch.tensor(1j)])
def test_bad_counts_raise(count):
    with pytest.raises(TypeError, match="count"):
        ft.linear_schedule(1.0, 0.0, 10)(count)
