"""``scale_gradient``: identity forward, ``scale ×`` gradient backward, in every autograd mode.

References: gradients written by hand (``d/dx Σ w·sin(x) = w·cos(x)``, ``d/dx Σ x³ = 3x²``),
multiplied by the scale; forward values compared bit for bit with the input.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from functrain.optim.gradient_scaling import scale_gradient

SCALES = [0.5, -1.0, 0.0, 1.0, 3.0, 2]


def _x(seed: int = 0, n: int = 5) -> torch.Tensor:
    return torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def loss(tree, scale, w):
    """``Σ w·sin(a) + Σ b₀³ + Σ c`` on the scaled tree."""
    out = scale_gradient(tree, scale)
    return (w * torch.sin(out["a"])).sum() + (out["b"][0] ** 3).sum() + out["c"]["d"].sum()


def hand_grads(tree, scale, w):
    s = float(scale)
    return {"a": s * w * torch.cos(tree["a"]), "b": [s * 3 * tree["b"][0] ** 2],
            "c": {"d": s * torch.ones_like(tree["c"]["d"])}}  # fmt: skip


def _tree(seed: int = 0) -> dict:
    return {"a": _x(seed), "b": [_x(seed + 1, 3)], "c": {"d": _x(seed + 2, 2).reshape(2, 1)}}


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [*SCALES, torch.tensor(-2.5), torch.tensor(0.0)])
def test_torch_func_grad_is_scaled(scale):
    tree, w = _tree(), _x(9)
    _close(torch.func.grad(loss)(tree, scale, w), hand_grads(tree, scale, w))


@pytest.mark.parametrize("scale", [*SCALES, torch.tensor(0.25)])
def test_backward_and_autograd_grad(scale):
    tree, w = _tree(1), _x(8)
    leaves = {"a": tree["a"].requires_grad_(), "b": [tree["b"][0].requires_grad_()],
              "c": {"d": tree["c"]["d"].requires_grad_()}}  # fmt: skip
    value = loss(leaves, scale, w)
    if not isinstance(scale, torch.Tensor) and scale == 0:  # optax: stop_gradient
        assert not value.requires_grad
        return
    grads = torch.autograd.grad(value, [leaves["a"], leaves["b"][0]])
    want = hand_grads(leaves, scale, w)
    _close(grads[0], want["a"].detach())
    _close(grads[1], want["b"][0].detach())
    x = _x(3).requires_grad_()
    (scale_gradient(x, scale) ** 2).sum().backward()
    _close(x.grad, float(scale) * 2 * x.detach())


@given(scale=st.floats(-10, 10), seed=st.integers(0, 1000))
def test_any_scale_property(scale, seed):
    x, w = _x(seed), _x(seed + 1)
    got = torch.func.grad(lambda x: (w * scale_gradient(x, scale)).sum())(x)
    _close(got, scale * w)


def test_vmap_of_grad_per_example():
    xs = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    per_example = torch.func.vmap(torch.func.grad(lambda x: (scale_gradient(x, -0.5) ** 3).sum()))
    _close(per_example(xs), -0.5 * 3 * xs**2)


def test_forward_is_exactly_the_input():
    x = torch.tensor([1.5, -0.0, 0.0, math.inf, -math.inf, math.nan, 1e-320, -3e38])
    for scale in (2.0, -2.0, 1e-30, torch.tensor(-7.0)):
        y = scale_gradient(x.clone().requires_grad_(), scale)
        # Bit for bit: the sign of zero, infinities and NaN included.
        assert torch.equal(y.detach().view(torch.int64), x.view(torch.int64))
    g = torch.func.grad(lambda x: scale_gradient(x, 3.0).sum())(x)
    finite = torch.isfinite(x)
    assert torch.equal(g[finite], torch.full_like(x[finite], 3.0))
    assert torch.equal(g[~finite], torch.zeros_like(x[~finite]))  # documented: no gradient


def test_python_one_and_zero_as_optax():
    tree = {"a": _x().requires_grad_(), "n": 3}
    assert scale_gradient(tree, 1.0) is tree
    stopped = scale_gradient(tree, 0.0)
    assert not stopped["a"].requires_grad and stopped["n"] == 3
    assert torch.equal(stopped["a"], tree["a"].detach())


def test_nested_tree_with_other_leaves():
    """Integer tensors, Python numbers and None pass through; structure is kept."""
    ints = torch.arange(3)
    tree = {"x": (_x(0, 2), [_x(1, 2), None]), "i": ints, "f": 2.5}
    out = scale_gradient(tree, -1.0)
    assert out["i"] is ints and out["f"] == 2.5 and out["x"][1][1] is None
    assert isinstance(out["x"], tuple) and isinstance(out["x"][1], list)
    torch.testing.assert_close(out["x"][0], tree["x"][0], rtol=0, atol=0)

    def total(floats):
        scaled = scale_gradient({"x": floats, "i": ints, "f": 2.5}, -1.0)
        return scaled["x"][0].sum() + 2 * scaled["x"][1][0].sum() + scaled["f"]

    got = torch.func.grad(total)((tree["x"][0], [tree["x"][1][0]]))
    ones = torch.ones(2, dtype=torch.float64)
    assert torch.equal(got[0], -ones) and torch.equal(got[1][0], -2 * ones)


def test_dtypes_and_tensor_scale_get_no_gradient():
    x32 = torch.ones(3, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    y = scale_gradient(x32, scale)
    assert y.dtype == torch.float32  # a float64 scale does not promote the leaf
    gx, gs = torch.autograd.grad(y.sum(), [x32, scale], allow_unused=True)
    assert torch.equal(gx, torch.full((3,), 2.0))
    assert gs is None
    z = torch.ones(2, dtype=torch.complex64, requires_grad=True)
    (gz,) = torch.autograd.grad(scale_gradient(z, 0.5).real.sum(), z)
    assert torch.equal(gz, torch.full((2,), 0.5, dtype=torch.complex64))


def test_bad_scales():
    x = {"w": torch.ones(2, 3)}
    with pytest.raises(TypeError, match="scale must be a real number"):
        scale_gradient(x, "2")
    with pytest.raises(TypeError, match="scale must be a real number"):
        scale_gradient(x, True)
    with pytest.raises(TypeError, match="must be real"):
        scale_gradient(x, torch.tensor(1j))
    with pytest.raises(ValueError, match=r"inputs\['w'\] of shape \(2, 3\)"):
        scale_gradient(x, torch.ones(4))
    per_column = torch.func.grad(lambda w: scale_gradient(w, torch.tensor([1.0, 2.0, 3.0])).sum())
    assert torch.equal(per_column(torch.ones(2, 3)), torch.tensor([[1.0, 2.0, 3.0]] * 2))


def test_compiled_func_grad_and_backward():
    """torch.compile drops an autograd.Function's custom backward under torch.func.grad
    (pytorch/pytorch#193279): the scaled gradient must survive compilation in both modes."""
    x, w = _x(4), _x(5)

    def f(x, s):
        return (w * torch.sin(scale_gradient({"x": x}, s)["x"])).sum()

    torch._dynamo.reset()
    compiled_grad = torch.compile(torch.func.grad(f), fullgraph=True)
    for s in (torch.tensor(-3.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)):
        _close(compiled_grad(x, s), s * w * torch.cos(x))
    compiled = torch.compile(f, fullgraph=True)
    xg = x.clone().requires_grad_()
    compiled(xg, torch.tensor(-3.0, dtype=torch.float64)).backward()
    _close(xg.grad, -3.0 * w * torch.cos(x))
