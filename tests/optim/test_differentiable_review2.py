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

# Still keep a graph to the parameters (found by this review, left for a later change).
LEFT = {
    "hutchinson_estimator_diag_hessian": "differentiates obj_fn at params (an HVP) itself",
    "lbfgs": "the zoom line search keeps value_fn's values at params in its state",
    "scale_by_zoom_linesearch": "keeps value_fn's values at params in its state",
    "scale_by_zoom_linesearch[one]": "keeps value_fn's values at params in its state",
    "scale_by_backtracking_linesearch": "keeps value= / value_fn's loss in its state",
    "lookahead": "the slow params are computed from the (tracked) fast params",
    "lookahead[reset_state]": "the slow params are computed from the (tracked) fast params",
    "monitor": "measures of params at init",
    "snapshot": "measures of params at init",
    "sam": "the saved params copy",
    "sam[reset_state=False]": "the saved params copy",
    "sam[sync_period=1]": "the saved params copy",
    "sophia": "the Hessian estimate from obj_fn at params",
    "scale_by_sophia": "the Hessian estimate from obj_fn at params",
    "scale_by_distance_over_gradients": "init's distance estimate from the params",
    "schedule_free": "z, a copy of the params",
    "schedule_free[adam]": "z, a copy of the params",
    "schedule_free_adamw": "z, a copy of the params",
    "schedule_free_adamw[warmup]": "z, a copy of the params",
    "schedule_free_sgd": "z, a copy of the params",
}

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


# Still differ from untracked plain tensors (their saved params stay tracked: see LEFT).
NUMBERS_LEFT = {"sam[reset_state=False]"}


@pytest.mark.parametrize("name", [n for n in CASES if n not in NUMBERS_LEFT])
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
