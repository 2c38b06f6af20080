"""Third review: a user watching a run in TensorBoard while it trains.

TensorBoard's own readers (``EventAccumulator``, the raw event loader, the HParams protos) are the
reference for what is on disk; expected values are worked out by hand.
"""

import io
import itertools
import math
import os
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tb_helpers import load_run, scalars
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.plugins.hparams import plugin_data_pb2

from functrain.logging import (
    AsyncWriter,
    ConsoleWriter,
    MetricWriter,
    MultiWriter,
    TensorBoardWriter,
)
from functrain.logging.tensorboard import _histogram


def _histograms(path):
    """The raw ``HistogramProto`` of each tag (TensorBoard's readers round them to float32)."""
    out = {}
    for file in sorted(path.glob("*tfevents*")):
        for data in RawEventFileLoader(str(file)).Load():
            event = Event.FromString(data)
            for value in event.summary.value:
                if value.HasField("histo"):
                    out[value.tag] = (event.step, value.histo)
    return out


def _counts_by_hand(values, lo, limits):
    """Values in ``[left, right)`` per bucket, the last bucket closed, as TensorBoard reads it."""
    counts, left = [], lo
    for i, right in enumerate(limits):
        last = i == len(limits) - 1
        counts.append(sum(1 for v in values if left <= v and (v < right or (last and v <= right))))
        left = right
    return counts


def test_histogram_of_a_float64_parameter_that_moved_by_one_ulp(tmp_path):
    # A float64 weight initialised to ones after a step with a tiny gradient: NumPy refused to
    # cut a span of 2.2e-16 into 64 bins, and the whole write_histograms call raised.
    one_up = math.nextafter(1.0, 2.0)
    weights = torch.tensor([1.0, one_up, 1.0, 1.0], dtype=torch.float64)
    tiny = np.array([0.0, 5e-324, 5e-324])  # zero and the smallest subnormal
    with TensorBoardWriter(tmp_path) as writer:
        writer.write_histograms(3, {"params/w": weights, "tiny": tiny})
    hists = _histograms(tmp_path)
    step, hist = hists["params/w"]
    assert (step, hist.min, hist.max, hist.num) == (3, 1.0, one_up, 4)
    assert list(hist.bucket_limit) == [one_up]
    assert list(hist.bucket) == [4]
    _, hist = hists["tiny"]
    assert (hist.min, hist.max, list(hist.bucket_limit), list(hist.bucket)) == (
        0.0,
        5e-324,
        [5e-324],
        [3],
    )


_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=200, deadline=None)
@given(
    center=_finite,
    ulps=st.lists(st.integers(0, 200), min_size=1, max_size=30),
    bins=st.integers(1, 80),
)
def test_histogram_buckets_cover_every_value_of_a_narrow_span(center, ulps, bins):
    values = [center]
    for n in ulps:  # values a few ulps above center
        v = center
        for _ in range(n):
            v = math.nextafter(v, math.inf)
        if math.isfinite(v):
            values.append(v)
    hist = _histogram(np.array(values), bins)
    limits = hist["bucket_limits"]
    assert hist["min"] == min(values) and hist["max"] == max(values) == limits[-1]
    assert hist["num"] == len(values) == sum(hist["bucket_counts"])
    assert all(a < b for a, b in itertools.pairwise(limits))
    assert 1 <= len(limits) <= bins
    assert hist["bucket_counts"] == _counts_by_hand(values, hist["min"], limits)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(_finite, min_size=1, max_size=40), bins=st.integers(1, 80))
def test_histogram_buckets_cover_any_finite_values(values, bins):
    hist = _histogram(np.array(values), bins)
    limits = hist["bucket_limits"]
    assert hist["min"] == min(values) and hist["max"] == max(values) == limits[-1]
    assert hist["num"] == len(values) == sum(hist["bucket_counts"])
    assert all(a < b for a, b in itertools.pairwise(limits))
    assert hist["bucket_counts"] == _counts_by_hand(values, hist["min"], limits)


def _hparams(acc):
    contents = acc.PluginTagToContent("hparams")
    return {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in contents.items()
    }


@pytest.mark.parametrize("host_inline", [True, False])
def test_async_hparams_take_multi_element_tensors_and_snapshot_arrays(tmp_path, host_inline):
    # TensorBoardWriter shows betas=torch.tensor([...]) as text; through an AsyncWriter the same
    # call raised "must have exactly one element". NumPy arrays were kept by reference.
    betas = torch.tensor([0.5, 0.25])
    arr = np.array([1.0, 2.0])
    one = np.array([0.5])
    writer = AsyncWriter(TensorBoardWriter(tmp_path), host_inline=host_inline)
    writer.write_hparams({"betas": betas, "arr": arr, "one": one, "lr": torch.tensor(0.125)})
    betas.fill_(9.0)  # the caller reuses its buffers before the write happens
    arr[0] = 9.0
    one[0] = 9.0
    writer.close()
    start = _hparams(load_run(tmp_path))["_hparams_/session_start_info"]
    hparams = start.session_start_info.hparams
    assert hparams["betas"].string_value == "[0.5, 0.25]"
    assert hparams["arr"].string_value == "[1.0, 2.0]"
    assert hparams["one"].number_value == 0.5
    assert hparams["lr"].number_value == 0.125


class ScalarsOnly(MetricWriter):
    """A writer with only ``write_scalars`` (a CSV file, say)."""

    def __init__(self):
        self.rows = []

    def write_scalars(self, step, scalars):
        self.rows.append((step, dict(scalars)))


def test_hparam_domains_pass_through_async_and_multi_writers(tmp_path):
    # The documented stack AsyncWriter(MultiWriter([...])): MultiWriter.write_hparams took no
    # keywords, so the background thread failed and close() raised a TypeError.
    csv = ScalarsOnly()
    out = io.StringIO()
    tensorboard = TensorBoardWriter(tmp_path)
    writer = AsyncWriter(MultiWriter([tensorboard, ConsoleWriter(stream=out, tty=False), csv]))
    writer.write_hparams(
        {"optimizer": "adam", "lr": 0.1},
        {"loss": None},
        hparam_domain_discrete={"optimizer": ["adam", "sgd"]},
    )
    writer.write_scalars(1, {"loss": 0.5})
    writer.close()
    experiment = _hparams(load_run(tmp_path))["_hparams_/experiment"].experiment
    [info] = [i for i in experiment.hparam_infos if i.name == "optimizer"]
    assert [v.string_value for v in info.domain_discrete.values] == ["adam", "sgd"]
    assert out.getvalue().startswith("hparams: optimizer=adam, lr=0.1\n")
    assert csv.rows == [(1, {"loss": 0.5})]


def _wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_events_reach_tensorboard_within_flush_secs_without_another_write(tmp_path):
    # The buffered event file flushed only when a later write came; the last steps before a
    # long evaluation (or a hang) stayed invisible in TensorBoard however long one waited.
    writer = TensorBoardWriter(tmp_path, flush_secs=0.2)
    try:
        for step in range(3):
            writer.write_scalars(step, {"loss": 1.0 / 2**step})
        seen = lambda: bool(load_run(tmp_path).Tags()["scalars"])  # noqa: E731
        assert _wait_for(lambda: seen() and len(scalars(load_run(tmp_path), "loss")) == 3)
        assert scalars(load_run(tmp_path), "loss") == [(0, 1.0), (1, 0.5), (2, 0.25)]
    finally:
        writer.close()


@pytest.mark.parametrize("host_inline", [True, False])
def test_async_writes_reach_tensorboard_when_no_further_call_comes(tmp_path, host_inline):
    # Buffered writes were handed over only by the next write call (or flush/close).
    writer = AsyncWriter(
        TensorBoardWriter(tmp_path, flush_secs=0.2),
        every_n=100,
        max_delay_s=0.2,
        host_inline=host_inline,
    )
    try:
        for step in range(3):
            writer.write_scalars(step, {"loss": torch.tensor(float(step))})
        seen = lambda: bool(load_run(tmp_path).Tags()["scalars"])  # noqa: E731
        assert _wait_for(lambda: seen() and len(scalars(load_run(tmp_path), "loss")) == 3)
        assert scalars(load_run(tmp_path), "loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    finally:
        writer.close()


class SlowRecorder(MetricWriter):
    def __init__(self):
        self.steps = []

    def write_scalars(self, step, scalars):
        time.sleep(0.02)
        self.steps.append(step)


def test_idle_hand_over_keeps_the_order_of_steps():
    inner = SlowRecorder()
    writer = AsyncWriter(inner, every_n=3, max_delay_s=0.05, host_inline=False)
    for step in range(20):
        writer.write_scalars(step, {"x": float(step)})
        if step % 7 == 0:
            time.sleep(0.2)  # idle: the worker hands over what is buffered
    assert _wait_for(lambda: len(inner.steps) == 20)
    assert inner.steps == list(range(20))
    writer.close()


def test_console_shows_tensor_hparams_as_numbers():
    out = io.StringIO()
    with ConsoleWriter(stream=out, tty=False) as writer:
        writer.write_hparams(
            {
                "lr": torch.tensor(3e-5, dtype=torch.float64),
                "betas": torch.tensor([0.5, 0.25]),
                "amp": torch.tensor(True),
                "wd": torch.tensor([0.125], dtype=torch.bfloat16),
                "n": np.array([4]),
            }
        )
    assert out.getvalue() == "hparams: lr=3e-05, betas=[0.5, 0.25], amp=True, wd=0.125, n=4\n"


def test_event_files_of_one_process_sort_in_the_order_they_were_opened(tmp_path):
    # TensorBoard reads a run's files in name order; its writer number was not zero-padded, so
    # the 10th writer of a second sorted before the 9th and a resumed run's purge was read
    # before the steps it purges.
    from functrain.logging import TensorBoardWriter

    opened = []
    for i in range(12):
        with TensorBoardWriter(tmp_path, filename_suffix=".x") as w:
            w.write_scalars(i, {"i": float(i)})
        new = set(os.listdir(tmp_path)) - set(opened)
        assert len(new) == 1
        opened.append(new.pop())
    assert sorted(opened) == opened
    assert all(name.endswith(".x") and "tfevents" in name for name in opened)
