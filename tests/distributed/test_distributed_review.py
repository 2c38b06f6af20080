"""Regression tests from a review of data-parallel training against single-process references.

Multi-process probes (``_review_worker.py``, gloo on loopback, world sizes 1, 2 and 3 run side
by side) compare the data-parallel step, plain and ZeRO-1, with ``ft.make_train_step`` on the
concatenated batch in float64:

* a rank whose ``LossSum`` count is zero (padding only) used to poison every step with its
  ``0 / 0`` mean: every step skipped, NaN loss;
* ZeRO-1 against replicated against one process, with AdamW, a leading clip, a weight-decay mask
  and a schedule, on parameters that do not divide the world size, 0-d, empty and float32 ones,
  unequal batches and micro-batches on one rank; metrics identical on every rank;
* a non-finite loss on one rank only: every rank skips, then trains on identically;
* a sharded state gathered, saved by rank 0, restored and resharded continues exactly;
* ``init_state`` on ranks whose parameters differ in shape used to broadcast anyway: silently
  wrong shapes on one side, a gloo abort of the process on the other.

In one process: float16 gradients used to overflow when multiplied by the batch size.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist

HERE = Path(__file__).parent
WORLDS = (1, 2, 3)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    outs = {w: tmp_path_factory.mktemp(f"review{w}") for w in WORLDS}
    started = {w: gloo_jobs.start("_review_worker.py", w, [str(outs[w])]) for w in WORLDS}
    try:
        return {w: gloo_jobs.finish(procs, outs[w], timeout=180) for w, procs in started.items()}
    finally:
        gloo_jobs.kill_all(started.values())


def _probe(results: dict, world: int, name: str) -> list[dict]:
    out = []
    for rank, data in enumerate(results[world]):
        assert name in data, (world, rank, data.get("exit"), data.get("stderr"))
        assert "Traceback" not in str(data[name].get("error")), data[name]["error"]
        out.append(data[name])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_with_zero_tokens_contributes_nothing(results, world: int):
    for probe in _probe(results, world, "zero_token_rank"):
        for mode, got in probe.items():
            assert got["skipped"] == 0, (mode, got)  # was: every step skipped, NaN loss
            assert got["params"] <= 1, (mode, got)
            assert got["loss"] <= 1e-12 and got["acc"] <= 1e-12, (mode, got)


@pytest.mark.parametrize("world", WORLDS)
def test_zero1_matches_replicated_and_one_process_on_awkward_parameters(results, world: int):
    probes = _probe(results, world, "zero_vs_replicated")
    for probe in probes:
        for mode in ("shard=False", "shard=True"):
            got = probe[mode]
            assert got["params"] <= 1 and got["opt_state"] <= 1, (mode, got)
            assert got["loss"] <= 1e-6 and got["grad_norm"] <= 1e-6, (mode, got)
        assert probe["shard_vs_plain"] <= 1, probe["shard_vs_plain"]
    for mode in ("shard=False", "shard=True"):  # global metrics: bit for bit on every rank
        assert all(p[mode]["metrics"] == probes[0][mode]["metrics"] for p in probes), mode


@pytest.mark.parametrize("world", [2, 3])
def test_a_nan_loss_on_the_last_rank_skips_on_every_rank(results, world: int):
    probes = _probe(results, world, "nonfinite_one_rank")
    for mode in ("shard=False", "shard=True"):
        for probe in probes:
            assert probe[mode]["skipped"] == [1, 0] and probe[mode]["kept"] == 0, probe[mode]
        assert all(p[mode]["final"] == probes[0][mode]["final"] for p in probes), mode


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_checkpoint_resumes_exactly(results, world: int):
    for probe in _probe(results, world, "checkpoint"):
        assert probe == {"params": 0.0, "opt_state": 0.0, "step": 4}, probe


@pytest.mark.parametrize("world", [2, 3])
def test_init_state_refuses_ranks_with_other_parameter_shapes(results, world: int):
    for data in results[world]:
        assert data["exit"] == 0, data["stderr"]  # was: rank 1 aborted by gloo
    for probe in _probe(results, world, "init_mismatch"):
        assert probe["error"] == "RankMismatchError", probe  # was: rank 1 kept a (4, 3) w
        assert "(5, 3)" in probe["message"] and "(4, 3)" in probe["message"], probe


def test_init_state_of_one_process_needs_no_agreement(results):
    assert _probe(results, 1, "init_mismatch") == [{"error": None, "shape": [5, 3]}]


@pytest.mark.parametrize("shard", [False, True])
def test_float16_gradients_do_not_overflow_when_weighted_by_the_batch_size(shard: bool):
    def loss_fn(params, batch):
        return (batch * params["w"]).sum(-1).mean()

    params = {"w": torch.ones(3, dtype=torch.float16)}
    batch = torch.full((5000, 3), 20.0, dtype=torch.float16)  # gradient 20, 5000 · 20 > 65504
    ref_step = ft.make_train_step(loss_fn, ft.sgd(1e-3))
    ref, ref_m = ref_step(ft.TrainState.create(params=params, tx=ft.sgd(1e-3)), batch)
    step = dist.make_data_parallel_train_step(loss_fn, ft.sgd(1e-3), shard_optimizer=shard)
    state, m = step(step.init_state(params), batch)
    assert int(m["skipped"]) == 0 == int(ref_m["skipped"])  # was: skipped, grad_norm inf
    ft.testing.assert_trees_all_equal(state.params, ref.params)
    torch.testing.assert_close(m["grad_norm"], ref_m["grad_norm"])


@pytest.mark.parametrize("n", [63, 64, 65, 97])
@pytest.mark.parametrize("world", [2, 3])
def test_the_guides_drop_last_gives_every_rank_the_same_number_of_steps(n: int, world: int):
    kwargs = {"world_size": world, "shuffle": True, "seed": 3, "epoch": 1}
    steps = [
        len(dist.shard_indices(n, rank=r, drop_last=True, **kwargs).split(32)) for r in range(world)
    ]
    assert len(set(steps)) == 1, steps
    seen = torch.cat(
        [dist.shard_indices(n, rank=r, drop_last=True, **kwargs) for r in range(world)]
    )
    assert seen.unique().numel() == seen.numel() == n - n % world  # no example twice
