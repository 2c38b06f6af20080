"""The ordinary data-parallel step with an empty batch on a rank, and a batch a rank refuses.

One 2-rank gloo job (``_uneven_batches_worker.py``), float64:

* An empty batch (leading size 0) on one rank, in steps 1 and 3 of four, contributes nothing:
  parameters, Adam state and metrics (loss, ``num_examples``, ``num_tokens``, mean and
  ``LossSum`` aux metrics) equal the single-process step on the concatenation of the ranks'
  batches; with ``micro_batches=2``, ZeRO-1 with tiny buckets, and ``nonfinite="skip"``
  (skips decided as the single process decides them). The empty rank's buffers are untouched;
  with ``sync_buffers="broadcast"`` and rank 0 empty, every rank keeps the old buffers.
* Every rank empty: ``ValueError`` on every rank, the state untouched and still usable.
* A batch refused on one rank (fewer examples than ``micro_batches``, leaves of different
  leading sizes; replicated and ZeRO-1, ``donate=True``), or an empty one with a ``grad_stats``
  hook: every rank raises within seconds (the group's timeout is 60 s), the refusing rank its
  own ``ValueError``, the other a ``DistributedStepError`` naming it; the state is untouched
  and the next step on it equals the single-process step.

Before: the empty or refusing rank raised before any collective and the other rank waited for
the group's timeout.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest

TIGHT = 1e-12  # float64 values of order 1: the differences are rounding, about 1e-16
PROMPT = 10.0  # seconds; the group's timeout is 60


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("uneven_batches")
    return gloo_jobs.run_job("_uneven_batches_worker.py", 2, out, timeout=50)


@pytest.mark.parametrize("name", ["mean", "mean_broadcast", "mean_k2", "sum", "sum_k2_sharded"])
def test_empty_rank_matches_the_concatenated_batch(job: list[dict], name: str) -> None:
    ranks = gloo_jobs.probe_results(job, name)
    for rank in ranks:
        assert rank["params"] < TIGHT
        assert rank["metrics"] < TIGHT
        assert rank["opt_state"] < TIGHT
        assert rank["skipped"] == rank["ref_skipped"]
    assert ranks[0]["digest"] == ranks[1]["digest"]


def test_empty_rank_keeps_its_buffers(job: list[dict]) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "mean")  # sync_buffers="none"; rank 0 empty in step 0
    assert r0["kept_buffers"] == [True, False, False, False]
    assert r1["kept_buffers"] == [False, False, True, False]
    # Broadcast: rank 0's buffers everywhere, its old ones when it was empty.
    b0, b1 = gloo_jobs.probe_results(job, "mean_broadcast")
    assert b0["kept_buffers"] == b1["kept_buffers"] == [True, False, False, False]


def test_empty_rank_with_skipped_steps(job: list[dict]) -> None:
    for rank in gloo_jobs.probe_results(job, "sum_skip"):
        assert rank["ref_skipped"] == [False, True, True, False]
        assert rank["skipped"] == rank["ref_skipped"]
        assert rank["params"] < TIGHT and rank["opt_state"] < TIGHT


@pytest.mark.parametrize("name", ["all_empty", "all_empty_sharded"])
def test_every_rank_empty_raises_on_every_rank(job: list[dict], name: str) -> None:
    for rank in gloo_jobs.probe_results(job, name):
        assert rank["type"] == "ValueError" and "every rank" in rank["msg"]
        assert rank["untouched"]
        assert rank["num_examples"] == 4  # the state still takes the next step


@pytest.mark.parametrize("name", ["refused_few", "refused_ragged", "refused_sharded"])
def test_a_refusing_rank_makes_every_rank_raise_promptly(job: list[dict], name: str) -> None:
    r0, r1 = gloo_jobs.probe_results(job, name)
    assert r1["type"] == "ValueError"  # its own error
    assert r0["type"] == "DistributedStepError" and "[1]" in r0["msg"]
    for rank in (r0, r1):
        assert rank["s"] < PROMPT
        assert rank["untouched"]
        assert rank["after"] < TIGHT


def test_empty_rank_with_grad_stats_is_refused_on_every_rank(job: list[dict]) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "grad_stats_empty")
    assert r1["type"] == "ValueError" and "grad_stats" in r1["msg"]
    assert r0["type"] == "DistributedStepError"
    assert r0["s"] < PROMPT and r1["s"] < PROMPT
    assert r0["untouched"] and r1["untouched"]


def test_a_ragged_dp_sgd_batch_makes_every_rank_raise_promptly(job: list[dict]) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "refused_dp")
    assert r1["type"] == "ValueError"  # its own error
    assert r0["type"] == "DistributedStepError" and "[1]" in r0["msg"]
    assert r0["s"] < PROMPT and r1["s"] < PROMPT
    assert r0["untouched"] and r1["untouched"]
