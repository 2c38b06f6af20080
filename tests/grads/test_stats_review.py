"""Review of the gradient statistics at the edges: dtypes, cancellation, degenerate inputs.

References are float64 computations on the same per-sample gradients (``torch.var`` and
explicit inner products), or naive per-example loops.
"""

from __future__ import annotations

import pytest
import torch
from grad_problems import naive_per_sample

import functrain as ft
from functrain import tree

HALF = (torch.float16, torch.bfloat16)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).abs() / ref.abs()).max().item()


@pytest.mark.parametrize("ratio", [1e3, 1e4, 1e5])
def test_moments_with_large_mean_and_small_spread(ratio):
    # float32 gradients whose mean is ``ratio`` standard deviations from 0: the mean summed in
    # float32 is off by a few of its ulps, which a plain two-pass Σ(x − mean)² squares into
    # the variance (6e-4 relative error at 1e5).
    g = torch.Generator().manual_seed(0)
    x = (ratio * 1e-2 + 1e-2 * torch.randn(256, 200, generator=g)).float()
    m = ft.grad_moments({"w": x})
    assert _rel_err(ft.grad_variance(m)["w"], x.double().var(0)) < 2e-6
    torch.testing.assert_close(m.mean["w"], x.double().mean(0).float(), rtol=0, atol=ratio * 1e-9)


def _linear_problem(x: torch.Tensor):
    """Per-example gradient of ``Σ x·w`` is ``x`` itself: the per-sample gradients are known."""
    return (lambda p, b: (b["x"] * p["w"]).sum()), {"w": torch.zeros(x.shape[1])}, {"x": x}


@pytest.mark.parametrize("chunk_size", [1, 16, 100, None])
def test_streamed_moments_with_large_mean_and_small_spread(chunk_size):
    # Merging chunk moments rounds each partial mean: 1e-3 relative error at mean/std = 1e5.
    g = torch.Generator().manual_seed(1)
    x = (1e3 + 1e-2 * torch.randn(256, 50, generator=g)).float()
    m = ft.per_sample_grad_moments(*_linear_problem(x), chunk_size=chunk_size)
    assert m.count == 256
    assert _rel_err(ft.grad_variance(m)["w"], x.double().var(0)) < 5e-5
    torch.testing.assert_close(m.mean["w"].double(), x.double().mean(0), rtol=2e-7, atol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 8, None])
def test_streamed_moments_of_identical_examples_have_zero_variance(chunk_size):
    x = torch.tensor([[0.1, -3.7, 1e4]], dtype=torch.float32).expand(7, 3)
    m = ft.per_sample_grad_moments(*_linear_problem(x), chunk_size=chunk_size)
    assert torch.equal(m.mean["w"], x[0])
    assert torch.equal(m.m2["w"], torch.zeros(3))


def test_moments_and_gram_refuse_complex_gradients():
    # No conjugation: m2 came out as -2 (a negative variance) and the Gram as -1 for 1j.
    g = {"a": torch.tensor([[1j], [3j]])}
    for fn in (ft.grad_moments, ft.grad_gram):
        with pytest.raises(TypeError, match=r"grads\['a'\].*complex64"):
            fn(g)
    with pytest.raises(TypeError, match="real"):
        ft.tree_gram([{"a": torch.tensor([1j])}, {"a": torch.tensor([2j])}])
    norms = ft.per_sample_norms(g)  # norms of complex gradients are well defined
    torch.testing.assert_close(norms.global_norm, torch.tensor([1.0, 3.0]))


def test_gram_of_leaves_with_different_dtypes():
    # A float32 model with float64 parameters (or bf16 weights beside float32 norms) raised
    # "self and mat2 must have the same dtype".
    g = torch.Generator().manual_seed(2)
    grads = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(4, 2, generator=g).double()}
    flat = torch.cat([grads["a"].double(), grads["b"]], dim=1)
    got = ft.grad_gram(grads)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, flat @ flat.T, rtol=1e-6, atol=1e-6)
    cos = ft.grad_gram(grads, cosine=True)
    norms = flat.norm(dim=1)
    torch.testing.assert_close(
        cos, flat @ flat.T / norms[:, None] / norms[None, :], rtol=1e-6, atol=1e-6
    )
    trees = [{"a": grads["a"][i], "b": grads["b"][i]} for i in range(4)]
    torch.testing.assert_close(ft.tree_gram(trees), flat @ flat.T, rtol=1e-6, atol=1e-6)


def test_streamed_gram_of_mixed_dtype_parameters():
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [3.0, 0.0, -1.0]])
    params = {"w": torch.zeros(2), "v": torch.zeros(1, dtype=torch.float64)}

    def loss_fn(p, b):
        return (b["x"][:, :2] * p["w"]).sum() + (b["x"][:, 2:].double() * p["v"]).sum()

    ps = naive_per_sample(loss_fn, params, {"x": x})
    flat = torch.cat([ps["v"].double(), ps["w"].double()], dim=1)
    for chunk_size in (None, 1, 2):
        got = ft.per_sample_gram(loss_fn, params, {"x": x}, chunk_size=chunk_size, method="vmap")
        torch.testing.assert_close(got, flat @ flat.T)


@pytest.mark.parametrize("dtype", HALF)
def test_cosine_of_half_gradients(dtype):
    # float16: eps=1e-30 rounds to 0, so a zero gradient's cosine was 0/0 = NaN (documented
    # as 0), and a gradient of norm 300 overflowed its Gram diagonal (cosines NaN).
    rows = torch.tensor([[0.0, 0.0], [300.0, 0.0], [300.0, 300.0]])
    ref = rows @ rows.T
    norms = ref.diagonal().sqrt().clamp_min(1e-30)
    ref_cos = (ref / norms[:, None] / norms[None, :]).to(dtype)
    got = ft.grad_gram({"w": rows.to(dtype)}, cosine=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref_cos, rtol=0, atol=0)
    trees = [{"w": r.to(dtype)} for r in rows]
    torch.testing.assert_close(ft.tree_gram(trees, cosine=True), ref_cos, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_half_gram_is_rounded_once(dtype):
    # Six half-precision leaves: each leaf's part and each partial sum used to be rounded to
    # the leaves' dtype (several entries an ulp off); now float32 throughout, rounded once.
    g = torch.Generator().manual_seed(0)
    grads = {k: torch.rand(3, 5, generator=g).to(dtype) for k in "abcdef"}
    flat = torch.cat([v.double() for v in grads.values()], dim=1)
    got = ft.grad_gram(grads)
    assert got.dtype == dtype
    torch.testing.assert_close(got, (flat @ flat.T).to(dtype), rtol=0, atol=0)
    trees = [{k: v[i] for k, v in grads.items()} for i in range(3)]
    torch.testing.assert_close(ft.tree_gram(trees), (flat @ flat.T).to(dtype), rtol=0, atol=0)


def test_snr_of_zero_half_moments_is_zero():
    for dtype in HALF:
        m = ft.grad_moments({"w": torch.zeros(3, 2, dtype=dtype)})
        snr = ft.grad_snr(m)["w"]
        assert snr.dtype == dtype
        assert torch.equal(snr, torch.zeros(2, dtype=dtype))


def test_snr_divides_half_moments_in_float32():
    x = torch.tensor([[1.0], [1.0 + 2**-7], [1.0 - 2**-7]], dtype=torch.bfloat16)
    m = ft.grad_moments({"w": x})
    mean, var = m.mean["w"].double(), ft.grad_variance(m)["w"].double()
    assert ft.grad_snr(m)["w"] == (mean * mean / var).to(torch.bfloat16)


def test_merge_refuses_moments_of_different_shapes():
    # The _foreach arithmetic broadcast (1,) against (3,) into a wrong merged mean.
    a = ft.grad_moments({"w": torch.ones(2, 1)})
    b = ft.grad_moments({"w": torch.ones(2, 3)})
    with pytest.raises(tree.TreeMismatchError, match=r"a\.mean\['w'\].*\(1,\).*b\.mean\['w'\]"):
        ft.merge_grad_moments(a, b)


def test_tree_gram_names_the_leaf_whose_shape_differs():
    with pytest.raises(tree.TreeMismatchError, match=r"trees\[0\]\['w'\].*trees\[2\]\['w'\]"):
        ft.tree_gram([{"w": torch.ones(2)}, {"w": torch.ones(2)}, {"w": torch.ones(3)}])


def test_batch_of_one_and_empty_batch():
    m = ft.grad_moments({"w": torch.tensor([[2.0, -1.0]])})
    assert m.count == 1 and torch.equal(m.m2["w"], torch.zeros(2))
    assert torch.equal(ft.grad_variance(m, ddof=0)["w"], torch.zeros(2))
    with pytest.raises(ValueError, match="ddof=1"):
        ft.grad_variance(m)
    empty = ft.grad_moments({"w": torch.zeros(0, 2)})
    assert empty.count == 0
    merged = ft.merge_grad_moments(empty, m)
    assert merged.count == 1 and torch.equal(merged.mean["w"], m.mean["w"])
