"""Review of ``partition`` on the in-place fused path: compositions the kernel engine must not
run group by group.

The kernel engine runs each partition group as one whole optimizer step on the raw gradients.
That is only right when every leaf belongs to exactly one group: a leaf in two segments (two
partitions chained, a nested partition followed by an op of its outer group) must compose the
two transforms, and a leaf in none (an ``identity`` group, a partition under ``masked``) must
still move by its gradient, as ``apply_updates`` adds it. References: the pure path's
``tx.update`` + ``ft.apply_updates`` on copies, in float64.
"""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain.optim import fused

LABELS = {"w": "a", "b": "b"}


def _params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=gen, dtype=torch.float64),
        "b": torch.randn(3, generator=gen, dtype=torch.float64),
    }


def _clone(tree_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tree_.items()}


def _shared_partition() -> ft.GradientTransformation:
    step = ft.partition({"a": ft.sgd(0.1), "b": ft.adam(0.1)}, LABELS)
    return ft.chain(step, step)


CASES = {
    # Leaves of group "b" had no op: the kernels left them, the pure path adds the gradient.
    "identity_group": lambda: ft.partition({"a": ft.adamw(1e-2), "b": ft.identity()}, LABELS),
    # Each leaf in two groups: the second partition's scale ran as its own SGD step.
    "two_partitions_chained": lambda: ft.chain(
        ft.partition({"a": ft.sgd(0.1), "b": ft.adam(0.1)}, LABELS),
        ft.partition({"a": ft.scale(0.5), "b": ft.scale(0.5)}, LABELS),
    ),
    # One partition object twice: its cached group lists are shared by both uses.
    "same_partition_twice": _shared_partition,
    # Leaves outside the mask pass their gradient through; the kernels did not move them.
    "partition_under_masked": lambda: ft.masked(
        ft.partition({"a": ft.sgd(0.1)}, {"w": "a", "b": "a"}), {"w": True, "b": False}
    ),
    # The outer group's scale(2) ran as an SGD step of its own instead of doubling the update.
    "nested_partition_then_outer_op": lambda: ft.partition(
        {
            "o": ft.chain(
                ft.partition({"x": ft.sgd(0.1), "y": ft.adam(0.1)}, {"w": "x", "b": "y"}),
                ft.scale(2.0),
            )
        },
        {"w": "o", "b": "o"},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_in_place_equals_pure_path(name: str) -> None:
    tx = CASES[name]()
    params = _params(0)
    state = tx.init(params)
    pure_params, pure_state = _clone(params), state
    for step in range(3):
        grads = _params(10 + step)
        updates, pure_state = tx.update(grads, pure_state, pure_params)
        pure_params = ft.apply_updates(pure_params, updates)
        done = fused.update_in_place(tx, _clone(grads), state, params)
        assert done is not None
        state = done.opt_state
        for k in params:
            torch.testing.assert_close(params[k], pure_params[k], rtol=1e-12, atol=1e-12)
    for new, ref in zip(ft.tree.leaves(state), ft.tree.leaves(pure_state)):
        torch.testing.assert_close(new, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_found_inf_refused_without_writing(name: str) -> None:
    # The foreach engine cannot skip: with found_inf such an optimizer is not recognised, and
    # nothing (params, grads, state) may have been written before saying so.
    tx = CASES[name]()
    params = _params(0)
    state = tx.init(params)
    grads = _params(10)
    before = (_clone(params), _clone(grads), [x.clone() for x in ft.tree.leaves(state)])
    done = fused.update_in_place(
        tx, grads, state, params, found_inf=torch.tensor(False), grads_writable=True
    )
    assert done is None
    for k in params:
        assert torch.equal(params[k], before[0][k])
        assert torch.equal(grads[k], before[1][k])
    for new, old in zip(ft.tree.leaves(state), before[2]):
        assert torch.equal(new, old)


def test_disjoint_groups_still_take_the_kernels() -> None:
    tx = ft.partition({"a": ft.adamw(1e-2), "b": ft.sgd(0.1, momentum=0.9)}, LABELS)
    params = _params(0)
    done = fused.update_in_place(tx, _params(1), tx.init(params), params)
    assert done is not None and done.engine == "kernel"
