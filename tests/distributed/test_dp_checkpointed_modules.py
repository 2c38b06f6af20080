"""The data-parallel step on a module that checkpoints activations inside its ``forward``.

``torch.utils.checkpoint(..., use_reentrant=False)`` recomputes during backward, after the
functional model's call put the module's own tensors back; the step reinstalls the call's
tensors for the recompute (``functrain.train._recompute``). Before that, every step after the
first took its gradients at the initial parameters, silently.

One 2-rank gloo job (``_dp_checkpoint_worker.py``), float64, three steps with unequal rank
batches (5 + 3, 2 + 6, 4 + 4): a checkpointed MLP (``checkpoint``, ``checkpoint_sequential``)
and a pre-LayerNorm transformer block (attention and MLP halves checkpointed), with
``micro_batches`` 1 and 2, ``noise_scale_hook(cosine=True)``, and ZeRO-1
(``shard_optimizer=True``); reference: the classic torch loop (``torch.optim`` SGD with
momentum, Adam) on a copy of the module over the global batch. Parameters, loss and
``grad_norm`` agree to rounding; the hook's metrics equal the single-process step's on the
same module without checkpointing, split into the ranks' micro-batches in rank order.
They take ``grad_backend='auto'`` (the default, as ``make_train_step``'s) or ``'autograd'``;
``'func'`` refuses the checkpoint by name.
"""

from __future__ import annotations

from pathlib import Path

import gloo_jobs
import pytest

TIGHT = 1e-12  # absolute, float64 values of order 1: the differences are rounding

MATCHED = [
    "mlp_k1",
    "mlp_k2",
    "mlp_sequential_k2",
    "mlp_auto_k2",
    "mlp_k2_cosine",
    "mlp_k2_zero",
    "block_k1",
    "block_k2",
    "block_k2_cosine",
    "block_k2_zero",
]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Runs the worker on 2 ranks once; each rank's results (with its exit code and stderr)."""
    out: Path = tmp_path_factory.mktemp("dp_checkpoint")
    return gloo_jobs.run_job("_dp_checkpoint_worker.py", 2, out, timeout=60)


def _check_matches_torch(ranks: list[dict]) -> None:
    for rank in ranks:
        assert rank["params"] < TIGHT, rank["params"]
        assert rank["loss"] < TIGHT and rank["grad_norm"] < TIGHT, rank
        # The reference moved far from the start: gradients taken at the initial parameters
        # (the recompute with the module's own tensors) could not pass.
        assert rank["moved"] > 1e-2, rank["moved"]
        assert rank["module_own"]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # equal on every rank, bit for bit


@pytest.mark.parametrize("name", MATCHED)
def test_checkpointed_module_follows_the_torch_loop_on_the_global_batch(
    job: list[dict], name: str
) -> None:
    _check_matches_torch(gloo_jobs.probe_results(job, name))


@pytest.mark.parametrize("name", ["mlp_k2_cosine", "block_k2_cosine"])
def test_cosine_hook_sees_the_uncheckpointed_micro_batch_gradients(
    job: list[dict], name: str
) -> None:
    ranks = gloo_jobs.probe_results(job, name)
    assert ranks[0]["hook_metrics"] == ranks[1]["hook_metrics"]
    for rank in ranks:
        got, want = rank["hook_metrics"], rank["hook_reference"]
        assert [sorted(m) for m in got] == [sorted(m) for m in want]
        assert "noise_scale/mean_cosine" in got[0]
        for g, w in zip(got, want, strict=True):
            for k in w:
                assert abs(g[k] - w[k]) <= TIGHT * max(1.0, abs(w[k])), (k, g[k], w[k])


def test_default_grad_backend_trains_a_checkpointed_module(job: list[dict]) -> None:
    _check_matches_torch(gloo_jobs.probe_results(job, "default_backend"))
