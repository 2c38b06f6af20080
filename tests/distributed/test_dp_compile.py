"""``make_data_parallel_train_step(..., compile=...)``: compiled regions around eager collectives.

A 2-rank gloo job (``_dp_compile_worker.py``) runs the compiled data-parallel step beside the
eager one and the single-process :func:`functrain.make_train_step` on the concatenated batch
(unequal shares, two micro-batches, a warmup-cosine schedule, a skipped NaN step) and counts
compilations; world size 1 and the refused combinations run in this process. ``aot_eager``
backend: recompilations are dynamo's doing, whatever the backend. Float64 of order 1: the
compiled step differs from the references by rounding only (about 1e-16), checked to 1e-12.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist
from functrain import testing

TIGHT = 1e-12
FAST = {"backend": "aot_eager"}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("dp_compile")
    results = gloo_jobs.run_job("_dp_compile_worker.py", 2, out, timeout=180)
    assert [r["exit"] for r in results] == [0, 0], [r["stderr"][-2000:] for r in results]
    return results


def test_compiled_data_parallel_step_matches_eager_and_single_process(job: list[dict]) -> None:
    ranks = gloo_jobs.probe_results(job, "matches")
    for r in ranks:
        assert r["eager"] < TIGHT
        assert r["single"] < TIGHT
        assert r["metrics"] < TIGHT
        assert r["opt_state"] < TIGHT
        assert r["skipped"] == [int(s == 4) for s in range(30)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # the ranks end bitwise equal


def test_a_scheduled_30_step_run_compiles_each_region_once(job: list[dict]) -> None:
    for r in gloo_jobs.probe_results(job, "matches"):
        # The gradient graph and the update graph: one compilation each, no recompiles.
        assert r["compiles"] == 2, r["reasons"]


def _loss(p, b):
    return (torch.tanh(b["x"] @ p["w"]) @ p["v"] - b["y"]).square().mean()


def test_world_size_one_matches_make_train_step() -> None:
    g = torch.Generator().manual_seed(0)
    params = {
        "w": torch.randn(4, 6, generator=g, dtype=torch.float64),
        "v": torch.randn(6, generator=g, dtype=torch.float64),
    }
    tx = ft.adamw(ft.warmup_cosine_decay_schedule(0.0, 0.05, 3, 10))
    step = dist.make_data_parallel_train_step(_loss, tx, compile=FAST, micro_batches=2)
    ref = ft.make_train_step(_loss, tx, micro_batches=2)
    state = step.init_state({k: v.clone() for k, v in params.items()})
    expected = ft.TrainState.create(params=params, tx=tx)
    with testing.assert_max_compiles(2):
        for _ in range(10):
            batch = {
                "x": torch.randn(6, 4, generator=g, dtype=torch.float64),
                "y": torch.randn(6, generator=g, dtype=torch.float64),
            }
            state, metrics = step(state, batch)
            expected, ref_metrics = ref(expected, batch)
    assert gloo_jobs.gap(state.params, expected.params) < TIGHT
    assert gloo_jobs.gap(state.opt_state, expected.opt_state) < TIGHT
    assert set(metrics) == set(ref_metrics)
    assert gloo_jobs.gap(metrics, ref_metrics) < TIGHT
    assert int(state.step) == 10


def test_world_size_one_with_a_loss_scale_matches_make_train_step() -> None:
    # float16 loss scaling through the compiled regions: an overflowing step (inf in the batch)
    # is skipped and halves the scale, as in the eager single-process step.
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(4, 6, generator=g), "v": torch.randn(6, generator=g)}
    tx = ft.adam(1e-2)
    options = {"micro_batches": 2, "loss_scale": ft.DynamicLossScale(init_scale=2.0**8)}
    step = dist.make_data_parallel_train_step(_loss, tx, compile=FAST, **options)
    ref = ft.make_train_step(_loss, tx, **options)
    state = step.init_state({k: v.clone() for k, v in params.items()})
    expected = ref.prepare(ft.TrainState.create(params=params, tx=tx))
    skipped = []
    for i in range(6):
        batch = {"x": torch.randn(6, 4, generator=g), "y": torch.randn(6, generator=g)}
        if i == 2:
            batch["x"][0, 0] = float("inf")
        state, metrics = step(state, batch)
        expected, ref_metrics = ref(expected, batch)
        skipped.append(int(metrics["skipped"]))
        assert float(metrics["loss_scale"]) == float(ref_metrics["loss_scale"])
    assert skipped == [0, 0, 1, 0, 0, 0]
    torch.testing.assert_close(state.params, expected.params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        state.extra["loss_scale"].scale, expected.extra["loss_scale"].scale, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shard_optimizer": True}, ValueError, "compile= is not supported with shard_optimizer"),
        (
            {"grad_stats": ft.noise_scale_hook()},
            ValueError,
            "compile= is not supported with grad_stats",
        ),
        ({"per_example_clip": 1.0}, ValueError, "does not support compile"),
        # make_train_step's own checks, unchanged
        ({"grad_backend": "autograd"}, ValueError, "grad_backend='autograd' cannot be compiled"),
        ({"compile": "yes"}, TypeError, "compile must be a bool or a dict"),
        ({"compile": {"fullgraph": False}}, ValueError, "fullgraph=True"),
        ({"compile": {"mode": "reduce-overhead"}}, ValueError, "CUDA graphs"),
    ],
)
def test_refused_combinations_are_named(kwargs, error, match) -> None:
    tx = ft.chain(ft.dp_noisy_mean(1.0, 1.0, 8.0, 0), ft.sgd(0.1))
    options = {"compile": True, **kwargs}
    with pytest.raises(error, match=match):
        dist.make_data_parallel_train_step(lambda p, b: p["w"].sum(), tx, **options)
