"""Non-finite policies seen from a long run: the raise policy's name, NonFiniteError in train_loop."""

import pytest
import torch

import functrain as ft


def _loss(params, batch):
    return (batch["x"] @ params["w"] - batch["y"]).square().mean()


def test_asking_for_a_raise_policy_points_to_max_consecutive_skips():
    with pytest.raises(ValueError, match="max_consecutive_skips=0"):
        ft.make_train_step(_loss, ft.sgd(0.1), nonfinite="raise")


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_non_finite_error_in_train_loop_hands_back_the_state_from_before_the_faults(
    micro_batches,
):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    good = {"x": x, "y": x.sum(-1)}
    bad = {"x": x.clone(), "y": x.sum(-1)}
    bad["x"][6, 0] = float("nan")  # in the last micro-batch when split in 4
    tx = ft.adam(0.1)
    step = ft.make_train_step(_loss, tx, micro_batches=micro_batches, max_consecutive_skips=0)
    state = step.prepare(
        ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.float64)}, tx=tx)
    )
    # The reference: two good steps with a fresh step object, nothing else.
    ref_step = ft.make_train_step(_loss, tx, micro_batches=micro_batches, donate=False)
    ref = ft.TrainState.create(params={"w": torch.zeros(3, dtype=torch.float64)}, tx=tx)
    for _ in range(2):
        ref, _ = ref_step(ref, good)

    with pytest.raises(ft.NonFiniteError) as info:
        ft.train_loop(step, state, [good, good, bad, good, good])
    kept = info.value.train_state
    # Step 3 was skipped (the step count and key advance), step 4 raised before any change.
    assert int(kept.step) == 3 and not kept.consumed
    ft.testing.assert_trees_all_equal((kept.params, kept.opt_state), (ref.params, ref.opt_state))
    assert int(kept.extra["nonfinite"].consecutive) == 1
