"""Second review: the values this week's features put into metrics, written and read back.

TensorBoard's own ``EventAccumulator`` and HParams protos are the reference for what is on disk.
"""

import io
import math
import time

import numpy as np
import pytest
import torch
from tb_helpers import load_run, scalars
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from functrain.logging import ConsoleWriter, TensorBoardWriter, read_scalars, to_float


def _hparams_data(acc):
    contents = acc.PluginTagToContent("hparams")
    return {
        tag: plugin_data_pb2.HParamsPluginData.FromString(content)
        for tag, content in contents.items()
    }


def _f32(value):
    """What a TensorBoard scalar holds: ``simple_value`` is a float32."""
    return float(np.float32(value))


def test_low_precision_integer_and_non_finite_scalars_read_back(tmp_path):
    step = torch.tensor(2**40)  # beyond int32
    values = {
        "train/loss": torch.tensor(0.1, dtype=torch.bfloat16),
        "train/grad_norm": torch.tensor(0.1, dtype=torch.float16),
        "dp/skipped_total": torch.tensor(7, dtype=torch.int32),
        "dp/examples_total": torch.tensor(2**40 + 1, dtype=torch.int64),
        "noise_scale/b_simple": torch.tensor(float("nan")),
        "with space": math.inf,
        "ünïcode/日本": -math.inf,
        "flag": torch.tensor(True),
    }
    with TensorBoardWriter(tmp_path) as writer:
        writer.write_scalars(step, values)
    acc = load_run(tmp_path)
    read = read_scalars(tmp_path)["."]
    assert sorted(acc.Tags()["scalars"]) == sorted(values) == sorted(read)
    expected = {
        "train/loss": _f32(0.10009765625),  # bfloat16(0.1), exactly representable in float32
        "train/grad_norm": _f32(0.0999755859375),  # float16(0.1)
        "dp/skipped_total": 7.0,
        "dp/examples_total": _f32(2**40 + 1),
        "noise_scale/b_simple": math.nan,
        "with space": math.inf,
        "ünïcode/日本": -math.inf,
        "flag": 1.0,
    }
    for tag, want in expected.items():
        [(got_step, got)] = scalars(acc, tag)
        assert got_step == 2**40
        assert read[tag][0] == [2**40]
        for value in (got, read[tag][1][0]):
            assert value == want or (math.isnan(want) and math.isnan(value)), tag


@pytest.mark.parametrize(
    "value", [torch.tensor(1 + 2j), 1 + 2j, np.complex64(1 + 2j), np.array([1j])]
)
def test_complex_scalars_are_refused_naming_complex(tmp_path, value):
    with TensorBoardWriter(tmp_path) as writer:
        with pytest.raises(TypeError, match=r"'z' is complex"):
            writer.write_scalars(1, {"z": value})


@pytest.mark.parametrize("value", [np.bool_(True), np.array([True])])
def test_numpy_bools_are_scalars_like_bool_tensors(value):
    assert to_float(value) == to_float(torch.tensor(True)) == 1.0


def test_bool_hparams_are_bools_in_the_hparams_dashboard(tmp_path):
    hparams = {"amp": True, "clip": False, "tflag": torch.tensor(True), "lr": 0.1, "none": None}
    with TensorBoardWriter(tmp_path) as writer:
        writer.write_hparams(
            hparams,
            {"noise_scale/b_simple": None, "final": torch.tensor(0.25)},
            hparam_domain_discrete={"amp": [True, False]},
        )
    data = _hparams_data(load_run(tmp_path))
    infos = {info.name: info for info in data["_hparams_/experiment"].experiment.hparam_infos}
    assert set(infos) == {"amp", "clip", "tflag", "lr"}  # None is left out (documented)
    for name in ("amp", "clip", "tflag"):
        assert infos[name].type == api_pb2.DATA_TYPE_BOOL, name
    assert infos["lr"].type == api_pb2.DATA_TYPE_FLOAT64
    assert [v.WhichOneof("kind") for v in infos["amp"].domain_discrete.values] == [
        "bool_value",
        "bool_value",
    ]
    assert [v.bool_value for v in infos["amp"].domain_discrete.values] == [True, False]
    start = data["_hparams_/session_start_info"].session_start_info.hparams
    for name, want in (("amp", True), ("clip", False), ("tflag", True)):
        assert start[name].WhichOneof("kind") == "bool_value", name
        assert start[name].bool_value is want
    assert start["lr"].number_value == 0.1
    metrics = data["_hparams_/experiment"].experiment.metric_infos
    assert [m.name.tag for m in metrics] == ["noise_scale/b_simple", "final"]


def test_multi_element_and_complex_tensor_hparams_are_shown_as_text(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        writer.write_hparams(
            {"betas": torch.tensor([0.5, 0.25], dtype=torch.float64), "z": torch.tensor(1j)}
        )
    start = _hparams_data(load_run(tmp_path))["_hparams_/session_start_info"]
    hparams = start.session_start_info.hparams
    assert hparams["betas"].string_value == "[0.5, 0.25]"
    assert hparams["z"].string_value == "1j"


def test_resumed_run_without_purge_step_keeps_both_values_like_tensorboard(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        for step in range(4):
            writer.write_scalars(step, {"loss": float(step)})
    time.sleep(1.1)  # event file names sort by their whole-second timestamp first
    with TensorBoardWriter(tmp_path) as writer:  # restarted from step 2, no purge_step
        for step in range(2, 5):
            writer.write_scalars(step, {"loss": 10.0 + step})
    reference = scalars(load_run(tmp_path), "loss")
    assert reference == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (2, 12.0), (3, 13.0), (4, 14.0)]
    steps, values = read_scalars(tmp_path)["."]["loss"]
    assert list(zip(steps, values)) == reference


def _console_line(scalars_by_step, total=None):
    out = io.StringIO()
    with ConsoleWriter(total, stream=out, tty=False, line_every_s=0) as writer:
        for step, values in scalars_by_step:
            writer.write_scalars(step, values)
    return out.getvalue().splitlines()


def test_console_shows_integer_counters_with_every_digit():
    lines = _console_line(
        [
            (
                torch.tensor(2**40),
                {
                    "dp/skipped_total": torch.tensor(123456, dtype=torch.int64),
                    "count32": torch.tensor(98765, dtype=torch.int32),
                    "py": 1234567,
                    "np": np.int64(-55555),
                    "eval/total": torch.tensor(2**40 + 1),
                },
            )
        ]
    )
    assert lines[0] == "step 1099511627776 | eval/total=1099511627777"
    assert lines[1].endswith("dp/skipped_total=123456 count32=98765 py=1234567 np=-55555")


def test_console_formats_tiny_huge_and_non_finite_floats():
    lines = _console_line(
        [
            (
                1,
                {
                    "tiny": 1e-12,
                    "huge": torch.tensor(1.5e30),
                    "nan": torch.tensor(float("nan"), dtype=torch.bfloat16),
                    "ninf": -math.inf,
                    "examples_per_s": math.inf,
                },
            )
        ]
    )
    parts = lines[0].split(" | ")
    assert "inf ex/s" in parts  # not "infG ex/s"
    assert parts[-1] == "tiny=1e-12 huge=1.5e+30 nan=nan ninf=-inf examples_per_s=inf"


def test_console_hparams_line_keeps_integer_final_metrics():
    out = io.StringIO()
    with ConsoleWriter(stream=out, tty=False) as writer:
        writer.write_hparams({"lr": 0.1}, {"skipped_total": torch.tensor(123456), "acc": 0.5})
    assert out.getvalue() == "hparams: lr=0.1 | skipped_total=123456 acc=0.5\n"


def test_histogram_of_values_spanning_more_than_float64_range(tmp_path):
    values = np.array([-1e308, -0.9e308, 0.1e308, 1e308, 1e200])
    with TensorBoardWriter(tmp_path, histogram_bins=4) as writer:
        writer.write_histograms(1, {"h": values})
    # The raw events: TensorBoard's readers cast histograms to float32, which overflows here.
    [path] = tmp_path.glob("*tfevents*")
    events = [Event.FromString(data) for data in RawEventFileLoader(str(path)).Load()]
    [event] = [e for e in events if e.HasField("summary")]
    [value] = event.summary.value
    hist = value.histo
    assert (value.tag, event.step, hist.min, hist.max, hist.num) == ("h", 1, -1e308, 1e308, 5)
    # Bins of width 0.5e308 from -1e308, counted by hand.
    assert hist.bucket_limit == [-0.5e308, 0.0, 0.5e308, 1e308]
    assert hist.bucket == [2, 0, 2, 1]  # 0.1e308 and 1e200 share [0, 0.5e308)
    assert hist.sum_squares == math.inf  # 1e308**2 overflows, as float64 maths does
