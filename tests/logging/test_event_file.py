import os
import random
import subprocess
import sys
import time

import pytest
import torch
from tb_helpers import load_run, scalars
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc

from functrain.logging import TensorBoardWriter, _event_file


def test_crc32c_matches_tensorboard_and_the_standard_check_value():
    assert _event_file.crc32c_python(b"123456789") == 0xE3069283  # CRC-32C check value
    assert _event_file.crc32c(b"123456789") == 0xE3069283
    rng = random.Random(0)
    for n in (0, 1, 7, 8, 155, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert _event_file.masked_crc32c(data) == tb_masked_crc(data)


def test_writer_continues_tensorboards_event_file(tmp_path):
    with TensorBoardWriter(tmp_path, purge_step=3) as w:
        assert w.fast_event_file
        w.write_scalars(3, {"loss": 1.0})
        # Anything written through the SummaryWriter lands in the same file, in order.
        w.summary_writer.add_scalar("raw", 2.0, 4)
        w.write_scalars(5, {"loss": 0.5})
    assert len(os.listdir(tmp_path)) == 1
    acc = load_run(tmp_path)
    assert scalars(acc, "loss") == [(3, 1.0), (5, 0.5)]
    assert scalars(acc, "raw") == [(4, 2.0)]


def test_falls_back_to_tensorboards_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(_event_file, "install", lambda summary_writer, flush_secs, suffix="": False)
    with TensorBoardWriter(tmp_path) as w:
        assert not w.fast_event_file
        w.write_scalars(0, {"loss": 1.0})
    assert scalars(load_run(tmp_path), "loss") == [(0, 1.0)]


@pytest.mark.parametrize("closed", [False, True])
def test_buffered_events_reach_the_file_at_exit(tmp_path, closed):
    code = (
        "import sys\n"
        "from functrain.logging import TensorBoardWriter\n"
        "w = TensorBoardWriter(sys.argv[1], flush_secs=1e9)\n"
        "w.write_scalars(7, {'loss': 0.25})\n"
        f"{'w.close()' if closed else ''}\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    assert scalars(load_run(tmp_path), "loss") == [(7, 0.25)]


def test_flush_makes_events_visible(tmp_path):
    w = TensorBoardWriter(tmp_path, flush_secs=1e9)
    w.write_scalars(0, {"loss": torch.tensor(1.0)})
    w.flush()
    assert scalars(load_run(tmp_path), "loss") == [(0, 1.0)]
    w.close()


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**40, -1, -(2**40)])
def test_scalar_event_encoding_matches_protobuf(step):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    tags = ["train/loss", "é/ünïcode", "x" * 200, "nan", "zero"]
    values = [0.1, -3.5e30, 1e-40, float("nan"), 0.0]
    data = _event_file.encode_scalar_event(step, tags, values)
    got = Event.FromString(data)
    expected = Event(
        wall_time=got.wall_time,
        step=step,
        summary=Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values)]),
    )
    # Same bytes as protobuf's own serializer, not just the same parsed message.
    assert data == expected.SerializeToString()
    assert abs(got.wall_time - time.time()) < 60


def test_scalar_values_beyond_float32_fall_back_to_protobuf(tmp_path):
    with pytest.raises(OverflowError):
        _event_file.encode_scalar_event(0, ["big"], [1e300])
    with TensorBoardWriter(tmp_path) as w:
        w.write_scalars(1, {"big": 1e300, "ok": 2.0})
    acc = load_run(tmp_path)
    assert scalars(acc, "big") == [(1, float("inf"))]
    assert scalars(acc, "ok") == [(1, 2.0)]
