"""DP-SGD across ranks: ``make_data_parallel_train_step(..., per_example_clip=C)``.

Two gloo ranks on loopback (``_dp_worker.py``), float64, against the single-process
``ft.make_train_step(per_example_clip=C)`` on the concatenated batch, computed on every rank:

* unequal batch sizes, and empty batches on one rank or on both: the same parameters,
  optimizer state and metrics (``loss`` over the realized global batch, ``num_examples``,
  global ``clipped_fraction``), with ``micro_batches=1`` and ``2``;
* with noise: the same parameters as the single process too (the noise is a pure function of
  the replicated key and each element's position), bit-for-bit equal on both ranks after three
  steps, and the noise of a zero-gradient parameter has std ``σ·C/B_expected``;
* ranks whose ``dp_noisy_mean`` seeds differ are refused on every rank.

Then, in this process (world size 1), the argument checks.
"""

from __future__ import annotations

import math
from pathlib import Path

import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist

HERE = Path(__file__).parent
TIGHT = 1e-12  # absolute, on values of order 1; the differences are rounding, about 1e-16
C, B_EXPECTED, SIGMA = 1.0, 8.0, 1.3  # as in _dp_worker.py


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results (with its exit code and stderr)."""
    return gloo_jobs.run_job("_dp_worker.py", 2, tmp_path_factory.mktemp("dp_ddp"))


@pytest.mark.parametrize("name", ["unequal", "empty", "micro", "noisy", "noisy_micro_empty"])
def test_ranks_match_one_process_on_the_concatenated_batch(job, name: str):
    probes = gloo_jobs.probe_results(job, name)
    for probe in probes:
        assert probe["names"], probe
        assert probe["params"] < TIGHT and probe["opt_state"] < TIGHT, probe
        assert probe["metrics"] < TIGHT, probe
        assert probe["loss"] == pytest.approx(probe["ref_loss"], rel=1e-12, abs=1e-15)
        cf, ref_cf = probe["clipped_fraction"], probe["ref_clipped_fraction"]
        assert cf == pytest.approx(ref_cf, rel=1e-12, abs=1e-15)
    # Metrics are global, and the ranks end bit-for-bit equal.
    assert probes[0]["digest"] == probes[1]["digest"]
    assert probes[0]["num_examples"] == probes[1]["num_examples"]


def test_empty_batches_count_zero_and_still_step(job):
    probe = gloo_jobs.probe_results(job, "empty")[0]
    assert probe["num_examples"] == [5, 4, 0, 5]
    assert probe["loss"][2] == 0.0 and probe["clipped_fraction"][2] == 0.0
    # The hand-made clipped fractions are those of the concatenated batch (not rank means).
    assert any(0 < f < 1 for f in probe["clipped_fraction"]), probe


def test_noise_is_drawn_once_with_the_dp_scale(job):
    n = 20_000
    want = SIGMA * C / B_EXPECTED
    for name in ("noisy", "noisy_micro_empty"):
        probe = gloo_jobs.probe_results(job, name)[0]
        # std of a sample std of n normals: want / sqrt(2n); of its mean: want / sqrt(n).
        assert abs(probe["z_std"] - want) < 4 * want / math.sqrt(2 * n), probe
        assert abs(probe["z_mean"]) < 4 * want / math.sqrt(n), probe
    quiet = gloo_jobs.probe_results(job, "unequal")[0]
    assert quiet["z_std"] == 0.0  # noise_multiplier=0: nothing on the zero-gradient leaf


def test_ranks_with_other_noise_seeds_are_refused(job):
    for probe in gloo_jobs.probe_results(job, "seed_per_rank"):
        assert probe["raised"] and "noise key" in probe["raised"], probe


# -- argument checks, in one process ------------------------------------------------------


def _loss(p, batch):
    return (batch["x"] @ p["w"] - batch["y"]).square().mean()


def _tx(noise: float = 0.0):
    return ft.chain(ft.dp_noisy_mean(C, noise, B_EXPECTED, 0), ft.sgd(0.1))


def test_shard_optimizer_is_accepted():
    # Sharded DP-SGD draws each piece's slice of the whole noise: tests/distributed/test_zero_noise.py.
    step = dist.make_data_parallel_train_step(
        _loss, _tx(), per_example_clip=C, shard_optimizer=True
    )
    assert step.shard_optimizer and step.report is not None


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"strategy": "vmap"}, "strategy='vmap'"),
        ({"loss_scale": ft.DynamicLossScale()}, "loss_scale"),
        ({"micro_batches": [2, 3]}, "micro_batches as sizes"),
    ],
)
def test_single_process_option_checks_apply(kwargs: dict, named: str):
    with pytest.raises(ValueError, match="per_example_clip") as info:
        dist.make_data_parallel_train_step(_loss, _tx(), per_example_clip=C, **kwargs)
    assert named in str(info.value)


def test_bad_tx_is_refused_or_warned():
    with pytest.raises(ValueError, match="differentially_private_aggregate"):
        dist.make_data_parallel_train_step(_loss, ft.dpsgd(0.1, C, 1.0, 0), per_example_clip=C)
    with pytest.raises(ValueError, match="first transform"):
        tx = ft.chain(ft.scale(2.0), _tx())
        dist.make_data_parallel_train_step(_loss, tx, per_example_clip=C)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        dist.make_data_parallel_train_step(_loss, _tx(), per_example_clip=2 * C)
    # As make_train_step: a warning (a wrapper of the user's own may hide a dp_noisy_mean),
    # attributed to the caller.
    with pytest.warns(UserWarning, match="does not begin with dp_noisy_mean") as record:
        dist.make_data_parallel_train_step(_loss, ft.sgd(0.1), per_example_clip=C)
    assert record[0].filename == __file__


def test_world_of_one_with_an_empty_batch_is_make_train_step():
    p0 = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)}
    step = dist.make_data_parallel_train_step(_loss, _tx(1.0), per_example_clip=C, micro_batches=2)
    ref_step = ft.make_train_step(_loss, _tx(1.0), per_example_clip=C, micro_batches=2)
    state = step.init_state(dict(p0))
    ref = ft.TrainState.create(params=dict(p0), tx=_tx(1.0))
    g = torch.Generator().manual_seed(0)
    for n in (5, 0, 1):
        batch = {
            "x": torch.randn(n, 3, generator=g, dtype=torch.float64),
            "y": 4 * torch.randn(n, generator=g, dtype=torch.float64),
        }
        state, metrics = step(state, batch)
        ref, ref_metrics = ref_step(ref, batch)
        assert sorted(metrics) == sorted(ref_metrics)
        assert "grad_norm" not in metrics
        ft.testing.assert_trees_all_close(metrics, ref_metrics, rtol=1e-12, atol=1e-15)
    ft.testing.assert_trees_all_close(state.params, ref.params, rtol=1e-12, atol=1e-15)
