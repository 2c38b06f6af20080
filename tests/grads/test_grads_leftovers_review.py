"""Review leftovers: ``gradient_diversity`` widens half precision; merged moments never alias.

References are float64 hand computations from the exact values the functions receive.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import tree

HALF = [torch.float16, torch.bfloat16]


def _diversity(sq: list[float], combined: float, sizes: list[int] | None = None) -> float:
    """Float64: ``Σ sqᵢ / c``, or with sizes ``Σ bᵢ² sqᵢ / (B² c)``."""
    if sizes is None:
        return sum(sq) / combined
    total = sum(sizes)
    return sum(b * b * s for b, s in zip(sizes, sq, strict=True)) / (total * total * combined)


@pytest.mark.parametrize("as_list", [True, False])
def test_float16_sum_of_squared_norms_does_not_overflow(as_list: bool) -> None:
    # Each squared norm (a gradient of ~300 per element over a few elements) fits float16;
    # their sum, 90000, does not (max 65504): the old result was inf.
    sq = torch.tensor([30000.0, 40000.0, 20000.0], dtype=torch.float16)
    combined = torch.tensor(60000.0, dtype=torch.float16)
    out = ft.gradient_diversity(list(sq) if as_list else sq, combined)
    assert out.dtype == torch.float32
    ref = _diversity([float(x) for x in sq], float(combined))
    assert out.item() == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("tensor_sizes", [False, True])
def test_float16_weighted_diversity_does_not_overflow(tensor_sizes: bool) -> None:
    # bᵢ²‖ĝᵢ‖² = 400·300 and B²‖ĝ‖² = 2500·250 both exceed 65504: the old result was inf/inf.
    sq = torch.tensor([300.0, 302.0], dtype=torch.float16)
    combined = torch.tensor(250.0, dtype=torch.float16)
    sizes = [20, 30]
    out = ft.gradient_diversity(
        sq, combined, torch.tensor(sizes, dtype=torch.float16) if tensor_sizes else sizes
    )
    assert out.dtype == torch.float32
    ref = _diversity([float(x) for x in sq], float(combined), sizes)
    assert out.item() == pytest.approx(ref, rel=1e-6)


def test_bfloat16_diversity_is_computed_in_float32() -> None:
    # 64 squared norms near 1: bfloat16 keeps 8 bits, so its running sum loses the small parts.
    sq = (1.0 + torch.arange(64, dtype=torch.float64) / 256).to(torch.bfloat16)
    combined = torch.tensor(3.0, dtype=torch.bfloat16)
    out = ft.gradient_diversity(sq, combined)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_diversity(sq.double().tolist(), 3.0), rel=1e-6)


def test_float64_stays_float64() -> None:
    sq = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert ft.gradient_diversity(sq, torch.tensor(3.0, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("dtype", HALF)
def test_diversity_from_half_moments_is_float32_and_finite(dtype: torch.dtype) -> None:
    # Per-sample gradients of ~300: their squares overflow float16.
    g = torch.tensor([[300.0, 310.0], [290.0, 305.0], [296.0, 280.0]], dtype=dtype)
    out = ft.gradient_diversity_from_moments(ft.grad_moments({"w": g}))
    rows = g.double()
    ref = float((rows * rows).sum() / (rows.sum(0) ** 2).sum())
    assert out.dtype == torch.float32
    # The mean is rounded once to ``dtype``, which the moments formula carries.
    assert out.item() == pytest.approx(ref, rel=1e-2 if dtype == torch.bfloat16 else 2e-3)


def _storages(m: ft.GradMoments) -> set[int]:
    return {x.untyped_storage().data_ptr() for x in tree.leaves((m.mean, m.m2))}


@pytest.mark.parametrize("empty_first", [True, False])
def test_merge_with_an_empty_group_returns_new_tensors(empty_first: bool) -> None:
    m = ft.grad_moments({"w": torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)})
    empty = ft.grad_moments({"w": torch.zeros(0, 2, dtype=torch.float64)})
    before = (m.mean["w"].clone(), m.m2["w"].clone())
    out = ft.merge_grad_moments(empty, m) if empty_first else ft.merge_grad_moments(m, empty)
    assert out is not m and out.count == 2
    assert not _storages(out) & (_storages(m) | _storages(empty))
    assert torch.equal(out.mean["w"], before[0]) and torch.equal(out.m2["w"], before[1])
    # An accumulator started empty and updated in place must not change the group it got.
    out.mean["w"].add_(1.0)
    out.m2["w"].mul_(2.0)
    assert torch.equal(m.mean["w"], before[0]) and torch.equal(m.m2["w"], before[1])


def test_merge_of_two_empty_groups_is_new() -> None:
    a = ft.grad_moments({"w": torch.zeros(0, 3)})
    b = ft.grad_moments({"w": torch.zeros(0, 3)})
    out = ft.merge_grad_moments(a, b)
    assert out.count == 0 and not _storages(out) & (_storages(a) | _storages(b))


def test_merge_with_an_empty_group_keeps_the_dtype_contract() -> None:
    # A hand-built half-precision m2 is widened by the general merge; with an empty group too.
    m = ft.GradMoments(
        2, {"w": torch.tensor([300.0], dtype=torch.float16)}, {"w": torch.tensor([8.0]).half()}
    )
    empty = ft.GradMoments(0, {"w": torch.zeros(1, dtype=torch.float16)}, {"w": torch.zeros(1)})
    out = ft.merge_grad_moments(empty, m)
    assert out.mean["w"].dtype == torch.float16 and out.m2["w"].dtype == torch.float32
    assert out.m2["w"].item() == 8.0 and out.mean["w"].item() == 300.0


def test_merge_with_an_empty_group_still_checks_shapes() -> None:
    m = ft.grad_moments({"w": torch.ones(2, 3)})
    with pytest.raises(tree.TreeMismatchError):
        ft.merge_grad_moments(ft.grad_moments({"w": torch.zeros(0, 4)}), m)
