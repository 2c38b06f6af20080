"""Second review of ``ft.tree``: mixed dtypes, tensor scalars, half-precision sums, allclose.

Every expected value is computed per leaf in float64 (complex128) in the test and rounded once
to the result dtype; nothing is compared against values the code under test produced.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

HALF = (torch.float16, torch.bfloat16)
REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.complex128 if x.is_complex() else torch.float64)


# --------------------------------------------------------------------------------------------
# Tensor scalars act like Python numbers
# --------------------------------------------------------------------------------------------


def test_add_scale_by_tensor_keeps_the_imaginary_part_of_a_complex_b():
    # x + y*s was cast back to a's float32: the imaginary part of b was dropped silently.
    a, b = [torch.tensor([1.0, 2.0])], [torch.tensor([1j, 2 + 3j], dtype=torch.complex64)]
    got = ft.tree.add_scale(a, torch.tensor(0.5), b)[0]
    expected = (_wide(a[0]) + 0.5 * _wide(b[0])).to(torch.complex64)
    assert got.dtype == torch.complex64
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("da", REAL)
@pytest.mark.parametrize("db", REAL)
def test_add_scale_by_tensor_has_the_dtype_of_a_plus_b_like_a_python_float(da, db):
    # A float32 a plus a float64 b came back float32 with a tensor scalar, float64 with 0.25.
    a = [torch.tensor([1.0, -3.0, 1e-3], dtype=da)]
    b = [torch.tensor([1.0 / 3, 7.0, 2.5e-4], dtype=db)]
    want = torch.promote_types(da, db)
    expected = (_wide(a[0]) + 0.25 * _wide(b[0])).to(want)
    for scalar in (0.25, torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        got = ft.tree.add_scale(a, scalar, b)[0]
        assert got.dtype == want, (scalar, got.dtype)
        # One rounding of the float64 result, or of a float32 product for a float32 scalar.
        torch.testing.assert_close(got.double(), expected.double(), rtol=2e-3, atol=0)


def test_add_scale_by_a_python_complex_is_complex_not_an_error():
    # torch.add(real, real, alpha=1j) raised "alpha must not be a complex".
    a, b = [torch.tensor([1.0])], [torch.tensor([2.0])]
    got = ft.tree.add_scale(a, 1j, b)[0]
    assert got.dtype == torch.complex64 and got.item() == 1 + 2j


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_by_complex_tensor_matches_python_complex(dtype):
    leaf = torch.tensor([1.0, -2.0], dtype=dtype)
    by_tensor = ft.tree.scale(torch.tensor(2j), [leaf])[0]
    by_number = ft.tree.scale(2j, [leaf])[0]
    assert by_tensor.dtype == by_number.dtype and by_tensor.is_complex()
    expected = (_wide(leaf) * 2j).to(by_tensor.dtype)
    torch.testing.assert_close(by_tensor, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Half-precision vdot and sum: float32 accumulation, one rounding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_vdot_of_half_leaves_cancelling_past_the_range_is_zero(dtype):
    # Each leaf's dot is +-90000 (> 65504): float16 gave inf + -inf = NaN.
    big = torch.tensor([300.0], dtype=dtype)
    got = ft.tree.vdot([big, big], [big, -big])
    assert got.dtype == dtype and got.item() == 0.0


@pytest.mark.parametrize("dtype", HALF)
def test_sum_of_half_leaves_cancelling_past_the_range_is_zero(dtype):
    plus = torch.full((2,), 60000.0, dtype=dtype)
    got = ft.tree.sum({"p": plus, "m": -plus})
    assert got.dtype == dtype and got.item() == 0.0


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(HALF),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_half_vdot_and_sum_round_once(dtype, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(n, generator=gen).mul(30).to(dtype) for n in sizes]
    b = [torch.randn(n, generator=gen).mul(30).to(dtype) for n in sizes]
    ref_dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    ref_sum = sum(x.double().sum() for x in a)
    # float32 accumulation of at most 200 products is far below a half-precision ulp: the
    # result is the float64 reference rounded once (to within a thousandth of an ulp).
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    for got, ref in ((ft.tree.vdot(a, b), ref_dot), (ft.tree.sum(a), ref_sum)):
        ref = float(ref)
        assert got.dtype == dtype
        ulp = eps * max(2.0 ** math.floor(math.log2(abs(ref))) if ref else 0.0, tiny)
        assert abs(got.item() - ref) <= 0.501 * ulp, (got.item(), ref)


def test_vdot_conjugates_the_first_tree_like_jnp_vdot():
    a = [torch.tensor([1 + 2j, 3 - 1j]), torch.tensor([2.0])]
    b = [torch.tensor([3 + 4j, -1j]), torch.tensor([0.5])]
    expected = sum(
        complex(x).conjugate() * complex(y) for x, y in zip([1 + 2j, 3 - 1j], [3 + 4j, -1j])
    )
    got = ft.tree.vdot(a, b)
    assert got.dtype == torch.complex64 and complex(got.item()) == expected + 1.0


# --------------------------------------------------------------------------------------------
# allclose with integers beside floats
# --------------------------------------------------------------------------------------------


def test_allclose_integer_beside_float_is_compared_in_double():
    # Promoted to float32, 2**30 + 1 and 2.0**30 were the same number.
    assert not ft.tree.allclose([torch.tensor([2**30 + 1])], [torch.tensor([2.0**30])], 0, 0)
    assert not ft.tree.allclose([torch.tensor([2.0**30])], [torch.tensor([2**30 + 1])], 0, 0)
    assert ft.tree.allclose([torch.tensor([2**30])], [torch.tensor([2.0**30])], 0, 0)
    assert ft.tree.allclose([torch.tensor([True])], [torch.tensor([1.0])], 0, 0)


# --------------------------------------------------------------------------------------------
# Guards that held up: non-contiguous, 0-d, zero-size and mixed leaves against float64
# --------------------------------------------------------------------------------------------


def _mixed_tree() -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, 6, generator=gen)

    def leaves(offset: float) -> dict:
        return {
            1: m.t() + offset,  # non-string key, transposed view
            "s": (m[:, ::2] * 2 + offset).to(torch.float64)[::2],  # strided
            "h": [torch.tensor(0.5 + offset, dtype=torch.float16), None],  # 0-d half
            "e": torch.zeros(0, 3, dtype=torch.bfloat16),  # zero-size
        }

    return leaves(0.0), leaves(0.25)


def test_mixed_tree_ops_match_float64_per_leaf():
    a, b = _mixed_tree()
    la, lb = ft.tree.leaves(a), ft.tree.leaves(b)
    for op, ref in (
        (ft.tree.add, lambda x, y: x + y),
        (ft.tree.sub, lambda x, y: x - y),
        (ft.tree.mul, lambda x, y: x * y),
    ):
        for got, x, y in zip(ft.tree.leaves(op(a, b)), la, lb):
            assert got.dtype == x.dtype and got.shape == x.shape
            torch.testing.assert_close(got, ref(x.double(), y.double()).to(x.dtype))
    flat = torch.cat([x.double().reshape(-1) for x in la])
    torch.testing.assert_close(ft.tree.norm(a).double(), flat.norm(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ft.tree.norm(a, ord=1).double(), flat.abs().sum(), rtol=1e-6, atol=0)
    dot = sum((x.double() * y.double()).sum() for x, y in zip(la, lb))
    torch.testing.assert_close(ft.tree.vdot(a, b).double(), dot, rtol=1e-6, atol=0)
    clipped = ft.tree.leaves(ft.tree.clip(a, -0.5, 0.5))
    for got, x in zip(clipped, la):
        torch.testing.assert_close(got, x.double().clamp(-0.5, 0.5).to(x.dtype), rtol=0, atol=0)
    assert ft.tree.structure(ft.tree.where(torch.tensor(True), a, b)) == ft.tree.structure(a)
