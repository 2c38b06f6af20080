"""Helpers of the ensemble tests: an optimizer run under ``torch.func.vmap`` over ``B`` members
against each member trained alone (float64, to 1e-12)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import functrain as ft

B = 3  # members
STEPS = 3


def random_ensemble(
    seed: int, shapes: dict[str, tuple[int, ...]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Batched float64 params of ``shapes`` (members first) and one gradient tree per step."""
    gen = torch.Generator().manual_seed(seed)

    def tree() -> dict[str, Any]:
        return {
            k: torch.randn(B, *shape, generator=gen, dtype=torch.float64)
            for k, shape in shapes.items()
        }

    return tree(), [tree() for _ in range(STEPS)]


def member(t: Any, i: int) -> Any:
    return ft.tree.map(lambda x: x[i], t)


def run_vmapped(tx: ft.GradientTransformation, params: Any, grads: list[Any]) -> Any:
    state = torch.func.vmap(tx.init)(params)
    for g in grads:
        updates, state = torch.func.vmap(tx.update)(g, state, params)
        params = torch.func.vmap(ft.apply_updates)(params, updates)
    return params, state


def run_member(tx: ft.GradientTransformation, params: Any, grads: list[Any], i: int) -> Any:
    params = member(params, i)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(member(g, i), state, params)
        params = ft.apply_updates(params, updates)
    return params, state


def assert_members_match(
    got_params: Any,
    got_state: Any,
    make_tx: Callable[[], ft.GradientTransformation],
    params: Any,
    grads: list[Any],
) -> None:
    """Each member of a vmapped run's params and state equals that member trained alone."""
    for i in range(B):
        want = run_member(make_tx(), params, grads, i)
        got = ft.tree.leaves(member((got_params, got_state), i))
        assert len(got) == len(ft.tree.leaves(want))
        for g, w in zip(got, ft.tree.leaves(want)):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def assert_lr_meta_gradient(
    make_tx: Callable[[], ft.GradientTransformation], params: Any, grads: list[Any]
) -> None:
    """Meta-learning a learning rate: ``torch.func.grad`` through updates of member 0 equals
    plain autograd of the same function."""
    p0 = member(params, 0)
    gs = [member(g, 0) for g in grads[:2]]

    def loss(lr: torch.Tensor) -> torch.Tensor:
        tx = make_tx()
        state, p = tx.init(p0), p0
        for g in gs:
            updates, state = tx.update(g, state, p)
            p = ft.apply_updates(p, ft.tree.scale(lr, updates))
        return ft.tree.norm(p, squared=True)

    lr = torch.tensor(0.05, dtype=torch.float64)
    got = torch.func.grad(loss)(lr)
    ref = lr.clone().requires_grad_()
    loss(ref).backward()
    torch.testing.assert_close(got, ref.grad, rtol=1e-12, atol=1e-12)
