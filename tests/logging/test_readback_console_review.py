"""Review tests for ``functrain.logging.readback``: tensor scalars, damaged files, purges."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from functrain.logging import TensorBoardWriter, read_scalars


def _summary_writer(logdir: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    tb = pytest.importorskip("torch.utils.tensorboard")
    return tb.SummaryWriter(str(logdir), **kwargs)


def _f32(values: list[float]) -> list[float]:
    # TensorBoard stores scalars as float32; the expected values are rounded the same way.
    return [float(np.float32(v)) for v in values]


def _only_file(run: Path) -> Path:
    (path,) = [p for p in run.iterdir() if "tfevents" in p.name]
    return path


def test_tensor_scalars_are_read(tmp_path: Path) -> None:
    # add_scalar(new_style=True) (and tf.summary.scalar) store scalars as tensors; the old
    # reader looked only at simple_value scalars and returned no run at all.
    w = _summary_writer(tmp_path / "new")
    for step in range(3):
        w.add_scalar("loss", 1.0 / (step + 1), step, new_style=True)
    w.add_histogram("weights", np.arange(4.0), 0)  # a tensor that is no scalar
    w.add_text("note", "hello", 0)
    w.close()
    got = read_scalars(tmp_path)
    assert got == {"new": {"loss": ([0, 1, 2], _f32([1.0, 0.5, 1.0 / 3.0]))}}


def test_legacy_and_tensor_scalars_agree(tmp_path: Path) -> None:
    for name, new_style in (("a", False), ("b", True)):
        w = _summary_writer(tmp_path / name)
        for step in (0, 5, 7):
            w.add_scalar("x", step * 0.1, step, new_style=new_style)
        w.close()
    got = read_scalars(tmp_path)
    expected = ([0, 5, 7], _f32([0.0, 0.5, 0.7000000000000001]))
    assert got == {"a": {"x": expected}, "b": {"x": expected}}


@pytest.mark.parametrize("cut", [1, 4, 9, 13])
def test_truncated_last_record_warns_and_keeps_earlier(tmp_path: Path, cut: int) -> None:
    with TensorBoardWriter(tmp_path) as w:
        for step in range(5):
            w.write_scalars(step, {"loss": float(step)})
    path = _only_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # a crash in the middle of writing step 4's record
    with pytest.warns(RuntimeWarning, match="truncated"):
        got = read_scalars(tmp_path)
    assert got == {".": {"loss": ([0, 1, 2, 3], [0.0, 1.0, 2.0, 3.0])}}


def test_torn_last_record_warns(tmp_path: Path) -> None:
    with TensorBoardWriter(tmp_path) as w:
        for step in range(3):
            w.write_scalars(step, {"loss": float(step)})
    path = _only_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # inside the last record's payload: its data CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupted last record"):
        got = read_scalars(tmp_path)
    assert got == {".": {"loss": ([0, 1], [0.0, 1.0])}}


def test_intact_files_do_not_warn(tmp_path: Path) -> None:
    # Warnings are errors in this suite, so any spurious warning fails here.
    with TensorBoardWriter(tmp_path / "ft") as w:
        w.write_scalars(0, {"a": 1.5})
    sw = _summary_writer(tmp_path / "torch")
    sw.add_scalar("a", 2.5, 3)
    sw.close()
    assert read_scalars(tmp_path) == {
        "ft": {"a": ([0], [1.5])},
        "torch": {"a": ([3], [2.5])},
    }


def test_purged_resume_reads_as_tensorboard_shows(tmp_path: Path) -> None:
    # Both writers: steps >= purge_step from the crashed run are gone, tensor scalars included.
    w = _summary_writer(tmp_path / "torch")
    for step in range(5):
        w.add_scalar("loss", float(step), step, new_style=True)
    w.close()
    time.sleep(1.05)  # event file names carry whole seconds: the resumed file sorts after
    w = _summary_writer(tmp_path / "torch", purge_step=3)
    for step in range(3, 6):
        w.add_scalar("loss", 10.0 + step, step, new_style=True)
    w.close()
    with TensorBoardWriter(tmp_path / "ft") as tw:
        for step in range(5):
            tw.write_scalars(step, {"loss": float(step)})
    with TensorBoardWriter(tmp_path / "ft", purge_step=2) as tw:
        for step in range(2, 4):
            tw.write_scalars(step, {"loss": 10.0 + step})
    got = read_scalars(tmp_path)
    assert got["torch"] == {"loss": ([0, 1, 2, 3, 4, 5], [0.0, 1.0, 2.0, 13.0, 14.0, 15.0])}
    assert got["ft"] == {"loss": ([0, 1, 2, 3], [0.0, 1.0, 12.0, 13.0])}
    assert sorted(os.listdir(tmp_path)) == ["ft", "torch"]
