"""A review of ``make_data_parallel_train_step(..., compile=...)`` beyond the first tests.

A 2-rank gloo job (``_dp_compile_review_worker.py``) runs the compiled data-parallel step beside
the eager one with the same options: buffers (synced and not, kept on a skipped step), a
``LossSum`` loss and aux with unequal token counts per rank (also against the single-process
step on the concatenated batch), ``strategy="vmap"`` with ``norm_metrics=False``,
``fused=False`` and ``donate=False``, ``nonfinite="ignore"``, a loss scale that overflows on one
rank, dropout seeded from the key, an empty share and a shape change (compilations counted), and
``check_ranks``. World size 1 runs in this process: a real ``nn.BatchNorm1d`` model (an integer
buffer), ``donate=False``, the skip limit and errors raised by the optimizer. Float64: the
compiled step differs from the references by rounding only.
"""

from __future__ import annotations

from pathlib import Path

import _dp_compile_review_worker as w
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
    out: Path = tmp_path_factory.mktemp("dp_compile_review")
    results = gloo_jobs.run_job("_dp_compile_review_worker.py", 2, out, timeout=240)
    assert [r["exit"] for r in results] == [0, 0], [r["stderr"][-2000:] for r in results]
    return results


def _same_as_eager(r: dict, compiles: int = 2) -> None:
    assert r["eager"] < TIGHT
    assert r["metrics"] < TIGHT
    assert r["same_keys"]
    assert r["compiles"] == compiles, r["reasons"]


def test_buffers_synced_or_not_and_kept_on_a_skipped_step(job: list[dict]) -> None:
    for r in gloo_jobs.probe_results(job, "buffers"):
        for sync in ("broadcast", "none"):
            _same_as_eager(r[sync])
            assert r[sync]["skipped"] == [0, 0, 0, 1, 0, 0]


def test_loss_sum_with_unequal_token_counts_and_aux(job: list[dict]) -> None:
    for r in gloo_jobs.probe_results(job, "loss_sum"):
        _same_as_eager(r)
        assert r["single"] < TIGHT


def test_vmap_ignore_and_a_loss_scale_overflowing_on_one_rank(job: list[dict]) -> None:
    for r in gloo_jobs.probe_results(job, "options"):
        _same_as_eager(r["vmap"])
        _same_as_eager(r["ignore"])
        _same_as_eager(r["scale"])
        assert r["scale"]["skipped"] == [0, 0, 1, 0, 0]


def test_dropout_is_seeded_from_the_key_and_reproducible(job: list[dict]) -> None:
    for r in gloo_jobs.probe_results(job, "dropout"):
        _same_as_eager(r)
        assert r["repro"] == 0.0


def test_an_empty_share_and_a_new_shape_compile_the_gradient_graph_once_each(job) -> None:
    for r in gloo_jobs.probe_results(job, "shapes"):
        # 2 + the stand-in batch (rank 0's empty share; rank 1's 8 rows) + the new shape
        _same_as_eager(r, compiles=4)
        assert all("_grad_core" in reason for reason in r["reasons"])


def test_check_ranks_still_raises_on_a_mismatch(job: list[dict]) -> None:
    for r in gloo_jobs.probe_results(job, "check_ranks"):
        assert r == {"eager": "RankMismatchError", "compiled": "RankMismatchError"}


def _bn_model() -> tuple:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
    ).double()
    return ft.functionalize(net)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_world_size_one_batch_norm_module_matches_make_train_step(micro_batches: int) -> None:
    model, params, buffers = _bn_model()

    def loss_fn(p, b, buffers):
        out, new = model.apply(p, buffers, b["x"])
        return ft.LossOutput((out.squeeze(-1) - b["y"]).square().mean(), buffers=new)

    tx = ft.sgd(0.05)
    step = dist.make_data_parallel_train_step(
        loss_fn, tx, compile=FAST, micro_batches=micro_batches
    )
    ref = ft.make_train_step(loss_fn, tx, micro_batches=micro_batches)
    state = step.init_state(params, buffers=buffers)
    expected = ft.TrainState.create(params=params, tx=tx, buffers=buffers)
    batches = [w.batch_at(i) for i in range(5)]
    batches[2]["y"][0] = float("nan")  # skipped: num_batches_tracked and the stats are kept
    with testing.assert_max_compiles(2):
        for b in batches:
            state, metrics = step(state, b)
            expected, ref_metrics = ref(expected, b)
            assert gloo_jobs.gap(metrics, ref_metrics) < TIGHT
    assert gloo_jobs.gap((state.params, state.buffers), (expected.params, expected.buffers)) < TIGHT
    assert int(state.buffers["1.num_batches_tracked"]) == 4 * micro_batches


def test_world_size_one_donate_false_leaves_the_input_state_usable() -> None:
    step = dist.make_data_parallel_train_step(w.mse, ft.adam(0.1), compile=FAST, donate=False)
    state = step.init_state(w.params())
    before = {k: v.clone() for k, v in state.params.items()}
    first, _ = step(state, w.batch_at(0))
    again, _ = step(state, w.batch_at(0))
    assert gloo_jobs.gap(state.params, before) == 0.0
    assert gloo_jobs.gap(first.params, again.params) == 0.0


def test_world_size_one_skip_limit_raises_from_the_right_call() -> None:
    kw = {"max_consecutive_skips": 2, "donate": False}
    step = dist.make_data_parallel_train_step(w.mse, ft.sgd(0.1), compile=FAST, **kw)
    state = step.init_state(w.params())
    for i in range(3):  # three skipped steps; the third call's counter reaches 3
        b = w.batch_at(i)
        b["y"][-1] = float("nan")
        state, metrics = step(state, b)
        assert int(metrics["skipped"]) == 1
    with pytest.raises(ft.NonFiniteError, match="max_consecutive_skips=2"):
        step(state, w.batch_at(3))
    assert gloo_jobs.gap(state.params, w.params()) == 0.0  # intact: the skips wrote nothing
    assert int(state.step) == 3


def test_world_size_one_an_optimizer_error_is_the_real_one() -> None:
    def update(grads, state, params=None):
        raise ValueError("my update error")

    tx = ft.GradientTransformation(lambda p: (), update)
    step = dist.make_data_parallel_train_step(w.mse, tx, compile=FAST)
    state = step.init_state(w.params())
    with pytest.raises(ValueError, match="my update error"):
        step(state, w.batch_at(0))
    assert gloo_jobs.gap(state.params, w.params()) == 0.0  # not consumed, unchanged
