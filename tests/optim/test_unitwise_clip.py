"""unitwise_clip (optax.transforms.unitwise_clip): float64 hand formula, zero norms, conv kernels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import testing
from functrain.optim.clipping import unitwise_clip

# PyTorch layouts: Linear (out, in), Conv1d/2d/3d kernels (out, in, *k), a bias, a scalar.
SHAPES = [(5, 3), (4, 2, 3), (4, 3, 3, 3), (2, 3, 2, 2, 2), (6,), ()]


def _hand(grad: np.ndarray, g_norm: np.ndarray, max_norm: np.ndarray, div_eps: float):
    """optax's formula element by element, in float64 Python arithmetic."""
    out = np.empty_like(grad)
    for i, (g, n, m) in enumerate(zip(grad.flat, g_norm.flat, max_norm.flat)):
        out.flat[i] = g if n < m else g * (m / max(n, div_eps))
    return out


def _unit_norms_by_loop(x: np.ndarray) -> np.ndarray:
    """Norm of each slice along dimension 0 (the whole tensor for scalars and vectors)."""
    if x.ndim <= 1:
        return np.full(x.shape, math.sqrt(sum(v * v for v in x.flat)))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = math.sqrt(sum(v * v for v in x[i].flat))
    return out


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 10.0),
    div_eps=st.sampled_from([1e-6, 1e-3, 0.5]),
)
def test_matches_float64_hand_formula(shape, seed, scale, div_eps):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    g_norm = torch.from_numpy(_unit_norms_by_loop(grad.numpy()))
    # A bound per unit around the units' norms, so that some units are clipped and some not.
    bound_units = scale * torch.rand(shape[:1] or (1,), generator=g, dtype=torch.float64)
    max_norm = (
        bound_units.reshape([-1] + [1] * (grad.dim() - 1)).expand(shape).clone()
        if grad.dim() > 1
        else bound_units[0].expand(shape).clone()
    )
    got = unitwise_clip(g_norm, max_norm, grad, div_eps)
    expected = _hand(grad.numpy(), g_norm.numpy(), max_norm.numpy(), div_eps)
    assert got.dtype == torch.float64 and got.shape == grad.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-15, atol=0)
    # Clipped units (where g_norm >= div_eps) have norm max_norm; unclipped ones are unchanged.
    new_norm = torch.from_numpy(_unit_norms_by_loop(got.numpy()))
    clipped = (g_norm >= max_norm) & (g_norm >= div_eps)
    testing.assert_trees_all_close(new_norm[clipped], max_norm[clipped], rtol=1e-12)
    testing.assert_trees_all_equal(got[g_norm < max_norm], grad[g_norm < max_norm])


def test_zero_norms_and_div_eps():
    grad = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3e-8, 4e-8], [1.0, 0.0]], dtype=torch.float64)
    g_norm = ft.unitwise_norm(grad)
    max_norm = torch.tensor([0.0, 0.0, 1e-8, 2.0], dtype=torch.float64)[:, None].expand(4, 2)
    got = unitwise_clip(g_norm, max_norm, grad)
    # Row 0: 0 < 0 is false, so 0 * (0 / max(0, 1e-6)) = 0, not NaN.
    # Row 1: a zero bound zeroes the unit. Row 2: the norm 5e-8 is below div_eps, which
    # divides instead: 1e-8 / 1e-6 = 0.01. Row 3: below the bound, unchanged.
    expected = torch.tensor(
        [[0.0, 0.0], [0.0, 0.0], [3e-10, 4e-10], [1.0, 0.0]], dtype=torch.float64
    )
    testing.assert_trees_all_close(got, expected, rtol=1e-15, atol=0)
    # A zero norm under a positive bound: unchanged.
    zero = torch.zeros(3, 2)
    testing.assert_trees_all_equal(unitwise_clip(torch.zeros(3, 2), torch.ones(3, 2), zero), zero)
    # A NaN norm is not below the bound, so the unit is scaled by NaN (as in optax).
    nan = unitwise_clip(torch.full((2,), math.nan), torch.ones(2), torch.ones(2))
    assert torch.isnan(nan).all()
    # A 0-d grad takes Python numbers (their shape () is grad's).
    got = unitwise_clip(5.0, 1.0, torch.tensor(-5.0, dtype=torch.float64))
    assert got.item() == -1.0 and got.dtype == torch.float64


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (4, 2, 5), (6, 4), (2, 3, 2, 2, 2)])
def test_agc_is_unitwise_clip_of_the_unit_norms(shape):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=g)
    u = 3 * torch.randn(shape, generator=g)
    clipping, eps = 0.05, 1e-3
    tx = ft.adaptive_grad_clip(clipping, eps)
    got, _ = tx.update([u], tx.init([p]), [p])
    max_norm = clipping * torch.clamp_min(ft.unitwise_norm(p), eps)
    testing.assert_trees_all_equal(got[0], unitwise_clip(ft.unitwise_norm(u), max_norm, u))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
def test_dtypes_follow_grad(dtype):
    g = torch.Generator().manual_seed(2)
    grad64 = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        grad64 = torch.complex(grad64, torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64))
    grad = grad64.to(dtype)
    g_norm = ft.unitwise_norm(grad)
    max_norm = torch.full_like(g_norm, 2.0)
    got = unitwise_clip(g_norm, max_norm, grad)
    assert got.dtype == dtype
    wide = grad.to(torch.complex128 if dtype.is_complex else torch.float64)
    norms = wide.abs().pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().expand_as(wide)
    expected = torch.where(norms < 2.0, wide, wide * (2.0 / norms))
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.complex64: 1e-6}[dtype]
    testing.assert_trees_all_close(got.to(expected.dtype), expected, rtol=tol, atol=tol)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    fn = torch.compile(unitwise_clip, fullgraph=True, backend="eager")
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        grad = torch.randn(4, 3, 3, 3, generator=g)
        g_norm = ft.unitwise_norm(grad)
        max_norm = torch.full_like(g_norm, 1.0)
        testing.assert_trees_all_equal(
            fn(g_norm, max_norm, grad), unitwise_clip(g_norm, max_norm, grad)
        )


def test_bad_arguments_raise():
    grad = torch.ones(4, 3)
    norms = ft.unitwise_norm(grad)
    with pytest.raises(ValueError, match=r"g_norm has shape \(4, 1\) but grad has \(4, 3\)"):
        unitwise_clip(norms[:, :1], norms, grad)
    with pytest.raises(ValueError, match=r"max_norm has shape \(\) but grad has \(4, 3\)"):
        unitwise_clip(norms, 1.0, grad)
    with pytest.raises(TypeError, match="grad must be a floating-point"):
        unitwise_clip(norms, norms, torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="grad must be"):
        unitwise_clip(norms, norms, [[1.0]])
    with pytest.raises(TypeError, match="g_norm must be a real floating tensor"):
        unitwise_clip(norms.to(torch.complex64), norms, grad)
    with pytest.raises(TypeError, match="max_norm must be a tensor or a real number"):
        unitwise_clip(norms, "1", grad)
    with pytest.raises(ValueError, match="div_eps must be >= 0"):
        unitwise_clip(norms, norms, grad, div_eps=-1.0)
    with pytest.raises(ValueError, match="div_eps must be a 0-d tensor"):
        unitwise_clip(norms, norms, grad, div_eps=torch.ones(2))
