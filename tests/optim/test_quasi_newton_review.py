"""Review of L-BFGS, the line searches and per_example_layer_norm_clip: regressions.

References are written out here in float64: the L-BFGS two-loop recursion of Nocedal & Wright
(Alg. 7.4, with optax's initial scaling ``γ₀ = min(1, 1/‖g‖)``), the sufficient-decrease test
of a backtracking search, and per-example clipping by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import functrain as ft

D = torch.float64


def _quad(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=D)
    return a @ a.T / n + torch.eye(n, dtype=D), torch.randn(n, generator=g, dtype=D)


def _reference_lbfgs(
    grad_fn: Callable[[torch.Tensor], torch.Tensor],
    w0: torch.Tensor,
    lr: float,
    memory: int,
    steps: int,
) -> torch.Tensor:
    """Plain L-BFGS with a fixed step, the two-loop recursion written out (float64)."""
    w, pairs, prev = w0.clone(), [], None
    for _ in range(steps):
        g = grad_fn(w)
        if prev is not None:
            pairs = ([*pairs, (w - prev[0], g - prev[1])])[-memory:]
        q, alphas = g.clone(), []
        for s, y in reversed(pairs):
            alphas.append((s @ q) / (y @ s))
            q = q - alphas[-1] * y
        if pairs:
            s, y = pairs[-1]
            q = q * (s @ y) / (y @ y)
        else:
            q = q * min(1.0, 1.0 / float(g.norm()))
        for (s, y), a in zip(pairs, reversed(alphas)):
            q = q + (a - (y @ q) / (y @ s)) * s
        prev = (w.clone(), g.clone())
        w = w - lr * q
    return w


@pytest.mark.parametrize("memory", [2, 10])
def test_lbfgs_state_does_not_alias_params_or_gradient_buffers(memory: int) -> None:
    # A PyTorch-style loop: parameters updated in place, one gradient buffer overwritten every
    # step. The state kept the caller's tensors, so δw read 0 and δu the wrong gradient.
    a, b = _quad()
    grad_fn = lambda w: a @ w - b  # noqa: E731
    expected = _reference_lbfgs(grad_fn, torch.zeros(6, dtype=D), 0.5, memory, 12)
    tx = ft.lbfgs(0.5, memory_size=memory, linesearch=None)
    w, g_buf = torch.zeros(6, dtype=D), torch.zeros(6, dtype=D)
    state = tx.init([w])
    for _ in range(12):
        g_buf.copy_(grad_fn(w))
        updates, state = tx.update([g_buf], state, [w])
        w.add_(updates[0])
    torch.testing.assert_close(w, expected, rtol=1e-10, atol=1e-12)


def test_lbfgs_state_is_a_copy() -> None:
    params, grads = [torch.tensor([1.0, 2.0], dtype=D)], [torch.tensor([0.5, -1.0], dtype=D)]
    tx = ft.scale_by_lbfgs()
    _, state = tx.update(grads, tx.init(params), params)
    params[0].zero_()
    grads[0].zero_()
    assert state.params[0].tolist() == [1.0, 2.0]
    assert state.updates[0].tolist() == [0.5, -1.0]


def _problem() -> tuple:
    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((p["a"] - 1.0) ** 2).sum() + 3.0 * ((p["b"] + 2.0) ** 2).sum()

    params = {"a": torch.zeros(2, dtype=D), "b": torch.zeros(3, dtype=D)}
    grad, value = torch.func.grad_and_value(f)(params)
    return f, params, grad, value


_SEARCHES = [
    pytest.param(lambda: ft.scale_by_backtracking_linesearch(10), id="backtracking"),
    pytest.param(lambda: ft.scale_by_zoom_linesearch(10), id="zoom"),
]


@pytest.mark.parametrize("make", _SEARCHES)
@pytest.mark.parametrize(
    "bad_grad",
    [
        pytest.param(lambda g: {"a": g["a"]}, id="missing-leaf"),
        pytest.param(lambda g: {**g, "c": torch.ones(1, dtype=D)}, id="extra-leaf"),
        pytest.param(lambda g: [g["a"], g["b"]], id="other-container"),
    ],
)
def test_linesearch_refuses_grad_of_another_structure(
    make: Callable[[], ft.GradientTransformation], bad_grad: Callable[[dict], object]
) -> None:
    # The leaf-wise zips dropped leaves: backtracking took the slope over part of the gradient
    # and returned a wrong step without a word.
    f, params, grad, value = _problem()
    tx = make()
    with pytest.raises(ft.tree.TreeMismatchError, match="grad"):
        tx.update(grad, tx.init(params), params, value=value, grad=bad_grad(grad), value_fn=f)


@pytest.mark.parametrize("make", _SEARCHES)
def test_linesearch_refuses_updates_of_another_structure(
    make: Callable[[], ft.GradientTransformation],
) -> None:
    f, params, grad, value = _problem()
    tx = make()
    with pytest.raises(ft.tree.TreeMismatchError, match="params"):
        tx.update({"a": grad["a"]}, tx.init(params), params, value=value, grad=grad, value_fn=f)


def test_backtracking_step_satisfies_armijo_on_the_full_gradient() -> None:
    # The accepted step against the sufficient-decrease test written out in float64.
    f, params, grad, value = _problem()
    direction = {k: -v for k, v in grad.items()}
    tx = ft.scale_by_backtracking_linesearch(30, slope_rtol=0.3, decrease_factor=0.5)
    out, state = tx.update(direction, tx.init(params), params, value=value, grad=grad, value_fn=f)
    eta = float(state.learning_rate)
    slope = -sum(float((g * g).sum()) for g in grad.values())
    assert float(f(ft.apply_updates(params, out))) <= float(value) + 0.3 * eta * slope
    # the largest step 0.5**k that passes it
    for k in range(30):
        trial = {n: params[n] + 0.5**k * direction[n] for n in params}
        if float(f(trial)) <= float(value) + 0.3 * 0.5**k * slope:
            assert eta == 0.5**k
            break


def test_layer_norm_clip_non_uniform_with_every_leaf_empty() -> None:
    # Σ Dᵢ = 0 divided by zero; there is nothing to clip: empty sums, no example clipped.
    grads = {"a": torch.zeros(4, 0), "b": torch.zeros(4, 3, 0)}
    sums, counts = ft.per_example_layer_norm_clip(grads, 1.0, uniform=False)
    assert sums["a"].shape == (0,) and sums["b"].shape == (3, 0)
    assert counts["a"].item() == 0 and counts["b"].item() == 0


def test_layer_norm_clip_non_uniform_with_one_empty_leaf_matches_hand_loop() -> None:
    g = torch.Generator().manual_seed(3)
    grads = {"a": torch.randn(5, 3, generator=g, dtype=D) * 3, "e": torch.zeros(5, 0, dtype=D)}
    sums, counts = ft.per_example_layer_norm_clip(grads, 1.3, uniform=False)
    expected, clipped = torch.zeros(3, dtype=D), 0
    for row in grads["a"]:  # Dₐ / D = 1: the whole clip norm
        factor = min(1.0, 1.3 / float(row.norm()))
        clipped += factor < 1.0
        expected += factor * row
    torch.testing.assert_close(sums["a"], expected, rtol=1e-12, atol=1e-12)
    assert counts["a"].item() == clipped and counts["e"].item() == 0
    assert math.isclose(float(ft.tree.norm(sums)), float(expected.norm()), rel_tol=1e-12)
