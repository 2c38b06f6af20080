"""Review of ``ft.tree`` at the edges: half precision, tensor scalars, integer leaves, purity.

Every expected value comes from float64 arithmetic on the same inputs, rounded once to the
result dtype.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft

HALF = (torch.float16, torch.bfloat16)


def _ref_norm(leaves: list[torch.Tensor], ord: float = 2) -> torch.Tensor:
    flat = torch.cat([x.double().reshape(-1) for x in leaves])
    return torch.linalg.vector_norm(flat, ord)


def _ulps(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Distance of ``got`` from the float64 ``ref`` in ulps of ``got``'s dtype at ``ref``."""
    ulp = torch.finfo(got.dtype).eps * 2.0 ** torch.floor(torch.log2(ref.abs())).item()
    return ((got.double() - ref).abs() / ulp).item()


@pytest.mark.parametrize("dtype", HALF)
def test_norm_of_half_leaves_does_not_overflow_between_leaves(dtype):
    # Each leaf's norm (300) fits float16 and so does the result (424); their squares do not.
    leaves = [torch.full((1,), 300.0, dtype=dtype), torch.full((1,), 300.0, dtype=dtype)]
    got = ft.tree.norm(leaves)
    assert got.dtype == dtype
    assert got == _ref_norm(leaves).to(dtype)


def test_norm_of_float16_leaf_beside_float32_leaf():
    leaves = [torch.full((2,), 300.0, dtype=torch.float16), torch.ones(3)]
    got = ft.tree.norm(leaves)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _ref_norm(leaves), rtol=1e-6, atol=0)


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from(HALF),
    sizes=st.lists(st.integers(1, 40), min_size=2, max_size=12),
    ord=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_half_norm_is_rounded_once(dtype, sizes, ord, seed):
    # Accumulated in float32 and rounded once: within one ulp of the float64 value (the old
    # per-leaf rounding of norms and squares in bf16 was up to several ulps off).
    g = torch.Generator().manual_seed(seed)
    leaves = [(torch.rand(n, generator=g) * 4).to(dtype) for n in sizes]
    got = ft.tree.norm(leaves, ord=ord)
    assert got.dtype == dtype
    assert _ulps(got, _ref_norm(leaves, ord)) <= 1.0


def test_norm_squared_of_half_leaves_in_float32_then_rounded():
    leaves = [torch.full((1,), 100.0, dtype=torch.float16)] * 3
    got = ft.tree.norm(leaves, squared=True)
    assert got.dtype == torch.float16 and got.item() == 30000.0


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("scalar", [1e5, 1.234e-6, 3.0e-7])
def test_scale_by_float32_tensor_rounds_the_product_once(dtype, scalar):
    # A Python float already did this; a float32 0-d tensor was cast to the leaf dtype first
    # (1e5 -> inf in float16, 1.234e-6 -> a subnormal 1.3% off).
    leaf = torch.tensor([1e-3, 0.5, 1000.0], dtype=dtype)
    expected = (leaf.double() * torch.tensor(scalar, dtype=torch.float32).double()).to(dtype)
    got = ft.tree.scale(torch.tensor(scalar), [leaf])[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_add_scale_by_float32_tensor_rounds_the_product_once(dtype):
    a = torch.zeros(3, dtype=dtype)
    b = torch.tensor([1e-3, 0.5, 1000.0], dtype=dtype)
    got = ft.tree.add_scale([a], torch.tensor(1.234e-6), [b])[0]
    expected = (b.double() * torch.tensor(1.234e-6).double()).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_scale_of_zero_dim_half_leaf_by_float64_tensor_keeps_the_leaf_dtype():
    leaf = torch.tensor(0.5, dtype=torch.float16)
    got = ft.tree.scale(torch.tensor(1e5, dtype=torch.float64), [leaf])[0]
    assert got.dtype == torch.float16
    assert got == (leaf.double() * 1e5).to(torch.float16)  # 49984: float16 rounds 50000 down


def test_add_scale_with_python_float_on_integer_leaves_acts_like_scale():
    # scale(0.5, int leaf) promotes to float; add_scale raised "alpha must not be a float".
    a, b = [torch.tensor([1, 2])], [torch.tensor([3, 5])]
    got = ft.tree.add_scale(a, 0.5, b)
    expected = ft.tree.add(a, ft.tree.scale(0.5, b))
    assert got[0].dtype == expected[0].dtype == torch.float32
    assert torch.equal(got[0], expected[0])
    assert torch.equal(ft.tree.add_scale(a, torch.tensor(0.5), b)[0], expected[0])


def test_tree_maths_never_mutates_its_inputs():
    torch.manual_seed(0)
    a = {"w": torch.randn(3, 2), "b": torch.randn(2).to(torch.bfloat16), "z": None}
    b = {"w": torch.randn(3, 2), "b": torch.randn(2).to(torch.bfloat16), "z": None}
    copies = [ft.tree.map(torch.clone, t) for t in (a, b)]
    s = torch.tensor(0.3)
    calls = [
        lambda: ft.tree.add(a, b, b),
        lambda: ft.tree.sub(a, b),
        lambda: ft.tree.mul(a, b),
        lambda: ft.tree.div(a, b),
        lambda: ft.tree.scale(s, a),
        lambda: ft.tree.scale(0.3, a),
        lambda: ft.tree.add_scale(a, s, b),
        lambda: ft.tree.add_scale(a, 0.3, b),
        lambda: ft.tree.cast(a, torch.float64),
        lambda: ft.tree.clip(a, -0.1, 0.1),
        lambda: ft.tree.where(torch.tensor(True), a, b),
        lambda: ft.tree.vdot(a, b),
        lambda: ft.tree.norm(a),
        lambda: ft.tree.norm(a, ord=1),
        lambda: ft.tree.sum(a),
        lambda: ft.tree.max(a),
    ]
    for call in calls:
        call()
    for t, c in zip((a, b), copies):
        assert ft.tree.allclose(t, c, rtol=0, atol=0)
