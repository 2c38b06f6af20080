"""An eager data-parallel step whose own part raises on one rank only.

A 2-rank gloo job (``_dp_eager_failure_worker.py``) makes rank 1's part of a step raise while
its process stays alive: a bad token id in its batch (``IndexError``; on micro-batch ``i > 0``
with ``K > 1``), a rank-specific shape, a ``grad_stats`` hook that raises, a state made for
another optimizer; on the first call and on a later one, with ``per_example_clip``, ZeRO-1
(``shard_optimizer=True``), a ``LossSum`` loss with aux metrics and buffers, and the autograd
backend. Every rank must raise at once (rank 1 its own error, rank 0 a ``DistributedStepError``
naming rank 1 and that error), with no collective left behind and no state changed; a retry of
the same call on every rank with good data must then give, bit for bit, what a fresh run gives.
The job's timeout is far below the group's (300 s): a rank left waiting in a collective, as the
step did before, fails the job instead of hanging the tests. A probe counts collectives: healthy
calls do exactly what they did before (no extra collective), a failing later call one object
all-gather more.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import _dp_eager_failure_worker as w
import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist

DSE = "functrain.distributed.errors.DistributedStepError"
PROMPT = 20.0  # seconds for a failing call: far below the group's timeout
JOB_TIMEOUT = 100.0  # the whole job (16 probes), far below the group's timeout (300 s)
OOB = "out of bounds"  # IndexError: index 99 is out of bounds for dimension 0 with size 10


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("dp_eager_failure")
    results = gloo_jobs.run_job("_dp_eager_failure_worker.py", 2, out, timeout=JOB_TIMEOUT)
    assert [r["exit"] for r in results] == [0, 0], [r["stderr"][-2000:] for r in results]
    return results


def _check(name: str, job: list[dict], rank1_type: str, text: str) -> None:
    """Rank 1 raised its own error (noted as seen by every rank), rank 0 a
    DistributedStepError naming rank 1 and that error's type and message, both promptly; no
    collective was left behind, the state given to the failed call is unchanged on both
    ranks, and the retry went on exactly as a fresh run on the good batches."""
    r0, r1 = gloo_jobs.probe_results(job, name)
    own, other = r1["failure"]["raised"], r0["failure"]["raised"]
    assert own is not None and other is not None, (r0, r1)
    assert own["type"] == rank1_type, own
    assert text in own["message"], own
    assert any("rank(s) [1]" in note for note in own["notes"]), own["notes"]
    assert other["type"] == DSE, other
    assert "rank(s) [1]" in other["message"], other
    assert rank1_type.rsplit(".", 1)[-1] in other["message"], other
    assert text in other["message"], other
    for r in (r0, r1):
        assert r["failure"]["seconds"] < PROMPT, r["failure"]["seconds"]
        assert r["in_step"] == 3.0  # both ranks met in the next collective
        assert r["untouched"] is True
        assert r["same_as_fresh"] is True and r["metrics_as_fresh"] is True
    assert r0["digest"] == r1["digest"]  # the replicated parameters and buffers stayed equal


def test_a_bad_batch_on_the_first_call(job) -> None:
    _check("first_call", job, "builtins.IndexError", OOB)


def test_a_bad_batch_on_the_first_call_without_check_ranks(job) -> None:
    _check("first_call_no_checks", job, "builtins.IndexError", OOB)


def test_both_ranks_failing_each_raise_their_own_error(job) -> None:
    for r in gloo_jobs.probe_results(job, "both_later"):
        own = r["failure"]["raised"]
        assert own["type"] == "builtins.IndexError", own
        assert any("rank(s) [0, 1]" in note for note in own["notes"]), own["notes"]
        assert r["failure"]["seconds"] < PROMPT
        assert r["in_step"] == 3.0 and r["untouched"] is True
        assert r["same_as_fresh"] is True and r["metrics_as_fresh"] is True


def test_a_later_failure_on_the_last_of_three_micro_batches(job) -> None:
    # LossSum loss, aux metrics with counts, buffers broadcast from rank 0.
    _check("later_k3", job, "builtins.IndexError", OOB)


def test_a_later_failure_with_the_autograd_backend(job) -> None:
    _check("later_autograd", job, "builtins.IndexError", OOB)


def test_a_later_rank_specific_shape_error(job) -> None:
    _check("later_shape", job, "builtins.RuntimeError", "must match the size of tensor b (4)")


def test_a_later_state_made_for_another_optimizer(job) -> None:
    kind = ft.tree.TreeMismatchError
    mismatch = f"{kind.__module__}.{kind.__qualname__}"
    _check("later_wrong_state", job, mismatch, "was not made by this step's optimizer")


@pytest.mark.parametrize("name", ["dp_first", "dp_later"])
def test_per_example_clip(job, name: str) -> None:
    _check(name, job, "builtins.IndexError", OOB)


@pytest.mark.parametrize("name", ["zero_first", "zero_later"])
def test_shard_optimizer(job, name: str) -> None:
    _check(name, job, "builtins.IndexError", OOB)


def test_grad_stats_with_an_accumulator(job) -> None:
    _check("stats_later", job, "builtins.IndexError", OOB)


@pytest.mark.parametrize("name", ["hook_first", "hook_later"])
def test_a_grad_stats_hook_that_raises(job, name: str) -> None:
    _check(name, job, "builtins.RuntimeError", w.HOOK_FAILURE)


def test_healthy_calls_add_no_collective(job) -> None:
    for r in gloo_jobs.probe_results(job, "collectives"):
        for name, gathers in (("checked", 2), ("unchecked", 1)):
            calls = r[name]["healthy"]
            # First call: the checks' object exchanges (ranks and noise keys), which carry a
            # failure too; without check_ranks one exchange of its own. Then two all-reduces
            # (the counts with the ranks' flags, one gradient bucket), as before.
            assert Counter(calls[0]) == Counter(all_gather_object=gathers, all_reduce=2), calls
            for later in calls[1:]:
                assert later == ["all_reduce", "all_reduce"], calls
            # A failing later call: the same collectives, then one exchange of the errors.
            assert r[name]["failing"] == ["all_reduce", "all_reduce", "all_gather_object"]
            assert r[name]["raised"] is not None


def test_where_the_flags_are_not_read_on_the_host_the_failing_rank_raises_alone(job) -> None:
    # Device tensors (NCCL), simulated: no host read of the flags, so a later failure cannot
    # be told to the others; it raises at once on its rank, and the others give up at the
    # group's timeout (5 s here) with a DistributedStepError, as for a rank that hangs.
    r0, r1 = gloo_jobs.probe_results(job, "device_flags")
    assert r1["raised"]["type"] == "builtins.IndexError", r1
    assert not r1["raised"]["notes"], r1  # nobody was told
    assert r1["seconds"] < PROMPT
    assert r0["raised"]["type"] == DSE, r0
    assert "all-reduce" in r0["raised"]["message"], r0  # it waited in the step's collectives
    assert r0["seconds"] >= w.SHORT_TIMEOUT - 0.5, r0  # until the group's timeout


def test_world_size_one_raises_the_error_itself_and_leaves_the_state_usable() -> None:
    step = dist.make_data_parallel_train_step(w.loss_fn, ft.adam(0.05), micro_batches=2)
    state = step.init_state(w.params())
    good = w.global_batch(0)
    with pytest.raises(IndexError, match=OOB):
        step(state, w.with_bad_id(good))
    new, _ = step(state, good)  # donate=True: the failed call did not consume it
    fresh = dist.make_data_parallel_train_step(w.loss_fn, ft.adam(0.05), micro_batches=2)
    want, _ = fresh(fresh.init_state(w.params()), good)
    assert w.state_digest(new) == w.state_digest(want)
    # And that is the single-process step's (to rounding: sums and counts, not means).
    single = ft.make_train_step(w.loss_fn, ft.adam(0.05), micro_batches=2)
    ref, _ = single(ft.TrainState.create(params=w.params(), tx=ft.adam(0.05)), good)
    for a, b in zip(ft.tree.leaves(new.params), ft.tree.leaves(ref.params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
