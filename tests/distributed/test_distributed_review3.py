"""Regression tests from a third review of data-parallel training (2 gloo ranks on loopback).

Bug found (failed before its fix):

* ``num_tokens`` of a :class:`~functrain.LossSum` loss was rounded to the loss's dtype: with a
  bfloat16 loss, 1001 tokens were reported as 1000 (``make_train_step`` keeps counts in at
  least float32, exact to ``2**24``). It now keeps the dtype of the train step's count.

Checked against single-process float64 references or hand maths (passing before and after), in
one job of 2 ranks with unequal shares (3 and 5 examples, ``_review3_worker.py``):

* a loss reading and updating a running-mean buffer (as BatchNorm does), plain and ZeRO-1,
  with a leading clip and Adam: every rank ends each step with rank 0's buffers (hand maths
  from rank 0's share alone) and the parameters of one process on the whole batch with those
  buffers, the aux metric of the whole batch;
* a real ``BatchNorm1d`` (per-rank batch statistics), plain and ZeRO-1: the parameters move
  by the example-weighted mean of the ranks' single-process gradients, and every rank takes
  rank 0's running statistics and its int64 counter;
* dropout with micro-batches: rank ``r``'s masks are those of one process whose key is
  ``rank_key(key, r)``, so the ranks' gradients differ and the step is reproducible;
* an ``inf`` on the last rank only under dynamic loss scaling, plain and ZeRO-1: every rank
  skips, halves the scale and continues as one process does (parameters, ``extra``, the whole
  optimizer state gathered with ``full_state``);
* token-weighted and example-weighted aux metrics over ranks with 2 and 3 micro-batches;
* ranks whose ``loss_fn`` returns other aux names raise ``RankMismatchError`` on both ranks.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist

HERE = Path(__file__).parent
TIGHT = 1e-12  # relative; the differences measured are about 1e-16


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results (with its exit code and stderr)."""
    out = tmp_path_factory.mktemp("review3")
    procs = gloo_jobs.start("_review3_worker.py", 2, [str(out)])
    try:
        return gloo_jobs.finish(procs, out, timeout=180)
    finally:
        gloo_jobs.kill_all([procs])


def _probe(job: list[dict], name: str) -> list[dict]:
    found = []
    for rank, data in enumerate(job):
        assert name in data, (rank, data.get("exit"), data.get("stderr"))
        assert "Traceback" not in str(data[name].get("error")), data[name]["error"]
        found.append(data[name])
    return found


@pytest.mark.parametrize("name", ["buffers", "buffers_zero"])
def test_buffers_are_rank_zeros_and_params_those_of_the_whole_batch(job, name: str):
    for probe in _probe(job, name):
        assert probe["params"] < TIGHT and probe["aux"] < TIGHT, probe
        assert probe["buffers"] == 0.0, probe  # rank 0's, bit for bit


@pytest.mark.parametrize("name", ["batchnorm", "batchnorm_zero"])
def test_batchnorm_is_the_weighted_mean_of_the_ranks_gradients(job, name: str):
    for probe in _probe(job, name):
        assert probe["params"] < 1e-12, probe
        assert probe["buffers"] == 0.0 and probe["counter"] == "torch.int64", probe


def test_dropout_masks_are_per_rank_as_one_process_with_the_rank_key(job):
    for probe in _probe(job, "dropout"):
        assert probe["params"] < TIGHT, probe
        assert probe["repeat"] == 0.0 and probe["local_grads_differ"], probe


@pytest.mark.parametrize("name", ["scale_inf", "scale_inf_zero"])
def test_an_inf_on_one_rank_skips_and_rescales_on_every_rank(job, name: str):
    for probe in _probe(job, name):
        assert probe["skipped"] == [0.0, 1.0, 0.0, 0.0], probe
        assert probe["gap"] < TIGHT, probe


def test_token_metrics_over_ranks_with_other_micro_batch_counts(job):
    for probe in _probe(job, "tokens_micro"):
        assert 0.0 < probe["hit_rate"] < 1.0, probe  # the metric is not trivially 0 or 1
        assert probe["params"] < TIGHT, probe
        assert max(probe["metrics"].values()) < TIGHT, probe
        assert max(probe["ref_agrees"].values()) < TIGHT, probe


def test_bfloat16_token_counts_stay_exact_over_ranks(job):
    for probe in _probe(job, "bf16_tokens"):
        assert probe == {"num_tokens": 1001.0, "dtype": "torch.float32"}  # was 1000 in bfloat16


def test_ranks_with_other_aux_names_fail_on_every_rank(job):
    for probe in _probe(job, "aux_mismatch"):
        assert probe["error"] == "RankMismatchError", probe
        assert "metric names" in probe["message"], probe


def test_bfloat16_token_count_matches_make_train_step():
    """One process: 1001 bfloat16 tokens were reported as 1000."""

    def loss(params, batch):
        err = (batch @ params["w"]).square()
        return ft.LossSum(err.sum(), torch.tensor(err.numel()))

    params = {"w": torch.ones(3, dtype=torch.bfloat16)}
    batch = torch.full((1001, 1), 0.01, dtype=torch.bfloat16).expand(1001, 3)
    ref_step = ft.make_train_step(loss, ft.sgd(0.1))
    _, ref = ref_step(ft.TrainState.create(params=params, tx=ft.sgd(0.1)), batch)
    step = dist.make_data_parallel_train_step(loss, ft.sgd(0.1))
    _, metrics = step(step.init_state(params), batch)
    assert metrics["num_tokens"].dtype == ref["num_tokens"].dtype == torch.float32
    assert metrics["num_tokens"].item() == 1001.0


@pytest.mark.parametrize("option", ["compile"])
def test_unsupported_options_are_refused_by_name(option: str):
    """The guide: not ``compile`` (``grad_stats``: test_grad_stats_data_parallel;
    ``per_example_clip``: test_dp_data_parallel)."""
    with pytest.raises(TypeError, match=option):
        dist.make_data_parallel_train_step(lambda p, b: p["w"].sum(), ft.sgd(0.1), **{option: 1.0})
