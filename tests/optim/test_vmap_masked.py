"""An ensemble (``torch.func.vmap(tx.update)``) of ``masked`` and ``partition`` optimizers.

Masked-out parts of their states are ``None`` eagerly, which ``vmap``'s pytrees take for a leaf
and refuse ("must only return Tensors, got type NoneType"). Under ``vmap`` the states now hold
an empty ``MaskedNode`` there instead. Each member of a vmapped run must equal that member
trained alone (float64, to 1e-12), and eager states must keep their structure (``None``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch.utils._pytree as pytree
from _ensembles import (
    B,
    assert_lr_meta_gradient,
    assert_members_match,
    member,
    random_ensemble,
    run_member,
    run_vmapped,
)

import functrain as ft
from functrain import MaskedNode

MASK = {"w": True, "b": False, "v": True}
LABELS = {"w": "adam", "b": "zero", "v": "sgd"}

# fmt: off
MAKERS: dict[str, Callable[[], ft.GradientTransformation]] = {
    "masked_sgd": lambda: ft.masked(ft.sgd(0.1, momentum=0.9), MASK),
    "masked_adam": lambda: ft.masked(ft.adam(1e-2), MASK),
    "masked_callable": lambda: ft.masked(ft.adam(1e-2), lambda p: {
        k: v.ndim > 1 for k, v in p.items()}),
    "partition_zero": lambda: ft.partition(
        {"adam": ft.adam(1e-2), "zero": ft.set_to_zero(), "sgd": ft.sgd(0.1, momentum=0.5)},
        LABELS),
    "multi_transform": lambda: ft.multi_transform(
        {"adam": ft.adam(1e-2), "zero": ft.set_to_zero(), "sgd": ft.sgd(0.1)}, LABELS),
    "adamw_mask": lambda: ft.adamw(1e-2, weight_decay=0.1, mask=MASK),
    "selective_transform": lambda: ft.selective_transform(
        ft.adam(1e-2), freeze_mask={"w": False, "b": True, "v": False}),
    "chain_masked": lambda: ft.chain(ft.clip_by_global_norm(1.0), ft.masked(ft.adam(1e-2), MASK)),
    "nested": lambda: ft.partition(
        {"adam": ft.masked(ft.adam(1e-2), {"w": True, "b": True, "v": False}), "zero": ft.set_to_zero(),
         "sgd": ft.sgd(0.1, momentum=0.9)}, {"w": "adam", "b": "zero", "v": "adam"}),
}
# fmt: on
# On the old code only "adamw_mask" passed: its weight-decay mask keeps no state (EmptyState).


def _ensemble(seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return random_ensemble(seed, {"w": (4, 3), "b": (3,), "v": (2, 2)})


def _none_positions(state: Any) -> list[str]:
    """Paths where ``state`` holds ``None`` (as a leaf of torch's pytrees, which vmap uses)."""
    flat, _ = pytree.tree_flatten_with_path(state)
    return [pytree.keystr(path) for path, leaf in flat if leaf is None]


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_vmapped_ensemble_matches_members(name: str) -> None:
    params, grads = _ensemble(0)
    p, state = run_vmapped(MAKERS[name](), params, grads)
    assert _none_positions(state) == []
    assert_members_match(p, state, MAKERS[name], params, grads)


@pytest.mark.parametrize("name", ["masked_adam", "partition_zero", "nested"])
def test_stacked_eager_states_with_in_dims(name: str) -> None:
    """Eager states stacked per leaf keep ``None``: vmap takes them with ``in_dims`` None there,
    and its output state holds ``MaskedNode`` (which ``in_dims=0`` then accepts)."""
    params, grads = _ensemble(1)
    tx = MAKERS[name]()
    members = [tx.init(member(params, i)) for i in range(B)]
    state = ft.tree.map(lambda *xs: torch.stack(xs), *members)
    assert _none_positions(state)  # eager structure: None where masked out
    state_dims = pytree.tree_map(lambda x: None if x is None else 0, state)
    p = params
    for k, g in enumerate(grads):
        in_dims = (0, state_dims if k == 0 else 0, 0)
        updates, state = torch.func.vmap(tx.update, in_dims=in_dims)(g, state, p)
        p = torch.func.vmap(ft.apply_updates)(p, updates)
    assert_members_match(p, state, MAKERS[name], params, grads)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_eager_state_structure_unchanged(name: str) -> None:
    """Eager states keep ``None`` (checkpoints of them still load), before and after updates."""
    params, grads = _ensemble(2)
    p, tx = member(params, 0), MAKERS[name]()
    state = tx.init(p)
    spec = optree.tree_structure(state, none_is_leaf=True)
    assert "MaskedNode" not in str(spec)
    for g in grads:
        _, state = tx.update(member(g, 0), state, p)
        assert optree.tree_structure(state, none_is_leaf=True) == spec


def test_eager_masked_state_holds_none() -> None:
    params, _ = _ensemble(3)
    state = MAKERS["masked_adam"]().init(member(params, 0))
    adam = state.inner_state[0]
    assert adam.mu["b"] is None and adam.nu["b"] is None
    assert isinstance(adam.mu["w"], torch.Tensor)


def test_member_of_vmapped_state_runs_eagerly() -> None:
    """A member sliced out of a vmapped state (``MaskedNode`` inside) updates eagerly, keeps its
    structure, and matches the member trained alone."""
    params, grads = _ensemble(4)
    tx = MAKERS["partition_zero"]()
    state = member(torch.func.vmap(tx.init)(params), 1)
    assert state.inner_states["adam"].inner_state[0].mu["b"] == MaskedNode()
    spec = optree.tree_structure(state)
    p = member(params, 1)
    for g in grads:
        updates, state = tx.update(member(g, 1), state, p)
        p = ft.apply_updates(p, updates)
    assert optree.tree_structure(state) == spec
    want_p, want_s = run_member(tx, params, grads, 1)
    for a, b in zip(ft.tree.leaves((p, state)), ft.tree.leaves((want_p, want_s)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_vmapped_state_checkpoint_round_trip(tmp_path: Path) -> None:
    params, grads = _ensemble(5)
    tx = MAKERS["masked_adam"]()
    state = torch.func.vmap(tx.init)(params)
    _, state = torch.func.vmap(tx.update)(grads[0], state, params)
    ft.checkpoint.save(tmp_path / "ckpt", state)
    back = ft.checkpoint.restore(tmp_path / "ckpt", torch.func.vmap(tx.init)(params))
    assert optree.tree_structure(back) == optree.tree_structure(state)
    for a, b in zip(ft.tree.leaves(back), ft.tree.leaves(state), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grad_through_masked_update_for_a_learning_rate() -> None:
    """``torch.func.grad`` through two partition updates; reference: plain autograd."""
    params, grads = _ensemble(6)
    transforms = {
        "adam": ft.chain(ft.scale_by_adam(), ft.scale(-1.0)),
        "zero": ft.set_to_zero(),
        "sgd": ft.trace(0.9),
    }
    assert_lr_meta_gradient(lambda: ft.partition(transforms, LABELS), params, grads)


def test_vmap_of_grad_through_masked_update() -> None:
    """Per-member meta-gradients: ``vmap(grad(...))`` with the state made inside."""
    params, grads = _ensemble(7)

    def loss(lr: torch.Tensor, p: Any, g: Any) -> torch.Tensor:
        tx = ft.masked(ft.adam(1.0), MASK)
        updates, _ = tx.update(g, tx.init(p), p)
        return ft.tree.norm(ft.apply_updates(p, ft.tree.scale(lr, updates)), squared=True)

    lrs = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    got = torch.func.vmap(torch.func.grad(loss))(lrs, params, grads[0])
    for i in range(B):
        want = torch.func.grad(loss)(lrs[i], member(params, i), member(grads[0], i))
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("vmapped", [False, True])
def test_compiled_update_traces_either_state(vmapped: bool) -> None:
    """``torch.compile(fullgraph=True)`` traces an update of an eager state and of a member of
    a vmapped one, and keeps each state's structure."""
    params, grads = _ensemble(8)
    tx = MAKERS["partition_zero"]()
    p, g = member(params, 0), member(grads[0], 0)
    state = member(torch.func.vmap(tx.init)(params), 0) if vmapped else tx.init(p)
    want_u, want_s = tx.update(g, state, p)
    torch._dynamo.reset()
    got_u, got_s = torch.compile(tx.update, backend="eager", fullgraph=True)(g, state, p)
    assert optree.tree_structure(got_s) == optree.tree_structure(state)
    assert optree.tree_structure(want_s) == optree.tree_structure(state)
    for a, b in zip(ft.tree.leaves((got_u, got_s)), ft.tree.leaves((want_u, want_s)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
