"""Muon under the data-parallel step: replicated equals one process; ZeRO-1 is refused.

Muon orthogonalizes whole matrices (Newton–Schulz), so a rank's block of rows would get another
update than the whole matrix: the sharded step must refuse it by name, not train differently.
"""

from __future__ import annotations

import _muon_worker as worker
import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results."""
    return gloo_jobs.run_job("_muon_worker.py", 2, tmp_path_factory.mktemp("muon"), timeout=60)


def test_replicated_muon_matches_single_process_full_batch(job: list[dict]) -> None:
    tx = worker.tx()
    params, b = worker.params(), worker.batch()
    state = tx.init(params)
    for _ in range(3):  # the reference: the whole batch's gradient through tx.update
        updates, state = tx.update(torch.func.grad(worker.loss)(params, b), state, params)
        params = ft.apply_updates(params, updates)
    for rank in job:
        assert "error" not in rank, rank.get("error")
        got = {k: torch.tensor(v, dtype=torch.float64) for k, v in rank["params"].items()}
        ft.testing.assert_trees_all_close(got, params, rtol=1e-10, atol=1e-12)


def test_sharded_muon_is_refused_naming_the_transform(job: list[dict]) -> None:
    for rank in job:
        assert rank["sharded"]["type"] == "ShardingError", rank["sharded"]
        assert "scale_by_muon" in rank["sharded"]["message"]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: t,
        lambda t: ft.chain(ft.clip_by_global_norm(1.0), t),
        lambda t: ft.MultiSteps(t, every_k_schedule=2),
        lambda t: ft.masked(t, lambda p: ft.tree.map(lambda x: x.dim() == 2, p)),
    ],
    ids=["plain", "clip", "multisteps", "masked"],
)
def test_check_shardable_refuses_muon_inside_wrappers(wrap) -> None:
    with pytest.raises(dist.ShardingError, match="scale_by_muon"):
        dist.check_shardable(wrap(ft.scale_by_muon()))
    with pytest.raises(dist.ShardingError, match="scale_by_muon"):
        dist.check_shardable(wrap(ft.muon(0.1)))
