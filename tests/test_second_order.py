"""functrain.second_order against float64 Hessians of torch.autograd.functional.hessian.

The references flatten the parameters by hand (dict keys sorted, each leaf row-major, as
``jax.flatten_util.ravel_pytree``) and differentiate a function of the flat vector, so they
share no code with the module.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
import functrain.second_order as second_order

D = torch.float64


def _linear_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=D)
    y = torch.randn(8, generator=gen, dtype=D)
    params = {"w": torch.randn(3, generator=gen, dtype=D), "b": torch.tensor(0.3, dtype=D)}

    def loss(p, inputs, targets):
        return ((inputs @ p["w"] + p["b"] - targets) ** 2).mean()

    # sorted keys: b (1 element), then w (3)
    def unravel(flat):
        return {"b": flat[0], "w": flat[1:4]}

    def ravel(tree):
        return torch.cat([tree["b"].reshape(1), tree["w"]])

    return loss, params, x, y, unravel, ravel(params), ravel


def _mlp_problem():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen, dtype=D)
    y = torch.randn(6, generator=gen, dtype=D)
    params = {
        "l1": {
            "w": torch.randn(4, 3, generator=gen, dtype=D),
            "b": torch.randn(4, generator=gen, dtype=D),
        },
        "l2": {"w": torch.randn(1, 4, generator=gen, dtype=D)},
    }

    def loss(p, inputs, targets):
        h = torch.tanh(inputs @ p["l1"]["w"].T + p["l1"]["b"])
        return ((h @ p["l2"]["w"].T).squeeze(-1) - targets).pow(2).mean()

    # order: l1.b (4), l1.w (12, row-major), l2.w (4)
    def unravel(flat):
        return {
            "l1": {"b": flat[0:4], "w": flat[4:16].reshape(4, 3)},
            "l2": {"w": flat[16:20].reshape(1, 4)},
        }

    def ravel(tree):
        return torch.cat(
            [tree["l1"]["b"], tree["l1"]["w"].reshape(-1), tree["l2"]["w"].reshape(-1)]
        )

    return loss, params, x, y, unravel, ravel(params), ravel


PROBLEMS = {"linear": _linear_problem, "mlp": _mlp_problem}


def _reference_hessian(problem):
    loss, _, x, y, unravel, flat, _ = problem
    return torch.autograd.functional.hessian(lambda f: loss(unravel(f), x, y), flat)


@pytest.mark.parametrize("name", PROBLEMS)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_hvp_is_the_hessian_times_v(name, seed):
    problem = PROBLEMS[name]()
    loss, params, x, y, _, flat, ravel = problem
    hessian = _reference_hessian(problem)
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(seed), dtype=D)
    out = second_order.hvp(loss, v, params, x, y)
    # the result is a tree shaped like params (same keys, leaf shapes), holding H v
    assert ft.tree.structure(out) == ft.tree.structure(params)
    assert [t.shape for t in ft.tree.leaves(out)] == [t.shape for t in ft.tree.leaves(params)]
    torch.testing.assert_close(ravel(out), hessian @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_hessian_diag_is_the_diagonal(name):
    problem = PROBLEMS[name]()
    loss, params, x, y, _, flat, _ = problem
    expected = torch.diagonal(_reference_hessian(problem))
    got = second_order.hessian_diag(loss, params, x, y)
    assert got.shape == (flat.numel(),) and got.dtype == D
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", PROBLEMS)
def test_fisher_diag_is_the_squared_gradient(name):
    loss, params, x, y, unravel, flat, _ = PROBLEMS[name]()
    f = flat.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(unravel(f), x, y), f)
    got = second_order.fisher_diag(loss, params, x, y)
    torch.testing.assert_close(got, grad**2, rtol=1e-12, atol=0)


def test_linear_regression_hessian_closed_form():
    # mean squared error of X w + b: H = 2 [1 X]ᵀ[1 X] / m, independent of the parameters.
    loss, params, x, y, _, _, ravel = _linear_problem()
    design = torch.cat([torch.ones(8, 1, dtype=D), x], dim=1)
    hessian = 2 * design.T @ design / 8
    torch.testing.assert_close(
        second_order.hessian_diag(loss, params, x, y), torch.diagonal(hessian)
    )
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D)
    out = second_order.hvp(loss, v, params, x, y)
    torch.testing.assert_close(ravel(out), hessian @ v)


def test_float32_params_follow_their_dtype():
    problem = _mlp_problem()
    loss, params, x, y = problem[:4]
    hessian = _reference_hessian(problem)
    p32 = {k: {n: t.float() for n, t in sub.items()} for k, sub in params.items()}
    got = second_order.hessian_diag(loss, p32, x.float(), y.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.diagonal(hessian), rtol=1e-4, atol=1e-5)
    v = torch.ones(20)
    out = second_order.hvp(loss, v, p32, x.float(), y.float())
    assert out["l1"]["w"].dtype == torch.float32


def test_mixed_dtypes_flatten_in_the_common_dtype():
    # ravel_pytree promotes to the common dtype: float32 and float64 leaves give float64.
    params = {"a": torch.tensor([2.0]), "b": torch.tensor([3.0], dtype=D)}

    def loss(p, inputs, targets):
        return (p["a"] ** 3).sum() + (p["a"] * p["b"] ** 2).sum()

    # H = [[6a, 2b], [2b, 2a]] = [[12, 6], [6, 4]]
    got = second_order.hessian_diag(loss, params, None, None)
    assert got.dtype == D
    torch.testing.assert_close(got, torch.tensor([12.0, 4.0], dtype=D))
    out = second_order.hvp(loss, torch.tensor([1.0, 1.0], dtype=D), params, None, None)
    assert out["a"].dtype == torch.float32 and out["b"].dtype == D
    torch.testing.assert_close(out["a"], torch.tensor([18.0]))
    fisher = second_order.fisher_diag(loss, params, None, None)
    # gradient: [3a² + b², 2ab] = [21, 12]
    torch.testing.assert_close(fisher, torch.tensor([441.0, 144.0], dtype=D))


def test_inputs_are_not_modified_and_grad_mode_is_irrelevant():
    loss, params, x, y = _mlp_problem()[:4]
    before = {k: {n: t.clone() for n, t in sub.items()} for k, sub in params.items()}
    leaf = params["l1"]["w"].requires_grad_(True)
    with torch.no_grad():
        diag = second_order.hessian_diag(loss, params, x, y)
    torch.testing.assert_close(diag, second_order.hessian_diag(loss, params, x, y))
    assert torch.equal(leaf.detach(), before["l1"]["w"]) and leaf.grad is None


def test_bad_inputs_raise_naming_the_argument():
    loss, params, x, y = _linear_problem()[:4]
    with pytest.raises(ValueError, match=r"v must be a vector of the 4 parameters.*\(3,\)"):
        second_order.hvp(loss, torch.ones(3, dtype=D), params, x, y)
    with pytest.raises(TypeError, match=r"v must be a tensor"):
        second_order.hvp(loss, [1.0] * 4, params, x, y)
    bad = {"w": params["w"], "b": torch.tensor(1)}
    with pytest.raises(TypeError, match=r"params\['b'\] must be a floating-point tensor"):
        second_order.hessian_diag(loss, bad, x, y)
    with pytest.raises(TypeError, match=r"params\['b'\] must be a tensor"):
        second_order.fisher_diag(loss, {"w": params["w"], "b": 1.0}, x, y)


def test_empty_params_give_empty_vectors():
    assert second_order.hessian_diag(lambda p, i, t: torch.zeros(()), {}, None, None).shape == (0,)
    assert second_order.fisher_diag(lambda p, i, t: torch.zeros(()), {}, None, None).shape == (0,)


def test_signatures_are_optax_s():
    # optax 0.2.8: hvp(loss, v, params, inputs, targets); hessian_diag(loss, params, inputs,
    # targets); fisher_diag(negative_log_likelihood, params, inputs, targets).
    names = {
        "hvp": ["loss", "v", "params", "inputs", "targets"],
        "hessian_diag": ["loss", "params", "inputs", "targets"],
        "fisher_diag": ["negative_log_likelihood", "params", "inputs", "targets"],
    }
    for fn, expected in names.items():
        params = inspect.signature(getattr(second_order, fn)).parameters.values()
        assert [p.name for p in params] == expected
        assert all(p.default is inspect.Parameter.empty for p in params)
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
