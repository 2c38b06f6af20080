"""Second review of schedules and inject_hyperparams: huge counts, the last steps of a decay,
non-finite arguments, host reads, and injected AdamW against a hand-written float64 AdamW.

References are closed forms written here and evaluated with mpmath at 50 digits (so that the
reference itself does not cancel near the end of a decay), never the schedule's own output.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import ClassVar

import mpmath
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import functrain as ft

mpf = mpmath.mpf
BIG = 2**40  # far past every schedule's end, beyond float32's and int32's integers


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def poly(i, e, p, t_steps, begin=0):
    def f(t):
        s = _clip(t - begin, 0, t_steps)
        return (mpf(i) - e) * (1 - mpf(s) / t_steps) ** p + e

    return f


def cos_decay(i, t_steps, alpha=0.0, p=1.0):
    def f(t):
        c = (1 + mpmath.cos(mpmath.pi * min(t, t_steps) / t_steps)) / 2
        return mpf(i) * ((1 - mpf(alpha)) * c ** mpf(p) + alpha)

    return f


def exp_decay(i, t_steps, rate, begin=0, stair=False, end=None):
    def f(t):
        d = t - begin
        if d <= 0:
            v = mpf(i)
        else:
            q = (d // t_steps) if stair else mpf(d) / t_steps
            v = mpf(i) * mpf(rate) ** q
        if end is not None:
            v = max(v, end) if rate < 1 else min(v, end)
        return v

    return f


def interp(kind, knots):
    """``knots``: [(step, value)], starting at step 0; optax's knot-to-knot interpolation."""

    def f(t):
        if t < 0:
            return mpf(0)
        for (a, va), (b, vb) in itertools.pairwise(knots):
            if a <= t < b:
                x = mpf(t - a) / (b - a)
                if kind == "linear":
                    return va + (mpf(vb) - va) * x
                return vb + (mpf(va) - vb) / 2 * (mpmath.cos(mpmath.pi * x) + 1)
        return mpf(knots[-1][1])

    return f


def joined(fs, bounds):
    def f(t):
        k = sum(t >= b for b in bounds)
        return fs[k](t - (bounds[k - 1] if k else 0))

    return f


W, D, END = 5, 20, 0.1
CASES: list[tuple[str, Callable, Callable, list[int]]] = [
    ("constant", ft.constant_schedule(0.3), lambda t: mpf(0.3), [0, 7]),
    ("linear_begin", ft.linear_schedule(0.2, 1.0, 8, 3), poly(0.2, 1.0, 1, 8, 3), [0, 2, 3, 4]),
    ("poly", ft.polynomial_schedule(1.0, 0.1, 3, 10, 2), poly(1.0, 0.1, 3, 10, 2), [5, 11, 12]),
    ("cosine", ft.cosine_decay_schedule(2.0, 9, 0.2, 1.5), cos_decay(2.0, 9, 0.2, 1.5), [4, 8]),
    ("exp", ft.exponential_decay(1.0, 4, 0.5, 3), exp_decay(1.0, 4, 0.5, 3), [0, 3, 4, 9]),
    (
        "exp_stair_end",
        ft.exponential_decay(1.0, 4, 0.5, 2, True, 0.2),
        exp_decay(1.0, 4, 0.5, 2, True, 0.2),
        [5, 6, 9, 10],
    ),
    (
        "exp_growth_cap",
        ft.exponential_decay(1.0, 2, 3.0, end_value=10.0),
        exp_decay(1.0, 2, 3.0, end=10.0),
        [1, 4, 5],
    ),
    (
        "piecewise_constant",
        ft.piecewise_constant_schedule(2.0, {3: 0.5, 6: 0.1}),
        lambda t: mpf(2.0) * (0.5 if t >= 3 else 1) * (mpf(0.1) if t >= 6 else 1),
        [2, 3, 5, 6],
    ),
    (
        "interp_cosine",
        ft.piecewise_interpolate_schedule("cosine", 1.0, {4: 2.0, 10: 0.1}),
        interp("cosine", [(0, 1.0), (4, 2.0), (10, 0.2)]),
        [1, 3, 4, 9, 10],
    ),
    (
        "warmup_cosine",
        ft.warmup_cosine_decay_schedule(0.0, 1.0, W, D, END, 2.0),
        joined([poly(0.0, 1.0, 1, W), cos_decay(1.0, D - W, END, 2.0)], [W]),
        [4, 5, 6, 19, 20, 21],
    ),
    (
        "warmup_exp",
        ft.warmup_exponential_decay_schedule(0.0, 1.0, W, 3, 0.5, 2, True, 0.2),
        joined([poly(0.0, 1.0, 1, W), exp_decay(1.0, 3, 0.5, 2, True, 0.2)], [W]),
        [4, 5, 7, 8, 11],
    ),
    (
        "sgdr",
        ft.sgdr_schedule(
            [{"init_value": 0.0, "peak_value": 1.0, "warmup_steps": 2, "decay_steps": 6}] * 2
        ),
        joined([joined([poly(0.0, 1.0, 1, 2), cos_decay(1.0, 4)], [2])] * 2, [6]),
        [5, 6, 7, 8, 11, 12],
    ),
    (
        "linear_onecycle",
        ft.linear_onecycle_schedule(20, 1.0, 0.25, 0.75, 10.0, 100.0),
        interp("linear", [(0, 0.1), (5, 1.0), (15, 0.1), (20, 0.001)]),
        [4, 5, 14, 15, 19, 20],
    ),
    (
        "cosine_onecycle",
        ft.cosine_onecycle_schedule(20, 1.0, 0.25, 10.0, 100.0),
        interp("cosine", [(0, 0.1), (5, 1.0), (20, 0.001)]),
        [4, 5, 19, 20],
    ),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(autouse=True)
def _fifty_digits():
    # The references run at 50 digits; mpmath's precision is global, so restore it after.
    with mpmath.workdps(50):
        yield


@pytest.mark.parametrize(("name", "sched", "ref", "extra"), CASES, ids=IDS)
def test_python_and_int64_tensor_counts_match_closed_forms(name, sched, ref, extra):
    for t in sorted({0, 1, 2, 50, BIG, *extra}):
        want = float(ref(t))
        got = sched(t)
        assert isinstance(got, float), (name, t)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), (name, t)
        out = sched(torch.tensor(t, dtype=torch.int64))
        assert out.dtype == torch.float32 and out.shape == (), (name, t)
        assert out.item() == pytest.approx(want, rel=2e-6, abs=1e-7), (name, t)


# Each failed before the fix. The staircase exponent was floor((t - B) / T) computed in float32
# (or float64 for a Python count): (3T - 1) / T rounds to 3.0 and the drop came a step early.
STAIR_T = 10**7


@pytest.mark.parametrize("count", [3 * STAIR_T - 1, 3 * STAIR_T, 2**25 - 1])
def test_staircase_exponent_is_exact_beyond_float32_integers(count):
    sched = ft.exponential_decay(1.0, STAIR_T, 0.5, staircase=True)
    want = 0.5 ** (count // STAIR_T)
    assert sched(torch.tensor(count)).item() == want
    assert sched(count) == want


def test_staircase_exponent_is_exact_for_python_counts_beyond_float64_integers():
    t_steps = 10**17
    sched = ft.exponential_decay(1.0, t_steps, 0.5, staircase=True)
    assert sched(3 * t_steps - 1) == 0.25  # float64 rounded (3T - 1) / T to 3.0
    assert sched(torch.tensor(3 * t_steps - 1)).item() == 0.25


# A decay to 0: ``1 - s / T`` cancelled, so the last steps had a value 0 (float32, T > 2**24)
# or lost their relative precision; the cosine's ``1 + cos`` cancels the same way.
LONG = 5 * 10**7
END_CASES = [  # (name, schedule, reference, the step at which it reaches its end)
    ("linear_long", ft.linear_schedule(1.0, 0.0, LONG), poly(1.0, 0.0, 1, LONG), LONG),
    ("poly_long", ft.polynomial_schedule(1.0, 0.0, 2, 10**6), poly(1.0, 0.0, 2, 10**6), 10**6),
    ("cosine_1000", ft.cosine_decay_schedule(1.0, 1000), cos_decay(1.0, 1000), 1000),
    (
        "cosine_long",
        ft.cosine_decay_schedule(3.0, 10**5, 0.0, 1.5),
        cos_decay(3.0, 10**5, 0.0, 1.5),
        10**5,
    ),
    (
        "cosine_onecycle",
        ft.cosine_onecycle_schedule(1000, 1.0),
        interp("cosine", [(0, 0.04), (300, 1.0), (1000, 0.04 / 1e4)]),
        1000,
    ),
]


@pytest.mark.parametrize(("name", "sched", "ref", "end"), END_CASES, ids=[c[0] for c in END_CASES])
def test_last_steps_of_a_decay_keep_their_relative_precision(name, sched, ref, end):
    for t in (end - 3, end - 2, end - 1):
        want = float(ref(t))
        assert want > 0
        assert sched(t) == pytest.approx(want, rel=1e-13, abs=0), (name, t)
        for dtype in (torch.int32, torch.int64):
            got = sched(torch.tensor(t, dtype=dtype)).item()
            assert got == pytest.approx(want, rel=1e-5, abs=0), (name, t, dtype)
    assert sched(end) == float(ref(end))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ft.linear_schedule(1.0, 0.0, float("nan")),
        lambda: ft.polynomial_schedule(1.0, 0.0, 2, 10, float("nan")),
        lambda: ft.exponential_decay(1.0, float("nan"), 0.5),
        lambda: ft.cosine_decay_schedule(1.0, float("inf")),
        lambda: ft.warmup_cosine_decay_schedule(0.0, 1.0, float("nan"), 10),
        lambda: ft.piecewise_constant_schedule(1.0, {float("nan"): 0.5}),
        lambda: ft.join_schedules([ft.constant_schedule(1.0)] * 2, [float("nan")]),
    ],
)
def test_non_finite_steps_and_boundaries_raise(make):
    # nan passed every ``<= 0`` check and made every value nan.
    with pytest.raises(ValueError, match="finite"):
        make()


class _NoHostReads(TorchDispatchMode):
    # As tests/optim/test_no_host_reads.py: on CUDA a read is a device sync every step.
    READS: ClassVar[set] = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read of a tensor: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "sched", "ref", "extra"), CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_tensor_counts_read_nothing_on_the_host(name, sched, ref, extra, dtype):
    counts = torch.tensor([0, 3, 7, 2**30], dtype=dtype)
    with _NoHostReads():
        out = sched(counts)
        one = sched(counts[1])
    assert out.shape == (4,) and one.shape == ()
    assert out[1].item() == pytest.approx(float(ref(3)), rel=2e-6, abs=1e-7)


def test_injected_adamw_with_schedules_matches_hand_written_adamw():
    """Schedules are called with the int32 count (0 at the first update), their values recorded
    and used; the values are exact in float32, so float64 params match to rounding."""
    lr = ft.linear_schedule(0.5, 0.25, 4)  # 0.5, 0.4375, ... exact in float32
    wd = ft.exponential_decay(0.5, 1, 0.5)  # 0.5, 0.25, 0.125, ...
    tx = ft.inject_hyperparams(ft.adamw)(learning_rate=lr, b1=0.75, b2=0.875, weight_decay=wd)
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    grads = [{"w": torch.randn(4, 3, generator=g, dtype=torch.float64)} for _ in range(6)]
    state = tx.init(params)
    assert state.count.dtype == torch.int32 and int(state.count) == 0
    p, m, v = params["w"].clone(), torch.zeros(4, 3, dtype=torch.float64), 0 * params["w"]
    for k, gr in enumerate(grads):
        updates, state = tx.update(gr, state, params)
        lr_k = 0.5 + (0.25 - 0.5) * min(k, 4) / 4
        wd_k = 0.5 * 0.5**k
        assert state.hyperparams["learning_rate"].item() == lr_k
        assert state.hyperparams["weight_decay"].item() == wd_k
        assert state.hyperparams["learning_rate"].dtype == torch.float64
        m = 0.75 * m + 0.25 * gr["w"]
        v = 0.875 * v + 0.125 * gr["w"] ** 2
        m_hat, v_hat = m / (1 - 0.75 ** (k + 1)), v / (1 - 0.875 ** (k + 1))
        want = -lr_k * (m_hat / (v_hat.sqrt() + 1e-8) + wd_k * p)
        torch.testing.assert_close(updates["w"], want, rtol=1e-13, atol=1e-15)
        p = p + want
        params = ft.apply_updates(params, updates)
        assert state.count.dtype == torch.int32 and int(state.count) == k + 1
    assert not math.isnan(float(state.hyperparams["b1"]))


@pytest.mark.parametrize(
    "sched",
    [ft.polynomial_schedule(1.0, 0.0, -1.0, 4), ft.cosine_decay_schedule(1.0, 4, 0.0, -1.0)],
    ids=["polynomial", "cosine"],
)
def test_negative_power_at_the_end_gives_inf_for_python_counts_too(sched):
    # 0.0 ** -1 raised ZeroDivisionError for a Python count; a tensor count (and optax) gives inf.
    assert sched(2) == pytest.approx(2.0)  # (1 - 2/4) ** -1 and ((1 + cos(pi/2)) / 2) ** -1
    assert sched(4) == math.inf and sched(10) == math.inf
    assert sched(torch.tensor(4)).item() == math.inf
