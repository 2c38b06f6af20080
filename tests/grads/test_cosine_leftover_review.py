"""The train step's in-place cosine accumulation (``cosine._add_in_place``) equals the pure
``cosine_accumulator_add`` for mixed-precision parameters, 0-d leaves included."""

from __future__ import annotations

import torch

import functrain as ft
from functrain.grads import cosine


def _grads(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "scale": torch.randn((), generator=gen),  # 0-d float32
        "w": torch.randn(5, generator=gen),  # float32
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }


def test_in_place_add_equals_pure_add_for_0d_float32_beside_float64():
    params = _grads(0)
    pure = ft.cosine_accumulator_init(params)
    mine = ft.cosine_accumulator_init(params)
    for seed in (1, 2, 3):
        g = _grads(seed)
        pure = ft.cosine_accumulator_add(pure, g)
        mine = cosine._add_in_place(mine, g)
    for key in params:
        assert mine.unit_sum[key].dtype == pure.unit_sum[key].dtype, key
        assert torch.equal(mine.unit_sum[key], pure.unit_sum[key]), key
    assert torch.equal(mine.unit_sq_sum, pure.unit_sq_sum)
    # Against float64 arithmetic by hand: Σ g/‖g‖ for the 0-d leaf.
    expected = 0.0
    for seed in (1, 2, 3):
        g = {k: v.double() for k, v in _grads(seed).items()}
        norm = sum(float(v.square().sum()) for v in g.values()) ** 0.5
        expected += float(g["scale"]) / norm
    assert mine.unit_sum["scale"].dtype == torch.float64
    assert abs(float(mine.unit_sum["scale"]) - expected) <= 1e-6 * abs(expected)


def test_in_place_add_still_writes_leaves_with_dimensions_in_place():
    params = _grads(0)
    acc = ft.cosine_accumulator_init(params)
    w = acc.unit_sum["w"]
    out = cosine._add_in_place(acc, _grads(1))
    assert out.unit_sum["w"] is w
