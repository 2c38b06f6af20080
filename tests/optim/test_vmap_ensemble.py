"""An ensemble of optimizers under ``torch.func.vmap``, as optax users ``jax.vmap(tx.update)``.

``vmap(tx.init)``, ``vmap(tx.update)`` and ``vmap(ft.apply_updates)`` over 3 members must give
each member's separate run (float64, to 1e-12). The pure updates used ``torch._foreach_*``
kernels, which have no batching rule; functrain now loops per leaf under functorch transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _ensembles import (
    B,
    assert_lr_meta_gradient,
    assert_members_match,
    member,
    random_ensemble,
    run_member,
    run_vmapped,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import functrain as ft
from functrain import _foreach

# fmt: off
MAKERS: dict[str, Callable[[], ft.GradientTransformation]] = {
    "sgd_momentum": lambda: ft.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: ft.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: ft.adam(1e-2),
    "adamw": lambda: ft.adamw(1e-2, weight_decay=0.1),
    "nadam": lambda: ft.nadam(1e-2),
    "amsgrad": lambda: ft.amsgrad(1e-2),
    "adamax": lambda: ft.adamax(1e-2),
    "radam": lambda: ft.radam(1e-2),
    "lion": lambda: ft.lion(1e-3, weight_decay=0.1),
    "rmsprop": lambda: ft.rmsprop(1e-2),
    "rmsprop_centered_momentum": lambda: ft.rmsprop(1e-2, centered=True, momentum=0.9),
    "adagrad": lambda: ft.adagrad(1e-1),
    "lamb": lambda: ft.lamb(1e-2),
    "clip_adamw": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adamw(1e-2)),
    "clip_adam": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.adam(1e-3)),
    "adamw_schedule": lambda: ft.adamw(ft.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)),
    "multi_steps": lambda: ft.MultiSteps(ft.adam(1e-2), every_k_schedule=2),
}
# fmt: on


def _ensemble(seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return random_ensemble(seed, {"w": (4, 3), "b": (3,)})


def _assert_matches(
    make_tx: Callable[[], ft.GradientTransformation], params: Any, grads: list[Any]
) -> None:
    got_params, got_state = run_vmapped(make_tx(), params, grads)
    assert_members_match(got_params, got_state, make_tx, params, grads)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_ensemble_matches_members(name: str) -> None:
    params, grads = _ensemble(0)
    _assert_matches(MAKERS[name], params, grads)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    name=st.sampled_from(["sgd_nesterov", "adamw", "lion", "rmsprop", "clip_adamw"]),
)
def test_ensemble_matches_members_random(seed: int, name: str) -> None:
    params, grads = _ensemble(seed)
    _assert_matches(MAKERS[name], params, grads)


def test_hyperparameter_sweep_over_learning_rates() -> None:
    """``vmap`` over a tensor learning rate, the state and params being shared: a sweep."""
    params, grads = _ensemble(1)
    p0, g0 = member(params, 0), member(grads[0], 0)
    lrs = torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64)

    def step(lr: torch.Tensor) -> Any:
        tx = ft.adamw(lr, weight_decay=0.1)
        updates, _ = tx.update(g0, tx.init(p0), p0)
        return ft.apply_updates(p0, updates)

    got = torch.func.vmap(step)(lrs)
    for i, lr in enumerate(lrs.tolist()):
        tx = ft.adamw(lr, weight_decay=0.1)
        want = ft.apply_updates(p0, tx.update(g0, tx.init(p0), p0)[0])
        for g, w in zip(ft.tree.leaves(member(got, i)), ft.tree.leaves(want)):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_grad_through_update_for_a_learning_rate() -> None:
    """Meta-learning a learning rate: ``torch.func.grad`` through two clipped Adam updates."""
    params, grads = _ensemble(2)
    assert_lr_meta_gradient(
        lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.scale_by_adam(), ft.scale(-1.0)),
        params,
        grads,
    )


@pytest.mark.parametrize("name", ["sgd_momentum", "adamw", "rmsprop", "clip_adam"])
def test_compiled_update_takes_the_foreach_kernels(name: str, monkeypatch: Any) -> None:
    """``torch.compile(tx.update, fullgraph=True)`` still traces, without the fallback."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fallback used outside a functorch transform")

    monkeypatch.setattr(_foreach, "_loop", boom)
    tx = MAKERS[name]()
    params, grads = _ensemble(3)
    p, g = member(params, 0), member(grads[0], 0)
    state = tx.init(p)
    want_u, _ = tx.update(g, state, p)
    torch._dynamo.reset()
    got_u, _ = torch.compile(tx.update, backend="eager", fullgraph=True)(g, state, p)
    for a, b in zip(ft.tree.leaves(got_u), ft.tree.leaves(want_u)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw", "clip_adamw", "sgd_momentum", "lion"])
def test_ensemble_on_cuda_matches_members(name: str) -> None:
    """The same on a GPU (run by tools/gpu_check.sh); members alone may take the fused kernels,
    whose float64 rounding differs slightly from the per-tensor ops under vmap."""
    params, grads = _ensemble(0)
    params, grads = ft.tree.map(lambda x: x.cuda(), (params, grads))
    got_p, _ = run_vmapped(MAKERS[name](), params, grads)
    for i in range(B):
        want_p, _ = run_member(MAKERS[name](), params, grads, i)
        for g, w in zip(ft.tree.leaves(member(got_p, i)), ft.tree.leaves(want_p)):
            assert g.is_cuda
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
