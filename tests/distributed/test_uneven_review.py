"""Review of the data-parallel step's empty rank batches (``_uneven_review_worker.py``).

One 2-rank gloo job, float64:

* A loss with batch norm in training mode and an empty rank: the empty rank's stand-in must
  be evaluable (batch norm refuses one value per channel), so every step still equals the
  single-process step on the concatenation of the ranks' batches, and the empty rank keeps
  its buffers. Before: the stand-in had one example per micro-batch, the empty rank raised
  alone and the other waited for the group's timeout.
* Every rank empty with a ``grad_stats`` hook where the flags are not read (a device backend,
  simulated): the hook's refusal raises on each rank before the collectives, the state
  untouched. Before: the refusal was silently dropped and the step ran on stand-ins.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest

TIGHT = 1e-12  # float64 values of order 1: the differences are rounding, about 1e-16
PROMPT = 4.0  # seconds; the group's timeout is 6


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("uneven_review")
    return gloo_jobs.run_job("_uneven_review_worker.py", 2, out, timeout=40)


def test_empty_rank_with_batch_norm_matches_the_concatenated_batch(job: list[dict]) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "batch_norm")
    for rank in (r0, r1):
        assert rank["params"] < TIGHT
        assert rank["loss"] < TIGHT
        assert rank["s"] < PROMPT
    assert r0["kept_buffers"] == [False, True, False]
    assert r1["kept_buffers"] == [True, False, True]


def test_grad_stats_refusal_raises_before_the_collectives_on_a_device(job: list[dict]) -> None:
    for rank in gloo_jobs.probe_results(job, "grad_stats_on_device"):
        assert rank["type"] == "ValueError" and "grad_stats" in rank["msg"]
        assert rank["s"] < PROMPT
        assert rank["untouched"]
