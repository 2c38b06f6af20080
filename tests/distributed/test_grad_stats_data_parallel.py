"""``make_data_parallel_train_step(..., grad_stats=hook)``: statistics of all ranks' micro-batches.

Two gloo ranks on loopback (``_grad_stats_worker.py``), float64, batch sizes 5 and 3 with
``micro_batches=2``, against the single-process ``ft.make_train_step`` on the concatenated batch
with ``micro_batches=[3, 2, 2, 1]`` (the ranks' micro-batches in rank order): the same hook
metrics, hook state and parameters over three steps, for ``noise_scale_hook()`` (``"loop"`` and
``"vmap"``), ``noise_scale_hook(cosine=True)`` (its accumulator summed over the ranks) and a custom
hook that also sees the very same per-micro-batch stats; ranks with different ``K`` are refused
on both. Then, in this process, the refused combinations and the world-size-1 step.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist

HERE = Path(__file__).parent
TIGHT = 1e-12  # absolute; values are of order 1 to 100 and differ by rounding only


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results (with its exit code and stderr)."""
    return gloo_jobs.run_job("_grad_stats_worker.py", 2, tmp_path_factory.mktemp("grad_stats_dp"))


@pytest.mark.parametrize("name", ["noise", "noise_vmap", "cosine", "custom"])
def test_hook_sees_all_ranks_micro_batches_as_one_process_would(job, name: str):
    probes = gloo_jobs.probe_results(job, name)
    for p in probes:
        assert p["names"] is None, p["names"]  # the same metric names as the single process
        assert p["metric_gap"] < TIGHT
        assert p["state_gap"] < TIGHT
        assert p["param_gap"] < TIGHT
    assert probes[0]["values"] == probes[1]["values"]  # equal on every rank, bit for bit
    hook_metrics = [k for k in probes[0]["values"][0] if "/" in k]
    assert hook_metrics  # the hook's metrics joined the step's
    if name == "cosine":
        assert "noise_scale/mean_cosine" in hook_metrics
    if name == "custom":
        assert probes[0]["sizes"] == [3.0, 2.0, 2.0, 1.0]  # all ranks, in rank order
        for p in probes:
            assert p["stats_gap"] < TIGHT
            assert all(abs(v["custom/w0_gap"]) < TIGHT for v in p["values"])


def test_ranks_with_different_micro_batch_counts_are_refused_on_every_rank(job):
    for p in gloo_jobs.probe_results(job, "mismatched_k"):
        assert p["type"] == "RankMismatchError"
        assert "K (micro-batches per rank)" in p["message"]
        assert "2 on rank 0, 3 on rank 1" in p["message"]


def _loss(p, b):
    return ((b @ p["w"]) ** 2).mean()


def test_shard_optimizer_is_refused_with_grad_stats():
    with pytest.raises(ValueError, match="grad_stats is not supported with shard_optimizer"):
        dist.make_data_parallel_train_step(
            _loss, ft.sgd(0.1), shard_optimizer=True, grad_stats=ft.noise_scale_hook()
        )


def test_per_example_clip_is_refused_with_grad_stats():
    with pytest.raises(ValueError, match="grad_stats"):
        dist.make_data_parallel_train_step(
            _loss, ft.sgd(0.1), per_example_clip=1.0, grad_stats=ft.noise_scale_hook()
        )


def test_hook_metric_named_like_a_step_metric_is_refused():
    hook = ft.GradStatsHook(
        init=lambda p: None,
        per_micro_batch=lambda g, b: {},
        update=lambda stats, grads, s: ({"grad_norm": stats.sizes.sum()}, s),
    )
    step = dist.make_data_parallel_train_step(_loss, ft.sgd(0.1), micro_batches=2, grad_stats=hook)
    with pytest.raises(ValueError, match="grad_norm"):
        step(step.init_state({"w": torch.ones(2)}), torch.ones(4, 2))


@pytest.mark.parametrize("cosine", [False, True])
def test_world_size_one_equals_the_train_step(cosine: bool):
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, generator=g, dtype=torch.float64)}
    batch = torch.randn(7, 3, generator=g, dtype=torch.float64)
    hook = ft.noise_scale_hook(cosine=cosine)
    step = dist.make_data_parallel_train_step(
        _loss, ft.sgd(0.1), micro_batches=[3, 2, 2], grad_stats=hook
    )
    ref_step = ft.make_train_step(_loss, ft.sgd(0.1), micro_batches=[3, 2, 2], grad_stats=hook)
    state, metrics = step(step.init_state(params), batch)
    ref, ref_metrics = ref_step(ft.TrainState.create(params=params, tx=ft.sgd(0.1)), batch)
    assert sorted(metrics) == sorted(ref_metrics)
    for k, v in ref_metrics.items():
        torch.testing.assert_close(metrics[k], v, rtol=0, atol=1e-14)
    torch.testing.assert_close(state.extra["noise_scale"], ref.extra["noise_scale"])
    assert "noise_scale" in step.prepare(step.init_state(params)).extra
