"""Squared norms (``functrain._sq_norms``): large CPU leaves reduced as rows, one foreach call
for the rest. Every route must equal a float64 sum of squares; the rows only where they apply,
and with the same bits whatever the thread count."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import _sq_norms
from functrain.train.fast import global_norm

BIG = _sq_norms.ROWS_MIN_NUMEL
SIZES = [0, 1, 7, 1000, BIG - 1, BIG, BIG + 13]


def _exact(leaves):
    return sum(float(x.double().square().sum()) for x in leaves)


@pytest.fixture(autouse=True)
def two_threads():
    """The rows serve several threads (the suite runs on one: tests/conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def row_calls(monkeypatch):
    """Sizes of the leaves reduced by rows."""
    calls = []
    real = _sq_norms._rows_sq

    def counted(x):
        calls.append(x.numel())
        return real(x)

    monkeypatch.setattr(_sq_norms, "_rows_sq", counted)
    return calls


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.sampled_from(SIZES), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_the_sum_equals_float64_arithmetic(sizes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    got = _sq_norms.sum_sq_norms(leaves)
    exact = _exact(leaves)
    # PyTorch's CPU foreach norm sums a float32 leaf of 2^20 - 1 values to about 2e-5.
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    assert got.dtype == dtype
    assert abs(float(got) - exact) <= tol * max(exact, 1e-30)
    norm = ft.tree.norm(leaves)
    assert abs(float(norm) - exact**0.5) <= tol * max(exact**0.5, 1e-30)
    assert torch.equal(global_norm(leaves), norm)


def test_rows_serve_exactly_the_large_plain_cpu_leaves(row_calls):
    big32, big64 = torch.randn(BIG), torch.randn(BIG + 5, dtype=torch.float64)
    _sq_norms.sum_sq_norms([big32, torch.randn(BIG - 1), torch.randn(3)])
    assert row_calls == [BIG]
    row_calls.clear()
    assert abs(float(_sq_norms.sq_norm(big64)) - _exact([big64])) <= 1e-12 * _exact([big64])
    assert row_calls == [BIG + 5]
    row_calls.clear()
    refused = [
        torch.randn(2 * BIG)[::2],  # not contiguous
        torch.randn(BIG, dtype=torch.bfloat16),  # half: reduced in float32 by foreach
        torch.randn(BIG, dtype=torch.complex64),
        torch.randn(BIG, requires_grad=True),  # recorded by autograd
    ]
    for x in refused:
        acc = torch.float32 if x.dtype == torch.bfloat16 else None
        got = float(_sq_norms.sq_norm(x, acc).detach())  # float32 sums of 2^20 values: 5e-4
        assert abs(got - float(x.detach().abs().double().square().sum())) <= 2e-3 * got
    assert row_calls == []
    _sq_norms.sq_norm(big32, torch.float64)  # another reduction dtype than the leaf's
    assert row_calls == []


def test_tree_norm_of_a_large_float32_leaf_is_accurate():
    # torch.linalg.vector_norm / torch._foreach_norm summed 2^22 normal float32 values with a
    # relative error of 1.6e-4 (PyTorch 2.13 on the CPU); by rows about 3e-8.
    x = torch.randn(1 << 22, generator=torch.Generator().manual_seed(0))
    exact = float(x.double().square().sum())
    got = float(ft.tree.norm({"w": x}, squared=True))
    assert abs(got - exact) <= 2e-6 * exact


def test_the_bits_do_not_depend_on_the_thread_count(row_calls):
    x = torch.randn((1 << 22) + 77, generator=torch.Generator().manual_seed(3))
    results = []
    for n in (2, 3, 4):  # one thread takes the foreach norm
        torch.set_num_threads(n)
        results.append(ft.tree.norm({"w": x, "b": x[:100]}))
    assert all(torch.equal(r, results[0]) for r in results)
    assert len(row_calls) == 3


def test_one_thread_takes_the_foreach_norm(row_calls):
    torch.set_num_threads(1)
    x = torch.randn(BIG, dtype=torch.float64)
    assert abs(float(ft.tree.norm([x], squared=True)) - _exact([x])) <= 1e-12 * _exact([x])
    assert row_calls == []


def test_gradients_through_the_norm_are_the_norms(row_calls):
    x = torch.randn(BIG, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(ft.tree.norm({"x": x}), [x])
    torch.testing.assert_close(grad, x.detach() / x.detach().norm(), rtol=1e-12, atol=0)
    assert row_calls == []
    with torch.no_grad():  # nothing recorded: the rows apply
        ft.tree.norm({"x": x})
    assert row_calls == [BIG]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_reach_the_result_on_both_routes(bad):
    for n in (10, BIG + 3):
        for where in (n // 2, n - 1):  # in a row, and in the remainder past the rows
            x = torch.ones(n)
            x[where] = bad
            got = _sq_norms.sum_sq_norms([x, torch.ones(3)])
            assert got.isnan() if bad != bad else got.isinf()


def test_mixed_dtypes_promote_and_sum_exactly():
    leaves = [torch.randn(BIG), torch.randn(5, dtype=torch.float64), torch.randn(BIG + 1)]
    got = _sq_norms.sum_sq_norms(leaves)
    assert got.dtype == torch.float64
    assert abs(float(got) - _exact(leaves)) <= 1e-6 * _exact(leaves)


def test_norms_of_batched_leaves_work_under_vmap(row_calls):
    # Before: "Batching rule not implemented for aten::_foreach_norm" (ft.tree.norm of any
    # tensor that vmap batches, e.g. a per-example penalty on activations).
    rows = torch.randn(3, BIG, dtype=torch.float64)
    small = torch.randn(3, 4, dtype=torch.float64)
    got = torch.func.vmap(lambda r, s: ft.tree.norm({"r": r, "s": s}))(rows, small)
    torch.testing.assert_close(got, torch.cat([rows, small], 1).norm(dim=1), rtol=1e-12, atol=0)
    assert row_calls == []


def test_torch_func_grad_of_the_norm():
    x = torch.randn(BIG + 3, dtype=torch.float64)
    grad = torch.func.grad(lambda p: ft.tree.norm({"p": p, "q": p[:3]}))(x)
    expected = x.clone()
    expected[:3] *= 2
    norm = ft.tree.norm({"p": x, "q": x[:3]})
    torch.testing.assert_close(grad, expected / norm, rtol=1e-12, atol=0)
