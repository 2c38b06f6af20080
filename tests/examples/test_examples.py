"""The examples run as scripts, learn something, and leave TensorBoard runs TensorBoard reads."""

import os
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STORE_EVERYTHING = {"scalars": 0, "histograms": 0, "tensors": 0, "compressedHistograms": 0}
DEFAULT_TAGS = {
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/update_param_ratio",
    "perf/step_time_s",
    "perf/examples_per_s",
    "eval/loss",
}


def run_example(name, *args, timeout=300):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def load_run(path):
    acc = EventAccumulator(os.fspath(path), size_guidance=STORE_EVERYTHING)
    acc.Reload()
    return acc


def values(acc, tag):
    return [e.value for e in acc.Scalars(tag)]


def test_digits_fast(tmp_path):
    proc = run_example("digits.py", "--fast", "--logdir", tmp_path)
    assert f"TensorBoard logs: {tmp_path}" in proc.stdout
    assert "tensorboard --logdir" in proc.stdout
    assert "step 33/33 (100%)" in proc.stderr  # the progress lines (not a terminal here)
    acc = load_run(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert DEFAULT_TAGS | {"train/accuracy", "eval/accuracy"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 34))
    loss = values(acc, "train/loss")
    assert sum(loss[-5:]) / 5 < 0.5 * loss[0]  # learned something
    assert values(acc, "eval/accuracy")[-1] > 0.6
    # Hyperparameters live in the same run as the curves.
    assert "_hparams_/session_start_info" in acc.summary_metadata


def test_char_lm_fast(tmp_path):
    proc = run_example("char_lm.py", "--fast", "--logdir", tmp_path, "--no-progress")
    assert "sample:\nReturn the " in proc.stdout
    acc = load_run(tmp_path)
    assert DEFAULT_TAGS | {"perf/tokens_per_s"} <= set(acc.Tags()["scalars"])
    loss = values(acc, "train/loss")
    assert loss[0] == pytest.approx(4.57, abs=0.3)  # ~log(vocabulary): a uniform guess
    assert sum(loss[-5:]) / 5 < loss[0] - 0.8
    assert values(acc, "eval/loss")[-1] < values(acc, "eval/loss")[0]
    assert all(v > 0 for v in values(acc, "perf/tokens_per_s"))
    assert "sample" in acc.Tags()["tensors"]  # the text sample


def test_accumulation_study_fast(tmp_path):
    png = tmp_path / "curves.png"
    proc = run_example("accumulation_study.py", "--fast", "--logdir", tmp_path, "--png", png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "accumulation == the K×B batch" in proc.stdout
    for opt in ("sgd", "adam"):
        runs = {
            name: load_run(tmp_path / opt / name)
            for name in ("B", "KB-accum", "KB-direct", "KB-accum-lin", "KB-accum-sqrt")
        }
        curves = {name: values(acc, "eval/train_set_loss") for name, acc in runs.items()}
        # x-axis: examples seen, the same points for every run.
        steps = [e.step for e in runs["B"].Scalars("eval/train_set_loss")]
        assert steps == [e.step for e in runs["KB-accum"].Scalars("eval/train_set_loss")]
        assert steps[:2] == [128, 256]
        assert curves["KB-accum"] == pytest.approx(curves["KB-direct"], rel=1e-5)
        assert curves["B"][-1] < curves["B"][0]
        # With the same lr the K×B batch takes 4x fewer steps and lags; linear scaling helps.
        assert curves["KB-accum-lin"][-1] < curves["KB-accum"][-1]
        assert DEFAULT_TAGS - {"eval/loss"} <= set(runs["B"].Tags()["scalars"])
