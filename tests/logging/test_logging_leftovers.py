"""Leftovers: one step rule for every writer, and numbers beyond float range.

What is on disk is read back with TensorBoard's own ``EventAccumulator`` and HParams protos;
expected values are worked out by hand (float32 rounding done with NumPy).
"""

import io
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tb_helpers import load_run, scalars
from tensorboard.plugins.hparams import plugin_data_pb2

from functrain.logging import (
    AsyncWriter,
    ConsoleWriter,
    MetricWriter,
    MultiWriter,
    TensorBoardWriter,
    step_to_int,
    to_float,
)

BOOL_STEPS = [
    pytest.param(True, id="bool"),
    pytest.param(np.True_, id="np.bool_"),
    pytest.param(torch.tensor(True), id="bool-tensor-0d"),
    pytest.param(torch.tensor([False]), id="bool-tensor-1"),
]


class _Recorder(MetricWriter):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step_to_int(step)))

    def write_histograms(self, step, arrays):
        self.calls.append(("histograms", step_to_int(step)))

    def write_text(self, step, texts):
        self.calls.append(("text", step_to_int(step)))


def _writers(tmp_path):
    return {
        "tensorboard": lambda: TensorBoardWriter(tmp_path / "tb"),
        "async": lambda: AsyncWriter(_Recorder()),
        "async-tensorboard": lambda: AsyncWriter(TensorBoardWriter(tmp_path / "atb")),
        "multi": lambda: MultiWriter([TensorBoardWriter(tmp_path / "mtb"), _Recorder()]),
        "console": lambda: ConsoleWriter(stream=io.StringIO(), tty=False),
    }


@pytest.mark.parametrize("step", BOOL_STEPS)
def test_step_to_int_refuses_bools_naming_the_argument(step):
    with pytest.raises(TypeError, match=r"^step must be"):
        step_to_int(step)
    with pytest.raises(TypeError, match=r"^purge_step must be"):
        step_to_int(step, "purge_step")


@pytest.mark.parametrize("step", BOOL_STEPS)
@pytest.mark.parametrize("kind", ["tensorboard", "async", "async-tensorboard", "multi", "console"])
@pytest.mark.parametrize("method", ["scalars", "histograms", "text"])
def test_every_writer_refuses_a_bool_step_at_the_call(tmp_path, kind, method, step):
    if kind == "console" and method == "histograms":
        pytest.skip("ConsoleWriter ignores histograms")
    writer = _writers(tmp_path)[kind]()
    call = {
        "scalars": lambda: writer.write_scalars(step, {"loss": 1.0}),
        "histograms": lambda: writer.write_histograms(step, {"w": torch.ones(3)}),
        "text": lambda: writer.write_text(step, {"note": "x"}),
    }[method]
    # Old code: TensorBoardWriter wrote a bool tensor as step 1; AsyncWriter refused it for
    # scalars but let histograms/text through to fail later in the wrapped writer.
    with pytest.raises(TypeError, match=r"step must be"):
        call()
    writer.close()  # nothing bad was buffered: closing raises nothing


def test_purge_step_error_names_purge_step(tmp_path):
    with pytest.raises(TypeError, match=r"^purge_step must be"):
        TensorBoardWriter(tmp_path, purge_step=torch.tensor(True))


@pytest.mark.parametrize("kind", ["tensorboard", "async"])
def test_bool_hparams_step_is_refused(tmp_path, kind):
    writer = _writers(tmp_path)[kind]()
    with pytest.raises(TypeError, match=r"step must be"):
        writer.write_hparams({"lr": 0.1}, {"loss": 1.0}, step=torch.tensor(True))
    writer.close()


@given(st.integers(min_value=0, max_value=2**62), st.sampled_from([torch.int32, torch.int64]))
def test_integer_steps_still_accepted_alike(step, dtype):
    step = step % 2**31 if dtype == torch.int32 else step
    for value in (step, np.int64(step), torch.tensor(step, dtype=dtype)):
        assert step_to_int(value) == step
    recorder = _Recorder()
    with AsyncWriter(recorder) as writer:
        writer.write_scalars(torch.tensor(step, dtype=dtype), {"x": 1.0})
        writer.write_text(np.int64(step), {"t": "x"})
    assert recorder.calls == [("scalars", step), ("text", step)]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (10**400, math.inf),
        (-(10**400), -math.inf),
        (Fraction(10**400, 3), math.inf),
        (2**1024, math.inf),
        (10**300, 1e300),  # in float64's range: unchanged
        (Fraction(10**400, 10**399), 10.0),  # huge parts, small value: exact
    ],
)
def test_to_float_beyond_float64_is_signed_inf(value, expected):
    assert to_float(value, "big") == expected


@pytest.mark.parametrize("wrap", [False, True], ids=["direct", "async"])
def test_huge_int_scalar_reads_back_as_inf(tmp_path, wrap):
    writer = TensorBoardWriter(tmp_path)
    if wrap:
        writer = AsyncWriter(writer)
    with writer:
        # Old code: a bare OverflowError ("int too large to convert to float").
        writer.write_scalars(
            3,
            {"up": 10**400, "down": -(10**400), "f64": 1e300, "ok": 2**24 + 1, "t": torch.ones(())},
        )
    run = load_run(tmp_path)
    assert scalars(run, "up") == [(3, math.inf)]
    assert scalars(run, "down") == [(3, -math.inf)]
    assert scalars(run, "f64") == [(3, math.inf)]  # float32 storage, as documented
    assert scalars(run, "ok") == [(3, float(np.float32(2**24 + 1)))]  # 2**24: float32 rounding
    assert scalars(run, "t") == [(3, 1.0)]


def test_huge_int_hparam_and_metric(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        # Old code: OverflowError from torch's hparams summary.
        writer.write_hparams({"seed": 10**400, "lr": 0.5}, {"count": 10**400}, step=2)
    run = load_run(tmp_path)
    assert scalars(run, "count") == [(2, math.inf)]
    content = run.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["seed"].string_value == str(10**400)
    assert start.hparams["lr"].number_value == 0.5
