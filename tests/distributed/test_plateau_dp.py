"""``reduce_on_plateau`` in the data-parallel step: every rank's update reads the global mean
loss as ``value=``, so the plateau state equals single-process ``make_train_step`` on the
concatenated batch, eagerly and compiled."""

from __future__ import annotations

import _plateau_worker as worker
import gloo_jobs
import pytest

import functrain as ft


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results."""
    return gloo_jobs.run_job(
        "_plateau_worker.py", 2, tmp_path_factory.mktemp("plateau"), timeout=120
    )


def test_plateau_state_equals_the_single_process_step(job: list[dict]) -> None:
    step = ft.make_train_step(worker.loss, worker.tx())
    state = ft.TrainState.create(params=worker.params(), tx=worker.tx())
    for _ in range(worker.STEPS):
        state, _ = step(state, worker.batch())
    want = worker._plateau(state)
    assert want["scale"] < 1.0  # the loss plateaued: the schedule acted
    for rank in job:
        assert "error" not in rank, rank.get("error")
        for variant in ("eager", "compiled"):
            got = rank[variant]
            assert got["count"] == want["count"] and got["plateau_count"] == want["plateau_count"]
            assert got["scale"] == want["scale"], (variant, got, want)
            assert abs(got["best_value"] - want["best_value"]) <= 1e-12 * abs(want["best_value"])
