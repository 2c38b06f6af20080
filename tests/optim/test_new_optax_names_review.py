"""Second-eyes review of the optax names added in fede8ba (SM3, the conditional wrappers,
``keep_params_nonnegative``) and of how the new aliases run inside ``make_train_step``.

References are float64 maths written out here from the documented update rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import functrain as ft
from functrain import tree

# ---------------------------------------------------------------- SM3 with an empty matrix leaf


def test_sm3_empty_matrix_leaf_runs_and_leaves_the_others_exact() -> None:
    """A (0, 3) leaf crashed in ``amax`` (no identity for an empty reduction); now its
    accumulators stay 0 and the other leaf follows the hand-computed SM3 rule."""
    b1, eps = 0.9, 1e-8
    tx = ft.scale_by_sm3(b1=b1, b2=1.0, eps=eps)
    params = {
        "e": torch.zeros(0, 3, dtype=torch.float64),
        "w": torch.zeros(2, 2, dtype=torch.float64),
    }
    g1 = torch.tensor([[3.0, -4.0], [0.5, 2.0]], dtype=torch.float64)
    g2 = torch.tensor([[1.0, 1.0], [-2.0, 0.25]], dtype=torch.float64)
    state = tx.init(params)
    u1, state = tx.update({"e": torch.zeros(0, 3, dtype=torch.float64), "w": g1}, state)
    u2, state = tx.update({"e": torch.zeros(0, 3, dtype=torch.float64), "w": g2}, state)

    # Hand SM3-II with b2 = 1 (plain sums): ν = g² + min(row acc, col acc).
    v1 = g1**2
    m1 = (1 - b1) * g1 / torch.sqrt(v1 + eps)
    rows, cols = v1.amax(dim=1), v1.amax(dim=0)
    v2 = g2**2 + torch.minimum(rows[:, None], cols[None, :])
    m2 = b1 * m1 + (1 - b1) * g2 / torch.sqrt(v2 + eps)
    torch.testing.assert_close(u1["w"], m1, rtol=1e-14, atol=0)
    torch.testing.assert_close(u2["w"], m2, rtol=1e-14, atol=0)
    assert u2["e"].shape == (0, 3)
    assert [a.shape for a in state.mu["e"]] == [torch.Size([0]), torch.Size([3])]
    assert all(torch.equal(a, torch.zeros_like(a)) for a in state.mu["e"])


# ------------------------------------------------------- conditional wrappers: condition types


@pytest.mark.parametrize("wrapper", [ft.conditionally_transform, ft.conditionally_mask])
@pytest.mark.parametrize("cond", [lambda s: 1, lambda s: np.bool_(True)])
def test_conditional_accepts_a_host_number_condition(wrapper: Callable, cond: Callable) -> None:
    """A condition returning the int 1 crashed in ``torch.where`` (optax's ``lax.cond`` takes
    any number as its predicate): it means "transform"."""
    tx = wrapper(ft.scale(2.0), cond)
    g = [torch.tensor([1.0, -3.0], dtype=torch.float64)]
    u, state = tx.update(g, tx.init(g))
    torch.testing.assert_close(u[0], 2.0 * g[0], rtol=0, atol=0)
    assert int(state.step) == 1


def test_conditional_integer_tensor_condition_means_nonzero() -> None:
    """``step % 2`` (an int32 tensor) selects on odd steps, as optax's ``lax.cond``."""
    tx = ft.conditionally_mask(ft.scale(2.0), lambda step: step % 2)
    g = [torch.tensor([1.0, -3.0], dtype=torch.float64)]
    state = tx.init(g)
    outs = []
    for _ in range(3):
        u, state = tx.update(g, state)
        outs.append(u[0])
    torch.testing.assert_close(torch.stack(outs), torch.stack([0 * g[0], 2 * g[0], 0 * g[0]]))


@pytest.mark.parametrize("wrapper", [ft.conditionally_transform, ft.conditionally_mask])
def test_conditional_refuses_a_shaped_tensor_condition(wrapper: Callable) -> None:
    """A (2,)-shaped condition was broadcast by ``torch.where``: the inner transform reached
    half of the elements and not the other half, silently."""
    tx = wrapper(ft.scale(2.0), lambda step: torch.stack([step >= 0, step < 0]))
    g = [torch.ones(2, dtype=torch.float64)]
    with pytest.raises(ValueError, match="0-d"):
        tx.update(g, tx.init(g))


# ------------------------------------------------------- keep_params_nonnegative on complex


def test_keep_params_nonnegative_refuses_complex_clearly() -> None:
    tx = ft.keep_params_nonnegative()
    p = [torch.ones(2, dtype=torch.complex128)]
    with pytest.raises(TypeError, match="complex"):
        tx.update([-2 * p[0]], tx.init(p), p)


# --------------------------- the new aliases in the fused (donating) step: pure path, exact skip

_ALIASES: dict[str, Callable[[], ft.GradientTransformation]] = {
    "adabelief": lambda: ft.adabelief(0.01),
    "yogi": lambda: ft.yogi(0.01),
    "adadelta": lambda: ft.adadelta(1.0, weight_decay=0.01),
    "adan": lambda: ft.adan(0.01, weight_decay=0.01),
    "adamaxw": lambda: ft.adamaxw(0.01),
    "rprop": lambda: ft.rprop(0.01),
    "novograd": lambda: ft.novograd(0.01, weight_decay=0.01),
    "polyak_sgd": lambda: ft.polyak_sgd(0.5),
    "sm3": lambda: ft.sm3(0.01),
    "optimistic_gd": lambda: ft.optimistic_gradient_descent(0.01),
    "optimistic_adam": lambda: ft.optimistic_adam(0.01),
    "fromage": lambda: ft.fromage(0.01),
    "ademamix": lambda: ft.ademamix(0.01, weight_decay=0.01),
    "nonnegative": lambda: ft.chain(ft.sgd(0.01), ft.keep_params_nonnegative()),
    "centralize": lambda: ft.chain(ft.centralize(), ft.sgd(0.01)),
    "apply_every": lambda: ft.chain(ft.sgd(0.01), ft.apply_every(2)),
    "cond_transform": lambda: ft.conditionally_transform(ft.adam(0.01), lambda s: s % 2 == 0),
    "cond_mask": lambda: ft.conditionally_mask(ft.adam(0.01), lambda s: s >= 1),
}


def _loss(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # + 1 keeps the loss away from 0, so the Polyak step is not clipped to 0 by f_min.
    return ((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2).mean() + 1.0


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "w": torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.1,
        "b": torch.rand(2, generator=g, dtype=torch.float64) + 0.1,
    }


def _batch(seed: int, nan: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    if nan:
        x[0, 0] = float("nan")
    return {"x": x, "y": torch.randn(8, 2, generator=g, dtype=torch.float64)}


def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in tree.leaves(x) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(_ALIASES))
def test_new_alias_in_donating_step_is_pure_and_skips_exactly(name: str) -> None:
    """No fusion spec: the donating step takes the pure engine, gives ``tx.update``'s numbers
    (the loss reaches ``value=``), and a NaN batch leaves params and state bit for bit."""
    tx = _ALIASES[name]()
    params, state = _params(), tx.init(_params())
    for i in range(3):
        grads, loss = torch.func.grad_and_value(_loss)(params, _batch(i))
        u, state = tx.update(grads, state, params, value=loss)
        params = ft.apply_updates(params, u)

    step = ft.make_train_step(_loss, tx)
    train = ft.TrainState.create(params=_params(), tx=tx)
    for i in range(3):
        train, _ = step(train, _batch(i))
    assert step.apply_optimizer.last_engine == "pure"
    for a, b in zip(_leaves((params, state)), _leaves((train.params, train.opt_state))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)

    keep = [t.clone() for t in _leaves((train.params, train.opt_state))]
    train, metrics = step(train, _batch(9, nan=True))
    assert bool(metrics["skipped"])
    for a, b in zip(keep, _leaves((train.params, train.opt_state))):
        assert torch.equal(a, b)
