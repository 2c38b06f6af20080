"""A torch-style loop that does not differentiate through updates keeps no graph in the state.

The typical loop passes ``dict(net.named_parameters())`` (``nn.Parameter``\\ s, grad mode on, no
``no_grad``) to ``tx.init``/``tx.update`` with plain gradients. Since updates became
differentiable (meta-learning), copies of the initial point (DoG, DoWG, COCOB, MADGRAD,
Mechanic, Prodigy) kept a graph to the module's weights, later updates chained it step after
step, ``copy.deepcopy(state)`` failed, and momo kept the user's whole forward graph (the
``value=`` loss) in its loss average. As ``torch.optim``, parameters that merely require grad
are constants to the optimizer; tracked gradients, tracked hyperparameters and ``torch.func``
transforms still differentiate (``test_differentiable_*.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from _public_transforms import CASES, Case, example_grads, example_params

import functrain as ft

STEPS = 3

# Still keep a graph to the parameters (name: reason), left for a later change.
LEFT: dict[str, str] = {}

INITIAL_POINT = [
    "cocob",
    "scale_by_cocob",
    "dog",
    "scale_by_dog",
    "dowg",
    "scale_by_dowg",
    "madgrad",
    "scale_by_madgrad",
    "mechanize",
    "prodigy",
]


def _parameters(case: Case) -> Any:
    params = {k: torch.nn.Parameter(v) for k, v in example_params(torch.float32).items()}
    return case.lift_params(params) if case.lift_params else params


def _tracked(values: Any) -> list[str]:
    paths, leaves, _ = ft.tree.flatten_with_paths(values)
    return [
        ft.tree.path_str(p, "state")
        for p, x in zip(paths, leaves)
        if isinstance(x, torch.Tensor) and x.requires_grad
    ]


def _loop(case: Case, params: Any, steps: int = STEPS) -> tuple[Any, list[Any]]:
    """The torch-style loop: no ``no_grad`` around ``tx``, params updated in place."""
    tx = case.build()
    state = tx.init(params)
    updates = []
    for g in example_grads(steps, torch.float32):
        u, state = tx.update(g, state, params, **case.update_kwargs(params, g))
        updates.append(u)
        if case.name != "measure_with_ema":
            with torch.no_grad():
                new = ft.apply_updates(params, u)
                for p, q in zip(ft.tree.leaves(params), ft.tree.leaves(new)):
                    if isinstance(p, torch.Tensor) and p.is_floating_point():
                        p.copy_(q)
    return state, updates


@pytest.mark.parametrize("name", [n for n in CASES if n not in LEFT])
def test_state_and_updates_keep_no_graph(name: str) -> None:
    case = CASES[name]
    params = _parameters(case)
    assert _tracked(case.build().init(params)) == []
    state, updates = _loop(case, params)
    assert _tracked(state) == []
    assert _tracked(updates) == []


def test_left_names_are_cases() -> None:
    assert set(LEFT) <= set(CASES)


@pytest.mark.parametrize("name", INITIAL_POINT)
def test_initial_point_state_deep_copies(name: str) -> None:
    """``copy.deepcopy`` refuses tensors with a ``grad_fn`` (checkpointing, EMA of states)."""
    case = CASES[name]
    params = _parameters(case)
    state = case.build().init(params)
    copied = copy.deepcopy(state)
    for a, b in zip(ft.tree.leaves(state), ft.tree.leaves(copied)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["momo", "momo_adam"])
def test_momo_does_not_keep_the_forward_graph(name: str) -> None:
    """``value=`` a loss computed from the module's weights: its graph must not live on."""
    params = {"w": torch.nn.Parameter(torch.randn(4, 3)), "b": torch.nn.Parameter(torch.zeros(3))}
    x = torch.randn(8, 4)
    tx = getattr(ft, name)(1e-2)
    state = tx.init(params)
    for _ in range(STEPS):
        loss = ((x @ params["w"] + params["b"]) ** 2).mean()
        grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        u, state = tx.update(grads, state, params, value=loss)
        with torch.no_grad():
            for k in params:
                params[k].add_(u[k])
    assert _tracked(state) == []
    assert _tracked(u) == []


def test_hyperparameter_still_differentiated_with_parameters() -> None:
    """A learned learning rate with nn.Parameters and plain gradients: d(u)/d(lr) = −g."""
    lr = torch.tensor(0.1, requires_grad=True)
    params = {"w": torch.nn.Parameter(torch.randn(5))}
    g = {"w": torch.randn(5)}
    tx = ft.sgd(lr)
    u, _ = tx.update(g, tx.init(params), params)
    (d,) = torch.autograd.grad(u["w"].sum(), lr)
    torch.testing.assert_close(d, -g["w"].sum(), rtol=0, atol=1e-6)


def test_tracked_gradients_still_differentiate_initial_point() -> None:
    """cocob's first update is ``x0 + 0 − x`` plus the bet: w.r.t. plain-tensor params with
    tracked gradients the derivative still goes through the initial point (d u / d x = 0
    at the first step: the initial copy and the current params cancel)."""
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, dtype=torch.float64, requires_grad=True)
    tx = ft.scale_by_cocob()
    u, _ = tx.update({"w": g}, tx.init({"w": x}), {"w": x})
    (dx,) = torch.autograd.grad(u["w"].sum(), x)
    torch.testing.assert_close(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_give_the_same_numbers_as_plain_tensors(name: str) -> None:
    """Bit for bit: nn.Parameters are constants, so they get the numbers of plain tensors
    that autograd does not track (the fused Adam kernels of the pure path included)."""
    case = CASES[name]
    plain = example_params(torch.float32)
    plain = case.lift_params(plain) if case.lift_params else plain
    s_plain, u_plain = _loop(case, plain, 2)
    s_par, u_par = _loop(case, _parameters(case), 2)
    for a, b in zip(ft.tree.leaves((s_plain, u_plain)), ft.tree.leaves((s_par, u_par))):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=0, equal_nan=True)


def _cubic(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Separable: its Hessian is diagonal, ``6·c·w``, so Hutchinson's ``z ⊙ Hz`` is exact."""
    c = torch.tensor([1.0, 2.0, 3.0], dtype=p["w"].dtype)
    return (c * p["w"] ** 3).sum()


def test_hutchinson_differentiates_tracked_params_not_parameters() -> None:
    """The HVP of a plain tensor that requires grad (or under ``torch.func``) stays
    differentiable: ``d/dw Σ 6·c·w = 6·c``; at an ``nn.Parameter`` the same numbers, no graph."""
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    w0 = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    g = {"w": torch.zeros(3, dtype=torch.float64)}
    tx = ft.hutchinson_estimator_diag_hessian(random_seed=3)

    def estimate(w: torch.Tensor) -> torch.Tensor:
        return tx.update(g, tx.init({"w": w}), {"w": w}, obj_fn=_cubic)[0]["w"]

    w = w0.clone().requires_grad_()
    est = estimate(w)
    torch.testing.assert_close(est.detach(), 6 * c * w0, rtol=0, atol=1e-12)
    (d,) = torch.autograd.grad(est.sum(), w)
    torch.testing.assert_close(d, 6 * c, rtol=0, atol=1e-12)
    d_func = torch.func.grad(lambda v: estimate(v).sum())(w0)
    torch.testing.assert_close(d_func, 6 * c, rtol=0, atol=1e-12)
    at_parameter = estimate(torch.nn.Parameter(w0.clone()))
    assert at_parameter.grad_fn is None and not at_parameter.requires_grad
    assert torch.equal(at_parameter, est.detach())


@pytest.mark.parametrize("mode", ["autograd", "func"])
def test_line_search_value_differentiates_tracked_params_not_parameters(mode: str) -> None:
    """No backtracking (``η = min(1.5·1, 1) = 1``): the stored value is ``f(w + u)``, whose
    derivative w.r.t. plain tracked params (or under ``torch.func``) is ``∇f(w + u) = w + u −
    1/4`` for ``f = ½‖w − 1/4‖²``; at an ``nn.Parameter`` (with ``value=`` carrying its
    forward graph) the same value, and no graph in the state or the update."""

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((p["w"] - 0.25) ** 2).sum()

    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    u = {"w": torch.tensor([-0.3, 0.6, -0.15], dtype=torch.float64)}
    tx = ft.scale_by_backtracking_linesearch(max_backtracking_steps=0)

    def run(w: torch.Tensor) -> tuple[Any, Any]:
        p = {"w": w}
        grad = {"w": (w - 0.25).detach()}
        return tx.update(u, tx.init(p), p, value=f(p), grad=grad, value_fn=f)

    expected = w0 + u["w"] - 0.25
    if mode == "autograd":
        w = w0.clone().requires_grad_()
        (d,) = torch.autograd.grad(run(w)[1].value, w)
    else:
        d = torch.func.grad(lambda v: run(v)[1].value)(w0)
    torch.testing.assert_close(d, expected, rtol=0, atol=1e-12)
    out, state = run(torch.nn.Parameter(w0.clone()))
    assert _tracked(state) == [] and _tracked(out) == []
    torch.testing.assert_close(state.value, f({"w": w0 + u["w"]}), rtol=0, atol=0)
