"""The data-parallel step refuses a state made for another optimizer at any call (as the
single-process step does), not only at its first one."""

from __future__ import annotations

import pytest
import torch

import functrain as ft
from functrain import distributed as dist


def _loss(params, batch):
    return (params["w"] * batch).sum() ** 2


@pytest.mark.parametrize("shard", [False, True])
def test_a_state_for_another_optimizer_is_refused_after_the_first_call(shard):
    step = dist.make_data_parallel_train_step(_loss, ft.sgd(0.1), shard_optimizer=shard)
    state = step.init_state({"w": torch.ones(2)})
    for _ in range(2):
        state, _ = step(state, torch.ones(3, 2))
    foreign = ft.TrainState.create(params={"w": torch.ones(2)}, tx=ft.adam(0.1))
    with pytest.raises(ValueError, match="opt"):
        step(foreign, torch.ones(3, 2))
    assert not foreign.consumed  # refused before anything ran
    state, _ = step(state, torch.ones(3, 2))  # the step's own states still pass
    assert int(state.step) == 3
