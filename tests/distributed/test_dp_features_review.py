"""Review of the data-parallel step's DP-SGD, noise under ZeRO-1 and grad_stats across ranks.

One 2-rank gloo job (``_dp_features_review_worker.py``), float64 unless named:

* ``grad_stats`` across ranks gathered its stats with ``all_gather_into_tensor``, deprecated in
  torch 2.13: a ``FutureWarning`` from every data-parallel step with a hook.
* Noise keys that differ between ranks (``noisy_sgd(seed=rank)``) were only checked for a
  DP-SGD step: with ``add_noise`` the ranks' parameters silently parted (under ZeRO-1 the 0-d
  parameter, which every rank updates whole with its own key).
* Regression guards (passing before too): a globally skipped DP step (a NaN on one rank)
  advances neither the noise key nor the momentum, replicated and sharded, with a tiny
  ``bucket_cap_mb`` and ``max_consecutive_skips``; sharded ``noisy_sgd`` with ``donate=False``
  and a skipped step; bfloat16 DP sums; a sharded DP run resumed through
  ``full_state``/``shard_state`` draws the noise of the uninterrupted run.

References: the single-process ``make_train_step`` on the concatenated batch (same noise key,
so the same noise), and bitwise equality of the ranks' parameters.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest

TIGHT = 1e-12  # float64 values of order 1: the differences are rounding, about 1e-16


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out: Path = tmp_path_factory.mktemp("dp_features_review")
    results = gloo_jobs.run_job("_dp_features_review_worker.py", 2, out, timeout=120)
    assert [r["exit"] for r in results] == [0, 0], [r["stderr"][-2000:] for r in results]
    return results


def probe(job: list[dict], name: str) -> list[dict]:
    """Both ranks' results of probe ``name``, which must have run without an exception."""
    out = []
    for rank, result in enumerate(job):
        value = result[name]
        assert "error" not in value, f"rank {rank}, {name}:\n{value['error']}"
        out.append(value)
    return out


def test_grad_stats_across_ranks_emits_no_warning(job: list[dict]) -> None:
    for rank in probe(job, "grad_stats_no_warning"):
        assert rank["params"] < TIGHT


@pytest.mark.parametrize("name", ["seeds_differ", "seeds_differ_zero"])
def test_noise_keys_that_differ_are_refused_on_every_rank(job: list[dict], name: str) -> None:
    assert [rank["refused"] for rank in probe(job, name)] == [True, True]


@pytest.mark.parametrize(
    ("name", "tol"),
    [
        ("dp_skip", TIGHT),
        ("dp_skip_zero_tiny_bucket", TIGHT),
        ("noise_zero_no_donate", TIGHT),
        ("dp_bf16", 1e-2),  # bfloat16: the ranks add partial sums, rounded in another order
    ],
)
def test_equals_the_single_process_step(job: list[dict], name: str, tol: float) -> None:
    ranks = probe(job, name)
    for rank in ranks:
        assert rank["params"] <= tol and rank["opt_state"] <= tol
    assert ranks[0]["digest"] == ranks[1]["digest"]
    if name != "dp_bf16":
        assert ranks[0]["skipped"] == [False, True, False]


def test_resumed_sharded_dp_run_draws_the_uninterrupted_noise(job: list[dict]) -> None:
    ranks = probe(job, "resume_dp_zero")
    assert [rank["params"] for rank in ranks] == [0.0, 0.0]
    assert ranks[0]["digest"] == ranks[1]["digest"]
