"""Schedule-free and ``reduce_on_plateau`` on a sharded (ZeRO-1) optimizer state.

Both work element by element (schedule-free's scalars and the plateau's scale are the same on
every rank; the plateau reads the global mean loss as ``value=``), so the sharded step must
equal one process on the concatenated batch: parameters and the whole optimizer state.
"""

from __future__ import annotations

import _zero_new_optimizers_worker as worker
import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("zero_new")
    return gloo_jobs.run_job("_zero_new_optimizers_worker.py", 2, out, timeout=120)


@pytest.mark.parametrize("name", sorted(worker.TXS))
def test_sharded_step_equals_one_process(job: list[dict], name: str) -> None:
    tx = worker.TXS[name]()
    step = ft.make_train_step(worker.loss, tx)
    state = ft.TrainState.create(params=worker.params(), tx=tx)
    for _ in range(worker.STEPS):
        state, _ = step(state, worker.batch())
    if name.endswith("plateau"):
        assert float(state.opt_state[1].scale) == 0.5**4  # patience 1: a drop at steps 2-5
    for rank in job:
        assert "error" not in rank, rank.get("error")
        got = rank[name]
        params = {k: torch.tensor(v, dtype=torch.float64) for k, v in got["params"].items()}
        ft.testing.assert_trees_all_close(params, state.params, rtol=1e-12, atol=1e-14)
        leaves = ft.tree.leaves(state.opt_state)
        assert len(got["opt_state"]) == len(leaves)
        for value, leaf in zip(got["opt_state"], leaves):
            torch.testing.assert_close(
                torch.tensor(value, dtype=leaf.dtype), leaf, rtol=1e-12, atol=1e-14
            )


def test_checks_accept_them_and_look_inside_schedule_free() -> None:
    for make in worker.TXS.values():
        dist.check_shardable(make())
    with pytest.raises(dist.ShardingError, match="schedule_free/chain/scale_by_trust_ratio"):
        dist.check_shardable(ft.schedule_free(ft.lamb(1e-3), 1e-3))
