"""Exact resume: 2N steps equal N steps, a checkpoint, a new process and N more, bit for bit."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functrain as ft
from functrain import checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")


def assert_bitwise_equal(a, b):
    """Exact equality that also tells ``-0.0`` from ``0.0``."""
    ft.testing.assert_trees_all_equal(a, b, bitwise=True)


def _worker():
    spec = importlib.util.spec_from_file_location("functrain_resume_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _worker()
N = worker.N


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two fresh processes: the first N steps, then restore + N more steps."""
    out = tmp_path_factory.mktemp("resume")
    for phase in ("first", "second"):
        proc = subprocess.run(
            [sys.executable, str(WORKER), phase, str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("config", worker.CONFIGS)
def test_2n_steps_equal_n_steps_then_n_more_in_a_fresh_process(runs, config):
    step, state = worker.build(config)
    ref, ref_metrics = worker.run(config, state, step, 0, 2 * N)

    _, target = worker.build(config)
    middle = checkpoint.restore(runs / f"{config}_{N}.safetensors", target=target)
    assert int(middle.step) == N
    _, target = worker.build(config)
    resumed = checkpoint.restore(runs / f"{config}_{2 * N}.safetensors", target=target)
    # params, buffers, optimizer state (counts, moments, injected lr), key, fault states
    assert_bitwise_equal(resumed, ref)
    metrics = checkpoint.restore(runs / f"{config}_metrics_first.safetensors")
    metrics += checkpoint.restore(runs / f"{config}_metrics_second.safetensors")
    assert_bitwise_equal(metrics, ref_metrics)

    if config == "faults":  # the run did exercise the fault paths on both sides of the restart
        skipped = [int(m["skipped"]) for m in ref_metrics]
        scales = [float(m["loss_scale"]) for m in ref_metrics]
        assert skipped[4] == skipped[9] == 1  # the NaN batches
        assert sum(skipped[:N]) > 1 and sum(skipped[N:]) >= 1
        assert len(set(scales[N:])) > 1
        assert int(resumed.extra["nonfinite"].total) == sum(skipped)


def test_train_loop_resumes_bit_for_bit_in_a_fresh_process(runs):
    step, state, batches = worker.loop_setup()
    ref = ft.train_loop(step, state, batches, epochs=5, max_steps=2 * N)

    manager = checkpoint.CheckpointManager(runs / "loop")
    assert manager.all_steps() == [N, 2 * N]
    _, target, _ = worker.loop_setup()
    assert_bitwise_equal(manager.restore(2 * N, target=target), ref.state)
    first = checkpoint.restore(runs / "loop_history_first.safetensors")
    second = checkpoint.restore(runs / "loop_history_second.safetensors")
    tags = [t for t in ref.history.tags() if t.startswith("train/")]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/mae"} <= set(tags)
    assert sorted(first) == sorted(second) == sorted(tags)
    for tag in tags:  # metrics logged as host floats: equal floats are equal bits
        steps = first[tag][0] + second[tag][0]
        values = first[tag][1] + second[tag][1]
        assert steps == ref.history.steps(tag) == list(range(1, 2 * N + 1)), tag
        assert values == ref.history.values(tag), tag


def test_a_restore_target_without_the_steps_extra_entries_is_named(runs):
    step, _ = worker.build("faults")
    torch.manual_seed(0)
    _, prepared = worker.build("faults")
    bare = prepared.replace(extra={})
    with pytest.raises(
        checkpoint.CheckpointMismatchError, match=r"\['extra'\]\['(loss_scale|nonfinite)'\]"
    ):
        checkpoint.restore(runs / f"faults_{N}.safetensors", target=bare)
    restored = checkpoint.restore(runs / f"faults_{N}.safetensors", target=step.prepare(bare))
    assert sorted(restored.extra) == ["loss_scale", "nonfinite"]
