"""A ``compile=`` data-parallel step whose compiled region fails on one rank only.

A 2-rank gloo job (``_dp_compile_failure_worker.py``) makes rank 1's compiled regions fail: a
compiler backend that raises on the first call, a batch shape that dynamo cannot trace on a
later call (a recompilation on rank 1 alone), an update region whose first run raises. Every
rank must raise at once (rank 1 its own error, rank 0 a ``DistributedStepError`` naming rank 1
and that error), with no collective left behind, and the ranks must be able to go on from the
untouched state. The job's timeout is far below the group's (300 s): a rank left waiting in a
collective, as the step did before, fails the job. A probe counts collectives: the first call
exchanges two small objects more than the eager step, later calls none.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import _dp_compile_failure_worker as w
import gloo_jobs
import pytest
import torch

import functrain as ft
from functrain import distributed as dist

DSE = "functrain.distributed.errors.DistributedStepError"
PROMPT = 60.0  # seconds: compilation included, far below the group's timeout


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("dp_compile_failure")
    results = gloo_jobs.run_job("_dp_compile_failure_worker.py", 2, out, timeout=150)
    assert [r["exit"] for r in results] == [0, 0], [r["stderr"][-2000:] for r in results]
    return results


def _check_failure(r0: dict, r1: dict, rank1_type: str, text: str) -> None:
    """Rank 1 raised its own error (noted as seen by every rank), rank 0 a
    DistributedStepError naming rank 1 and that error's type and message; both promptly."""
    own, other = r1["raised"], r0["raised"]
    assert own is not None and other is not None, (r0, r1)
    assert own["type"] == rank1_type, own
    assert text in own["message"], own
    assert any("rank(s) [1]" in note for note in own["notes"]), own["notes"]
    assert other["type"] == DSE, other
    assert "rank(s) [1]" in other["message"], other
    assert rank1_type.rsplit(".", 1)[-1] in other["message"], other
    assert text in other["message"], other
    assert r0["seconds"] < PROMPT and r1["seconds"] < PROMPT, (r0["seconds"], r1["seconds"])


def test_a_first_call_compile_failure_on_one_rank_raises_on_every_rank(job) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "first_call")
    _check_failure(r0, r1, "torch._dynamo.exc.BackendCompilerFailed", w.NO_COMPILER)
    assert r0["in_step"] == r1["in_step"] == 3.0  # no collective left behind


def test_a_later_recompile_failure_on_one_rank_raises_on_every_rank(job) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "later_shape")
    _check_failure(r0["failure"], r1["failure"], "torch._dynamo.exc.Unsupported", "graph_break")
    assert r0["in_step"] == r1["in_step"] == 3.0
    # The failed call wrote nothing: the ranks go on as an eager step that skipped that batch.
    for r in (r0, r1):
        assert r["eager"] < 1e-12
    assert r0["digest"] == r1["digest"]


def test_an_update_region_failing_on_one_rank_raises_on_every_rank(job) -> None:
    r0, r1 = gloo_jobs.probe_results(job, "update_first")
    _check_failure(r0, r1, "builtins.RuntimeError", w.UPDATE_OOM)
    assert r0["in_step"] == r1["in_step"] == 3.0
    for r in (r0, r1):  # the state given to the failed call was neither consumed nor written
        assert r["eager"] < 1e-12
    assert r0["digest"] == r1["digest"]


def test_only_the_first_call_adds_collectives(job) -> None:
    for r in gloo_jobs.probe_results(job, "collectives"):
        compiled, eager = r["compiled"], r["eager"]
        # One small object all-gather before the step's collectives (the gradient region)
        # and one after them (the update region), on the first call only.
        extra = Counter(compiled[0]) - Counter(eager[0])
        assert extra == Counter({"all_gather_object": 2}), (compiled[0], eager[0])
        assert Counter(eager[0]) - Counter(compiled[0]) == Counter()
        assert compiled[1:] == eager[1:], (compiled, eager)


def test_world_size_one_raises_the_compile_error_itself() -> None:
    step = dist.make_data_parallel_train_step(
        w.loss_fn, ft.adam(0.05), compile={"backend": w.broken_backend}
    )
    state = step.init_state(w.params())
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="no C\\+\\+ compiler"):
        step(state, w.batch_at(0, 4))
