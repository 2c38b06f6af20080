"""The private leaf-list arithmetic keeps PyTorch's per-tensor results bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from functrain.optim import _ops

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _leaves(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (7,), (3, 5), (257,)]
    return [
        (torch.randn(s, generator=gen) * 10.0 ** (k - 2)).to(dtype) for k, s in enumerate(shapes)
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(
    value=st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, width=64),
        st.integers(-(10**6), 10**6),
    ),
    seed=st.integers(0, 2**16),
)
def test_scalar_ops_equal_per_tensor_results(dtype: torch.dtype, value: float, seed: int) -> None:
    """A Python number given to ``mul``/``div``/``moment_sq`` may travel as a 0-d tensor (fast
    on the CPU); the results must still be PyTorch's ``x * value`` bit for bit, with each leaf's
    dtype."""
    xs = _leaves(dtype, seed)
    for got, x in zip(_ops.mul(xs, value), xs):
        assert got.dtype == x.dtype
        torch.testing.assert_close(got, x * value, rtol=0, atol=0, equal_nan=True)
    if value != 0:
        for got, x in zip(_ops.div(xs, value), xs):
            assert got.dtype == x.dtype
            torch.testing.assert_close(got, x / value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_moment_sq_equals_per_tensor_formula(dtype: torch.dtype) -> None:
    g, v = _leaves(dtype, 1), [x.abs() for x in _leaves(dtype, 2)]
    for got, gi, vi in zip(_ops.moment_sq(g, v, 0.999), g, v):
        want = (vi * 0.999).addcmul_(gi, gi, value=1 - 0.999)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_number_only_for_one_float32_or_float64_dtype() -> None:
    f32, f64 = torch.ones(2), torch.ones(2, dtype=torch.float64)
    assert isinstance(_ops.cpu_number(0.5, [f32, f32]), torch.Tensor)
    assert _ops.cpu_number(0.5, [f64]).dtype == torch.float64
    assert _ops.cpu_number(0.5, [f32, f64]) == 0.5  # mixed: a per-dtype tensor would promote
    assert _ops.cpu_number(0.5, [torch.ones(2, dtype=torch.bfloat16)]) == 0.5
    assert _ops.cpu_number(True, [f32]) is True
    tensor = torch.tensor(0.5)
    assert _ops.cpu_number(tensor, [f32]) is tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moment_sq_with_a_tensor_decay_keeps_dtypes_and_does_not_overflow(dtype) -> None:
    """A tensor decay (``inject_hyperparams``) forms ``(1 − d)·g`` before ``·g``: ``g·g`` alone
    overflows float32 at 3.7e19; a 0-d leaf keeps its dtype against a float64 decay."""
    g = [torch.tensor(3.7e19, dtype=dtype), torch.tensor([3.7e19, -2.0], dtype=dtype)]
    v = [torch.tensor(1.0, dtype=dtype), torch.tensor([1.0, 4.0], dtype=dtype)]
    decay = torch.tensor(0.999, dtype=torch.float64)
    for got, gi, vi in zip(_ops.moment_sq(g, v, decay), g, v):
        assert got.dtype == dtype and bool(torch.isfinite(got).all())
        want = 0.999 * vi.double() + 0.001 * gi.double() ** 2
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
