"""``noise_scale_estimate`` reduces half-precision squared norms in (at least) float32."""

from __future__ import annotations

import pytest
import torch

import functrain as ft


def _reference(sq: list[float], sizes: list[int], combined: float) -> tuple[float, float]:
    """Float64 hand computation: ``tr(Σ) = (Σ bᵢ sqᵢ − B·c)/(K − 1)``, ``|G|² = c − tr(Σ)/B``."""
    total = sum(sizes)
    trace = (sum(b * s for b, s in zip(sizes, sq, strict=True)) - total * combined) / (len(sq) - 1)
    return trace, combined - trace / total


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("as_list", [True, False])
def test_half_precision_norms_are_widened(dtype: torch.dtype, as_list: bool) -> None:
    # Nearly equal squared norms: tr(Σ) is a small difference that half precision rounds away.
    sq = torch.tensor([3.0, 3.015625, 2.984375, 3.0078125], dtype=dtype)
    combined = torch.tensor(2.9921875, dtype=dtype)
    sizes = [7, 5, 3, 9]
    est = ft.noise_scale_estimate(list(sq) if as_list else sq, sizes, combined)
    # The reference uses the very values the estimator received, exactly, in float64.
    trace, grad_sq = _reference([float(x) for x in sq], sizes, float(combined))
    assert est.trace_sigma.dtype == torch.float32
    assert est.grad_sq.dtype == torch.float32
    assert est.trace_sigma.item() == pytest.approx(trace, rel=1e-6)
    assert est.grad_sq.item() == pytest.approx(grad_sq, rel=1e-6)


def test_half_precision_tensor_sizes_and_batched_norms() -> None:
    sq = torch.tensor([[1.0, 1.0078125, 0.9921875], [2.0, 2.03125, 1.984375]], dtype=torch.bfloat16)
    combined = torch.tensor([0.98828125, 1.9921875], dtype=torch.bfloat16)
    sizes = torch.tensor([4.0, 6.0, 5.0], dtype=torch.bfloat16)
    est = ft.noise_scale_estimate(sq, sizes, combined)
    assert est.trace_sigma.dtype == torch.float32
    for row in range(2):
        trace, grad_sq = _reference([float(x) for x in sq[row]], [4, 6, 5], float(combined[row]))
        assert est.trace_sigma[row].item() == pytest.approx(trace, rel=1e-6)
        assert est.grad_sq[row].item() == pytest.approx(grad_sq, rel=1e-6)


def test_float64_stays_float64() -> None:
    sq = torch.tensor([1.0, 2.0], dtype=torch.float64)
    est = ft.noise_scale_estimate(sq, [1, 1], torch.tensor(1.25, dtype=torch.float64))
    assert est.trace_sigma.dtype == torch.float64
    trace, grad_sq = _reference([1.0, 2.0], [1, 1], 1.25)
    assert est.trace_sigma.item() == pytest.approx(trace, rel=1e-12)
    assert est.grad_sq.item() == pytest.approx(grad_sq, rel=1e-12)
