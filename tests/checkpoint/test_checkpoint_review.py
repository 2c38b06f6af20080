"""Adversarial review: inputs a demanding user or a fuzzer gives save, restore and the manager."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from functrain import checkpoint
from functrain.checkpoint import _file
from functrain.testing import assert_trees_all_equal


def write_crafted(path: Any, description: Any) -> None:
    """A tensor-less functrain file whose (consistent) header carries ``description``."""
    text = json.dumps(description)
    header = {
        "__metadata__": {
            "format": "functrain.checkpoint",
            "functrain": text,
            "functrain_sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)


def test_plain_safetensors_with_format_metadata_restores(tmp_path: Any) -> None:
    # safetensors.torch.save_model and Hugging Face's save_pretrained stamp {"format": "pt"}.
    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.bfloat16)}
    save_file(tensors, path, metadata={"format": "pt"})
    assert_trees_all_equal(checkpoint.restore(path), tensors)
    assert checkpoint.read_metadata(path) == {}


def test_corrupt_functrain_marker_still_refused(tmp_path: Any) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(1)}, path, metadata={"format": "functrain.checkpoint"})
    with pytest.raises(checkpoint.InvalidCheckpointError, match="checksum"):
        checkpoint.restore(path)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_tensor_leaf_is_a_clear_type_error(tmp_path: Any, layout: torch.layout) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the strided layout is a "prototype" and says so
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=layout)
    with pytest.raises(TypeError, match=r"cannot checkpoint state\['n'\]: only dense"):
        checkpoint.save(tmp_path / "n.safetensors", {"n": nested})
    assert not os.listdir(tmp_path)


def test_too_deep_tree_is_refused_at_save_not_at_restore(tmp_path: Any) -> None:
    # Deep enough that the JSON description used to save fine and then fail to parse on load.
    deep: Any = torch.ones(1)
    for _ in range(495):
        deep = {"k": deep}
    path = tmp_path / "deep.safetensors"
    checkpoint.save(path, {"ok": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"state\['k'\]\['k'\].*deeper than"):
        checkpoint.save(path, deep)
    assert_trees_all_equal(checkpoint.restore(path), {"ok": torch.zeros(1)})  # not replaced
    shallow: Any = torch.ones(1)
    for _ in range(100):
        shallow = {"k": shallow}
    checkpoint.save(path, shallow)
    assert_trees_all_equal(checkpoint.restore(path, target=shallow), shallow)


def test_cyclic_tree_is_a_clear_type_error(tmp_path: Any) -> None:
    cyclic: list[Any] = [torch.ones(1)]
    cyclic.append(cyclic)
    with pytest.raises(TypeError, match=r"state\[1\]\[1\].*deeper than"):
        checkpoint.save(tmp_path / "c.safetensors", cyclic)


def test_mismatch_message_uses_an_before_vowel_dtypes(tmp_path: Any) -> None:
    path = tmp_path / "s.safetensors"
    checkpoint.save(path, {"step": torch.tensor(5)})
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        checkpoint.restore(path, target={"step": 0})
    assert (
        str(info.value) == "checkpoint['step'] is an int64 tensor of shape () but target has an int"
    )


def test_reader_manager_does_not_delete_a_save_in_flight(tmp_path: Any, monkeypatch) -> None:
    # "Any number may read": an evaluator opening a manager on the directory while the trainer
    # saves must not remove the trainer's temporary file from under it.
    writer = checkpoint.CheckpointManager(tmp_path)
    started, release = threading.Event(), threading.Event()
    host_bytes = _file.host_bytes

    def slow_host_bytes(t: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(10)
        return host_bytes(t)

    monkeypatch.setattr(_file, "host_bytes", slow_host_bytes)
    outcome: dict[str, Any] = {}

    def save() -> None:
        try:
            outcome["path"] = writer.save(1, {"w": torch.ones(2)})
        except Exception as err:  # reported below
            outcome["error"] = err

    thread = threading.Thread(target=save)
    thread.start()
    assert started.wait(10)
    try:
        checkpoint.CheckpointManager(tmp_path)
    finally:
        release.set()
        thread.join()
    assert "error" not in outcome, outcome.get("error")
    assert_trees_all_equal(checkpoint.restore(outcome["path"]), {"w": torch.ones(2)})


def test_stale_temp_of_dead_process_is_still_removed(tmp_path: Any) -> None:
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: no such process
    stale = tmp_path / f".checkpoint_00000003.safetensors.{dead_pid}.0a1b2c3d.tmp"
    stale.write_bytes(b"partial")
    checkpoint.CheckpointManager(tmp_path)
    assert not stale.exists()


def test_numpy_step_and_metrics_are_accepted(tmp_path: Any) -> None:
    mgr = checkpoint.CheckpointManager(tmp_path, best_metric="loss")
    mgr.save(np.int64(3), {"w": torch.ones(1)}, metrics={"loss": np.float32(0.5)})
    assert mgr.all_steps() == [3] and mgr.metrics(3) == {"loss": 0.5}
    assert checkpoint.CheckpointManager(tmp_path).metrics(3) == {"loss": 0.5}
    with pytest.raises(ValueError, match="non-negative"):
        mgr.save(np.int64(-1), {"w": torch.ones(1)})


def test_foreign_file_name_with_matching_step_is_not_indexed(tmp_path: Any) -> None:
    # checkpoint_5.safetensors is not the manager's name for step 5 (checkpoint_00000005...):
    # indexing it made restore_latest look for a file that does not exist.
    checkpoint.save(
        tmp_path / "checkpoint_5.safetensors", {"w": torch.ones(1)}, metadata={"step": 5}
    )
    mgr = checkpoint.CheckpointManager(tmp_path)
    assert mgr.all_steps() == []
    mgr.save(2, {"w": torch.zeros(1)})
    assert mgr.restore_latest() == {"w": torch.zeros(1)} and mgr.restored_step == 2


@pytest.mark.parametrize("metadata", [[1], "x"], ids=["list", "str"])
def test_malformed_metadata_is_skipped_not_a_crash(tmp_path: Any, metadata: Any) -> None:
    write_crafted(
        tmp_path / "checkpoint_00000001.safetensors",
        {"version": 1, "metadata": metadata, "tree": {"kind": "none"}},
    )
    mgr = checkpoint.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [] and len(mgr.skipped) == 1


def test_malformed_metrics_read_as_none(tmp_path: Any) -> None:
    write_crafted(
        tmp_path / "checkpoint_00000001.safetensors",
        {"version": 1, "metadata": {"step": 1, "metrics": [1]}, "tree": {"kind": "none"}},
    )
    mgr = checkpoint.CheckpointManager(tmp_path)
    assert mgr.all_steps() == [1] and mgr.metrics(1) == {}
    assert mgr.restore_latest() is None


def test_saving_a_step_that_pruning_would_delete_at_once_is_refused(tmp_path):
    """After restoring an older checkpoint by hand, saving an older step with ``max_to_keep``
    used to write the file, prune it at once and return a path to nothing."""
    mgr = checkpoint.CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(10, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"step 3 would be deleted .*max_to_keep=1.*up to 10"):
        mgr.save(3, {"w": torch.zeros(2)})
    assert mgr.all_steps() == [10]
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(mgr.path(10))]
    torch.testing.assert_close(mgr.restore(10)["w"], torch.ones(2))
    # Kept when there is room, or when it ranks among the best.
    roomy = checkpoint.CheckpointManager(tmp_path / "roomy", max_to_keep=2)
    roomy.save(10, {"w": torch.ones(2)})
    assert os.path.exists(roomy.save(3, {"w": torch.zeros(2)}))
    best = checkpoint.CheckpointManager(
        tmp_path / "best", max_to_keep=1, best_metric="loss", keep_best=1
    )
    best.save(10, {"w": torch.ones(2)}, {"loss": 2.0})
    assert os.path.exists(best.save(3, {"w": torch.zeros(2)}, {"loss": 1.0}))
    assert best.all_steps() == [3, 10]
