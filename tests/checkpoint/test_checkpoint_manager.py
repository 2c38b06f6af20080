"""CheckpointManager: keep-last-N, keep-best, restart scan, corrupt and partial files."""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch

from functrain import checkpoint
from functrain.testing import assert_trees_all_equal


def state_for(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), float(step)), "count": torch.tensor(step, dtype=torch.int32)}


def files(directory: Any) -> list[str]:
    return sorted(os.listdir(directory))


def test_keeps_last_n(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=3)
    assert mgr.latest_step() is None and mgr.all_steps() == []
    for step in range(1, 7):
        mgr.save(step, state_for(step))
    assert mgr.all_steps() == [4, 5, 6] and mgr.latest_step() == 6
    assert files(tmp_path) == [f"checkpoint_{s:08d}.safetensors" for s in (4, 5, 6)]
    assert_trees_all_equal(mgr.restore_latest(target=state_for(0)), state_for(6))
    assert mgr.restored_step == 6
    assert_trees_all_equal(mgr.restore(5, target=state_for(0)), state_for(5))


def test_keep_all_and_overwrite_same_step(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=None)
    for step in range(5):
        mgr.save(step, state_for(step))
    mgr.save(2, state_for(20))
    assert mgr.all_steps() == [0, 1, 2, 3, 4]
    assert_trees_all_equal(mgr.restore(2, target=state_for(0)), state_for(20))


@pytest.mark.parametrize(
    ("mode", "keep_best", "expected_steps", "best"),
    [
        ("min", 1, [2, 5, 6], 2),  # losses: 1:.5 2:.1 3:.9 4:.3 5:.8 6:nan
        ("max", 1, [3, 5, 6], 3),
        ("min", 2, [2, 4, 5, 6], 2),
        ("max", 3, [1, 3, 5, 6], 3),
    ],
)
def test_keeps_best(
    tmp_path: Any, mode: str, keep_best: int, expected_steps: list[int], best: int
) -> None:
    losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.3, 5: 0.8, 6: float("nan")}
    mgr = checkpoint.CheckpointManager(
        tmp_path, max_to_keep=2, best_metric="loss", mode=mode, keep_best=keep_best
    )
    for step, loss in losses.items():
        mgr.save(step, state_for(step), metrics={"loss": torch.tensor(loss), "acc": 1})
    assert mgr.all_steps() == expected_steps
    assert mgr.best_step() == best
    assert mgr.metrics(best)["loss"] == pytest.approx(losses[best])
    assert mgr.metrics(6)["loss"] != mgr.metrics(6)["loss"]  # NaN recorded, never best
    # a restart reads the metrics back from the files and keeps the same choice
    again = checkpoint.CheckpointManager(
        tmp_path, max_to_keep=2, best_metric="loss", mode=mode, keep_best=keep_best
    )
    assert again.all_steps() == expected_steps and again.best_step() == best
    again.save(7, state_for(7), metrics={"loss": 0.2})
    assert best in again.all_steps() and again.all_steps()[-2:] == [6, 7]


def test_best_ties_prefer_newer_and_missing_metric_never_best(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=1, best_metric="loss")
    mgr.save(1, state_for(1), metrics={"loss": 0.5})
    mgr.save(2, state_for(2), metrics={"loss": 0.5})
    mgr.save(3, state_for(3))
    assert mgr.best_step() == 2 and mgr.all_steps() == [2, 3]


def test_restart_skips_corrupt_latest_and_logs(tmp_path: Any, caplog: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=5)
    for step in range(1, 4):
        mgr.save(step, state_for(step))
    with open(mgr.path(3), "r+b") as f:  # damage tensor data: only the checksum can tell
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(mgr.path(2), "r+b") as f:  # a file cut short, as a non-atomic writer would leave
        f.truncate(os.path.getsize(mgr.path(2)) // 2)
    restarted = checkpoint.CheckpointManager(tmp_path, max_to_keep=5)
    assert restarted.all_steps() == [1, 3]  # the truncated file fails the header scan
    with caplog.at_level(logging.WARNING, logger="functrain.checkpoint"):
        state = restarted.restore_latest(target=state_for(0))
    assert_trees_all_equal(state, state_for(1))
    assert restarted.restored_step == 1 and restarted.all_steps() == [1]
    assert [os.path.basename(p) for p, _ in restarted.skipped] == [
        "checkpoint_00000002.safetensors",
        "checkpoint_00000003.safetensors",
    ]
    assert "checksum mismatch" in restarted.skipped[1][1]
    assert "skipping invalid checkpoint" in caplog.text and "00000003" in caplog.text


def test_restart_removes_temporaries_and_ignores_foreign_files(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path)
    mgr.save(1, state_for(1))
    leftover = tmp_path / ".checkpoint_00000002.safetensors.4206649.abcd1234.tmp"
    leftover.write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "checkpoint_00000009.safetensors").write_bytes(b"\x80\x04garbage")
    restarted = checkpoint.CheckpointManager(tmp_path)
    assert not leftover.exists() and (tmp_path / "notes.txt").exists()
    assert restarted.all_steps() == [1] and len(restarted.skipped) == 1
    assert "pickle" in restarted.skipped[0][1]


def test_restore_latest_errors(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path)
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        mgr.restore_latest()
    mgr.save(1, state_for(1))
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"checkpoint\['w'\] has shape"):
        mgr.restore_latest(
            target={"w": torch.zeros(4), "count": torch.tensor(0, dtype=torch.int32)}
        )
    assert mgr.all_steps() == [1]  # a target mismatch is the caller's bug, not damage
    with pytest.raises(FileNotFoundError, match="step 7"):
        mgr.restore(7)


def test_save_arguments(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path)
    assert mgr.save(torch.tensor(4), state_for(4), metadata={"run": "a"}).endswith(
        "checkpoint_00000004.safetensors"
    )
    assert checkpoint.read_metadata(mgr.path(4))["user"] == {"run": "a"}
    with pytest.raises(ValueError, match="non-negative int"):
        mgr.save(-1, state_for(1))
    with pytest.raises(ValueError, match="metric 'loss' must be a scalar"):
        mgr.save(5, state_for(5), metrics={"loss": torch.ones(2)})
    with pytest.raises(TypeError, match="metric 'loss' must be a number"):
        mgr.save(5, state_for(5), metrics={"loss": "low"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_to_keep": 0}, "max_to_keep must be a positive int"),
        ({"mode": "best"}, "mode must be 'min' or 'max'"),
        ({"keep_best": 2}, "keep_best needs best_metric"),
        ({"best_metric": "loss", "keep_best": -1}, "keep_best must be a non-negative int"),
        ({"prefix": ".hidden"}, "prefix must be a plain file name prefix"),
    ],
)
def test_constructor_validation(tmp_path: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        checkpoint.CheckpointManager(tmp_path, **kwargs)
