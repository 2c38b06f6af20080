"""Review tests for ``ft.projections``: extreme magnitudes, gradients through the projections.

References: the l2 projections' closed forms evaluated by hand with ``math.hypot`` (which does
not overflow) in float64; exact scale relations under powers of two (``2ᵏ`` scales a float
without rounding); ``torch.autograd.gradcheck``'s central finite differences in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import projections as P

F32, F64 = torch.float32, torch.float64


def _ref_l2(x: list[float], scale: float, ball: bool) -> list[float]:
    """``x · scale / ‖x‖`` (sphere) or ``x · scale / max(‖x‖, scale)`` (ball), overflow-free."""
    n = math.hypot(*x)
    d = max(n, scale) if ball else n
    return [v / d * scale for v in x]


# (dtype, magnitude) pairs whose sum of squares overflows or underflows the dtype.
EXTREMES = [(F32, 1e20), (F32, 1e-30), (F64, 1e160), (F64, 1e-170)]


@pytest.mark.parametrize(("dtype", "c"), EXTREMES)
@pytest.mark.parametrize("ball", [False, True])
def test_l2_projections_of_huge_and_tiny_trees(dtype, c, ball):
    # Old code: the squared norm overflowed (the projection was 0) or underflowed (inf).
    x = {
        "w": torch.tensor([3.0 * c, -12.0 * c], dtype=dtype),
        "b": torch.tensor(4.0 * c, dtype=dtype),
    }
    values = [3.0 * c, -12.0 * c, 4.0 * c]
    for scale in (1.0, 13.0 * c / 2, 13.0 * c * 2):  # outside, and (for the ball) inside
        fn = P.projection_l2_ball if ball else P.projection_l2_sphere
        out = fn(x, scale)
        got = [*out["w"].tolist(), out["b"].item()]
        expected = _ref_l2(values, scale, ball)
        assert out["w"].dtype == dtype and out["b"].dtype == dtype
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, rel=1e-5 if dtype == F32 else 1e-12)


def test_l2_ball_with_a_tiny_radius():
    # Old code: scale² = 1e-60 underflowed in float32, so the factor was scale / 0 = inf.
    out = P.projection_l2_ball(torch.tensor([3e-30, 4e-30]), 1e-30)
    assert out.tolist() == pytest.approx([6e-31, 8e-31], rel=1e-5)


def test_vmap_with_per_row_radii_and_extreme_rows():
    x = torch.tensor([[3e20, 4e20], [3e-30, 4e-30], [0.3, 0.4]])
    radii = torch.tensor([1.0, 1e-30, 1.0])
    got = torch.func.vmap(P.projection_l2_ball)(x, radii)
    expected = [[0.6, 0.8], [6e-31, 8e-31], [0.3, 0.4]]
    for row, e in zip(got.tolist(), expected):
        assert row == pytest.approx(e, rel=1e-5)


@given(
    x=st.lists(st.floats(-4.0, 4.0, width=32), min_size=1, max_size=6).filter(
        lambda v: any(abs(t) > 1e-3 for t in v)
    ),
    k=st.integers(-110, 110),
    scale=st.floats(0.25, 4.0),
)
@settings(max_examples=60, deadline=None)
def test_l2_projections_commute_with_powers_of_two(x, k, scale):
    """``P_sphere(2ᵏx) = P_sphere(x)`` and ``P_ball(2ᵏx, 2ᵏs) = 2ᵏ P_ball(x, s)`` (float32)."""
    t = torch.tensor(x, dtype=F32)
    big = t * 2.0**k  # exact: float32 keeps every 2ᵏ·x normal for |k| ≤ 110 and |x| > 1e-3
    sphere = P.projection_l2_sphere(t, scale)
    torch.testing.assert_close(P.projection_l2_sphere(big, scale), sphere, rtol=1e-6, atol=1e-7)
    ball = P.projection_l2_ball(t, scale)
    torch.testing.assert_close(
        P.projection_l2_ball(big, scale * 2.0**k) / 2.0**k, ball, rtol=1e-6, atol=1e-7
    )


# A generic point (no ties, not on a kink): every projection is differentiable there.
GRAD_CASES = {
    "simplex": lambda t: P.projection_simplex(t, 1.3),
    "l1_ball": lambda t: P.projection_l1_ball(t, 0.7),
    "l1_sphere": lambda t: P.projection_l1_sphere(t, 0.7),
    "l2_ball": lambda t: P.projection_l2_ball(t, 0.5),
    "l2_sphere": lambda t: P.projection_l2_sphere(t, 0.5),
    "box": lambda t: P.projection_box(t, -0.5, 0.5),
    "halfspace": lambda t: P.projection_halfspace(t, torch.linspace(-1, 1.5, 6, dtype=F64), -0.3),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_through_projections_match_finite_differences(name):
    x = torch.tensor([0.9, -0.35, 0.62, 0.05, -1.1, 0.4], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(GRAD_CASES[name], (x,), eps=1e-6, atol=1e-7)
    # torch.func.grad of a scalar loss agrees with autograd's vector-Jacobian product
    w = torch.linspace(0.3, -0.8, 6, dtype=F64)
    loss = lambda t: (GRAD_CASES[name](t) * w).sum()  # noqa: E731
    (expected,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(torch.func.grad(loss)(x.detach()), expected)


def test_l2_ball_gradient_at_a_huge_point():
    # d/dx (x/‖x‖ · s)·w at 1e20·x0 is the gradient at x0 divided by 1e20 (homogeneity); the
    # old code's overflowed norm gave zero output and a zero (or NaN) gradient.
    x0 = torch.tensor([0.6, -0.8], dtype=F32)
    w = torch.tensor([1.0, 2.0], dtype=F32)
    g0 = torch.func.grad(lambda t: (P.projection_l2_ball(t, 0.5) * w).sum())(x0)
    g = torch.func.grad(lambda t: (P.projection_l2_ball(t, 0.5) * w).sum())(x0 * 1e20)
    torch.testing.assert_close(g * 1e20, g0, rtol=1e-5, atol=1e-7)
    assert float(ft.tree.norm(g0)) > 0
