"""Regression tests from the review of ft.perturbations, ft.second_order and friends.

References are independent of the code under test: float64 hand computations of the
score-function estimator on known noise draws, and ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch

import functrain as ft
import functrain.perturbations as perturbations
import functrain.second_order as second_order

D = torch.float64


class _Pair(NamedTuple):
    a: torch.Tensor
    b: Any


class _KnownNoise:
    """Standard normals from a seeded torch.Generator, so the test knows every draw."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def sample(self, key: Any, sample_shape: Any = (), dtype: Any = float) -> torch.Tensor:
        del key
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(tuple(sample_shape), generator=generator, dtype=D).to(dtype)

    def log_prob(self, inputs: torch.Tensor) -> torch.Tensor:
        return -0.5 * inputs**2


def _score_estimate(f, x: torch.Tensor, y: torch.Tensor, sigma: float):
    """float64 value and gradient of the perturbed ``f`` at ``x`` on the perturbed inputs ``y``.

    value = mean_i f(y_i); gradient = mean_i (f(y_i) - f(x)) z_i / sigma with
    z_i = (y_i - x) / sigma, the Normal score.
    """
    x64, y64 = x.detach().to(D), y.to(D)
    values = torch.stack([f(row) for row in y64])
    base = f(x64)
    z = (y64 - x64) / sigma
    grad = ((values - base)[:, None] * z / sigma).mean(0)
    return values.mean(0), grad


def _hessian_reference(loss, leaves: list[torch.Tensor], rebuild):
    flat = torch.cat([leaf.detach().reshape(-1) for leaf in leaves])

    def flat_loss(vector: torch.Tensor) -> torch.Tensor:
        pieces, start = [], 0
        for leaf in leaves:
            pieces.append(vector[start : start + leaf.numel()].reshape(leaf.shape))
            start += leaf.numel()
        return loss(rebuild(pieces), None, None)

    hessian = torch.autograd.functional.hessian(flat_loss, flat)
    gradient = torch.autograd.functional.jacobian(flat_loss, flat)
    return hessian, gradient


def _cubic(p, inputs, targets):
    del inputs, targets
    return (p["w"] ** 3).sum() * p["c"][0].sum() + (p["c"][0] ** 2).prod()


@pytest.mark.parametrize("container", ["dict", "namedtuple"])
def test_second_order_skips_none_leaves_as_optax(container):
    # Old code: torch.func's pytrees refused the None ("Thing passed to transform API must be
    # Tensor, got NoneType") in all three functions; optax skips None subtrees.
    w = torch.tensor([1.0, -2.0], dtype=D)
    c = torch.tensor([0.5, 3.0, -1.0], dtype=D)
    if container == "dict":
        params = {"w": w, "skip": None, "c": (c, None)}

        def rebuild(pieces):  # flatten order: c, w (sorted keys)
            return {"w": pieces[1], "skip": None, "c": (pieces[0], None)}

        leaves = [c, w]
    else:
        params = _Pair(a=w, b=None)

        def rebuild(pieces):
            return _Pair(a=pieces[0], b=None)

        leaves = [w]

    def loss(p, inputs, targets):
        if container == "dict":
            return _cubic(p, inputs, targets)
        assert p.b is None
        return (p.a**3).sum() + p.a.prod()

    hessian, gradient = _hessian_reference(loss, leaves, rebuild)
    v = torch.linspace(-1.0, 2.0, hessian.shape[0], dtype=D)
    hv = second_order.hvp(loss, v, params, None, None)
    if container == "dict":
        assert hv["skip"] is None and hv["c"][1] is None
        flat_hv = torch.cat([hv["c"][0], hv["w"]])
    else:
        assert isinstance(hv, _Pair) and hv.b is None
        flat_hv = hv.a
    torch.testing.assert_close(flat_hv, hessian @ v)
    diag = second_order.hessian_diag(loss, params, None, None)
    torch.testing.assert_close(diag, hessian.diagonal())
    torch.testing.assert_close(second_order.fisher_diag(loss, params, None, None), gradient**2)


def test_perturbed_fun_skips_none_leaves_in_inputs_and_outputs():
    # Old code: torch.func.vmap refused a None input leaf ("Got in_dim=0 for an input but the
    # input is of type NoneType") and a None output leaf ("must only return Tensors").
    sigma, n = 0.5, 64
    x = torch.tensor([0.3, -1.2, 2.0], dtype=D, requires_grad=True)

    def fun(tree: _Pair) -> dict[str, Any]:
        assert tree.b is None
        return {"value": torch.relu(tree.a).sum(), "nothing": None}

    perturbed = perturbations.make_perturbed_fun(fun, n, sigma, _KnownNoise(1))
    out = perturbed(ft.random_key(0), _Pair(a=x, b=None))
    assert out["nothing"] is None
    (grad,) = torch.autograd.grad(out["value"], x)

    y = x.detach() + sigma * _KnownNoise(1).sample(None, (n, 3), D)
    value, expected = _score_estimate(lambda t: torch.relu(t).sum(), x, y, sigma)
    torch.testing.assert_close(out["value"].detach(), value)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("size", [1_000, 200_000])
def test_perturbed_fun_in_float16_keeps_the_gradient(size):
    # Old code: the per-sample log-density was summed in float16, -inf beyond ~10⁵ elements,
    # and the box exp(-inf - (-inf)) made value and gradient NaN (size 200 000); below that the
    # gradient reaching the float16 box, f(y) - f(x), cancelled in float16 rounding (size
    # 1 000: the gradient was 12% off, at 200 000 it would have been exactly 0).
    sigma, n = 0.1, 2
    x = torch.linspace(-1.0, 1.0, size).to(torch.float16).requires_grad_(True)

    def fun(t: torch.Tensor) -> torch.Tensor:
        return (t.to(D) ** 2).mean()

    perturbed = perturbations.make_perturbed_fun(fun, n, sigma, _KnownNoise(2))
    out = perturbed(ft.random_key(0), x)
    (grad,) = torch.autograd.grad(out, x)
    assert out.dtype == D and grad.dtype == torch.float16

    y = (x.detach() + sigma * _KnownNoise(2).sample(None, (n, size), torch.float16)).detach()
    value, expected = _score_estimate(lambda t: (t**2).mean(), x, y, sigma)
    torch.testing.assert_close(out.detach(), value)
    scale = expected.abs().max()
    assert bool(torch.isfinite(grad).all())
    # float16 rounding of each element's gradient (relative 2⁻¹¹), judged against the largest.
    torch.testing.assert_close(grad.to(D) / scale, expected / scale, rtol=0, atol=2e-3)


def test_perturbed_fun_float16_output_keeps_float16():
    # The box is computed in float32 now; the result keeps optax's dtype (float16 here).
    x = torch.ones(5, dtype=torch.float16, requires_grad=True)
    out = perturbations.make_perturbed_fun(lambda t: t * 2, 8, 0.1, perturbations.Normal())(
        ft.random_key(0), x
    )
    assert out.dtype == torch.float16 and out.shape == (5,)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.dtype == torch.float16 and bool(torch.isfinite(grad).all())
