"""A donating step updates parameters in place: leaves that overlap in memory are refused."""

from __future__ import annotations

import pytest
import torch

import functrain as ft


def _loss(p, x):
    return sum((v * x[: v.numel()]).sum() for v in p.values()) ** 2


def _step(params, donate=True):
    tx = ft.adamw(0.1)
    step = ft.make_train_step(_loss, tx, donate=donate)
    return step, ft.TrainState.create(params=params, tx=tx, copy=False)


def test_a_tensor_given_twice_is_refused_not_updated_twice():
    """Found by review: with copy=False the in-place update ran once per leaf, so a tied weight
    given as two leaves of one tensor moved twice as far as the pure update says."""
    w = torch.randn(3)
    before = w.clone()
    step, state = _step({"a": w, "b": w})
    with pytest.raises(ValueError, match=r"params\['a'\] and params\['b'\] overlap in memory"):
        step(state, torch.ones(3))
    assert torch.equal(w, before) and not state.consumed  # nothing written, state usable
    # Without donation the step is pure, and a tied pair is just two equal leaves.
    pure, state = _step({"a": w, "b": w}, donate=False)
    new, _ = pure(state, torch.ones(3))
    reference, _ = ft.make_train_step(_loss, ft.adamw(0.1), donate=False)(
        ft.TrainState.create(params={"a": w.clone(), "b": w.clone()}, tx=ft.adamw(0.1)),
        torch.ones(3),
    )
    ft.testing.assert_trees_all_equal(new.params, reference.params)


@pytest.mark.parametrize(
    "views", [(slice(0, 4), slice(2, 6)), (slice(0, 8), slice(6, 7))], ids=["overlap", "nested"]
)
def test_overlapping_views_are_refused(views):
    base = torch.randn(8)
    step, state = _step({"a": base[views[0]], "b": base[views[1]]})
    with pytest.raises(ValueError, match="overlap in memory"):
        step(state, torch.ones(8))


def test_disjoint_views_of_one_buffer_are_updated_in_place():
    base = torch.randn(8)
    step, state = _step({"a": base[:4], "b": base[4:]})
    expected, _ = ft.make_train_step(_loss, ft.adamw(0.1), donate=False)(
        ft.TrainState.create(params={"a": base[:4], "b": base[4:]}, tx=ft.adamw(0.1)),
        torch.ones(8),
    )
    new, _ = step(state, torch.ones(8))
    ft.testing.assert_trees_all_close(new.params, expected.params, rtol=1e-6, atol=0)
    assert new.params["a"].untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
