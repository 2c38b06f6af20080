import threading
import time

import numpy as np
import pytest
import torch
from tb_helpers import load_run

from functrain.logging import AsyncWriter, MetricWriter, TensorBoardWriter


class Recorder(MetricWriter):
    """Records every call (with host values) and the thread it ran on."""

    def __init__(self, fail_at=None, delay_s=0.0):
        self.calls = []
        self.threads = set()
        self.fail_at = fail_at
        self.delay_s = delay_s
        self.closed = False

    def _note(self, *call):
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)
        self.calls.append(call)

    def write_scalars(self, step, scalars):
        if step == self.fail_at:
            raise OSError(f"disk full at step {step}")
        self._note("scalars", step, dict(scalars))

    def write_histograms(self, step, arrays):
        self._note("histograms", step, {k: np.asarray(v).tolist() for k, v in arrays.items()})

    def write_text(self, step, texts):
        self._note("text", step, dict(texts))

    def write_hparams(self, hparams, metrics=None, *, step=None):
        self._note("hparams", dict(hparams), metrics, step)

    def flush(self):
        self._note("flush")

    def close(self):
        self.closed = True


def write_session(w, gen):
    w.write_hparams({"lr": torch.tensor(0.5), "name": "run"}, {"eval/acc": None})
    for step in range(7):
        w.write_scalars(
            torch.tensor(step),
            {
                "train/loss": torch.rand((), generator=gen),
                "train/lr": 0.1 * step,
                "train/tokens": torch.tensor(step * 100, dtype=torch.int64),
                "half": torch.rand(1, generator=gen).half(),
            },
        )
        if step % 3 == 0:
            w.write_histograms(step, {"w": torch.randn(50, generator=gen), "n": np.arange(4)})
            w.write_text(step, {"note": f"step {step}"})
    w.write_scalars(6, {"eval/acc": torch.tensor(0.875)})


def test_same_events_as_synchronous_writer(tmp_path):
    with TensorBoardWriter(tmp_path / "sync") as w:
        write_session(w, torch.Generator().manual_seed(0))
    with AsyncWriter(TensorBoardWriter(tmp_path / "async"), every_n=3) as w:
        write_session(w, torch.Generator().manual_seed(0))

    sync, async_ = load_run(tmp_path / "sync"), load_run(tmp_path / "async")
    assert sync.Tags() == async_.Tags()
    for tag in sync.Tags()["scalars"]:
        assert [(e.step, e.value) for e in sync.Scalars(tag)] == [
            (e.step, e.value) for e in async_.Scalars(tag)
        ]
    for tag in sync.Tags()["histograms"]:
        assert [(e.step, e.histogram_value) for e in sync.Histograms(tag)] == [
            (e.step, e.histogram_value) for e in async_.Histograms(tag)
        ]
    for tag in sync.Tags()["tensors"]:
        assert [(e.step, e.tensor_proto) for e in sync.Tensors(tag)] == [
            (e.step, e.tensor_proto) for e in async_.Tensors(tag)
        ]
    assert sync.PluginTagToContent("hparams") == async_.PluginTagToContent("hparams")
    assert len(sync.Scalars("train/loss")) == 7


@pytest.mark.parametrize("host_inline", [False, True])
def test_calls_arrive_in_order_as_host_values(host_inline):
    rec = Recorder()
    with AsyncWriter(rec, every_n=2, host_inline=host_inline) as w:
        w.write_scalars(torch.tensor(1), {"a": torch.tensor(1.5), "b": 2})
        w.write_text(1, {"t": "x"})
        w.write_histograms(torch.tensor(2, dtype=torch.int32), {"h": torch.tensor([[1.0, 2.0]])})
        w.write_hparams({"lr": torch.tensor(0.25), "opt": "sgd"}, {"m": torch.tensor(3)}, step=9)
        w.flush()
    assert rec.calls == [
        ("scalars", 1, {"a": 1.5, "b": 2}),
        ("text", 1, {"t": "x"}),
        ("histograms", 2, {"h": [[1.0, 2.0]]}),
        ("hparams", {"lr": 0.25, "opt": "sgd"}, {"m": 3}, 9),
        ("flush",),
    ]
    assert type(rec.calls[0][1]) is int
    # Host-only values are written by the caller at hand-over unless told otherwise.
    assert (threading.get_ident() in rec.threads) == host_inline
    assert rec.closed


def test_values_are_snapshotted_at_the_call():
    rec = Recorder()
    loss, weights = torch.tensor(1.0), torch.zeros(3)
    with AsyncWriter(rec, every_n=100) as w:
        w.write_scalars(0, {"loss": loss})
        w.write_histograms(0, {"w": weights})
        loss.fill_(2.0)  # buffers reused after the call (donation, CUDA graphs)
        weights.add_(5.0)
        w.write_scalars(1, {"loss": loss})
    assert rec.calls == [
        ("scalars", 0, {"loss": 1.0}),
        ("histograms", 0, {"w": [0.0, 0.0, 0.0]}),
        ("scalars", 1, {"loss": 2.0}),
    ]


def test_hands_over_every_n_writes_and_does_not_block():
    rec = Recorder(delay_s=0.05)
    w = AsyncWriter(rec, every_n=5, max_delay_s=None, host_inline=False)
    start = time.perf_counter()
    for step in range(4):
        w.write_scalars(step, {"loss": torch.tensor(float(step))})
    time.sleep(0.1)
    assert rec.calls == []  # still buffered: fewer than every_n writes
    for step in range(4, 20):
        w.write_scalars(step, {"loss": torch.tensor(float(step))})
    caller_s = time.perf_counter() - start - 0.1
    assert caller_s < 0.5  # the writer itself needs 20 * 0.05 s = 1 s
    w.flush()
    assert [c[1] for c in rec.calls[:-1]] == list(range(20))
    w.close()


def test_max_delay_hands_over_slow_steps():
    rec = Recorder()
    w = AsyncWriter(rec, every_n=1000, max_delay_s=0.0, host_inline=False)
    w.write_scalars(0, {"loss": 1.0})
    deadline = time.monotonic() + 5
    while not rec.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rec.calls == [("scalars", 0, {"loss": 1.0})]
    w.close()


def test_background_error_surfaces_on_next_call():
    rec = Recorder(fail_at=3)
    w = AsyncWriter(rec, every_n=1, host_inline=False)
    for step in range(5):
        w.write_scalars(step, {"loss": float(step)})
    w._queue.join()  # let the worker reach the failure
    with pytest.raises(
        RuntimeError, match=r"failed while writing .*OSError: disk full at step 3"
    ) as info:
        w.write_scalars(5, {"loss": 5.0})
    assert isinstance(info.value.__cause__, OSError)
    # Raised once, after step 5 was buffered; later writes still go through.
    w.write_scalars(6, {"loss": 6.0})
    w.close()
    assert [c[1] for c in rec.calls] == [0, 1, 2, 4, 5, 6]


def test_background_error_surfaces_on_flush_and_close():
    rec = Recorder(fail_at=1)
    w = AsyncWriter(rec, every_n=100, host_inline=False)
    w.write_scalars(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="disk full"):
        w.flush()
    w.write_scalars(1, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="disk full"):
        w.close()
    assert rec.closed and not w._thread.is_alive()
    w.close()  # closing twice is fine


def test_inline_errors_surface_at_the_hand_over():
    rec = Recorder(fail_at=2)
    w = AsyncWriter(rec, every_n=3)
    w.write_scalars(1, {"loss": 1.0})
    w.write_scalars(2, {"loss": 2.0})
    assert rec.calls == []
    with pytest.raises(RuntimeError, match="disk full at step 2") as info:
        w.write_scalars(3, {"loss": 3.0})  # the third write hands the batch over
    assert isinstance(info.value.__cause__, OSError)
    w.close()
    assert [c[1] for c in rec.calls] == [1, 3]


def test_caller_errors_are_immediate():
    rec = Recorder()
    with AsyncWriter(rec) as w:
        with pytest.raises(ValueError, match=r"'loss'.*shape \(3,\)"):
            w.write_scalars(0, {"loss": torch.ones(3)})
        with pytest.raises(TypeError, match="step must be an integer"):
            w.write_scalars(torch.tensor(0.5), {"loss": 1.0})
        with pytest.raises(TypeError, match="names must be non-empty strings"):
            w.write_histograms(0, {"": torch.ones(3)})
        with pytest.raises(TypeError, match="must be a number"):
            w.write_scalars(0, {"loss": "high"})
        with pytest.raises(TypeError, match="'t' must be a str"):
            w.write_text(0, {"t": 1})
        with pytest.raises(ValueError, match="every_n"):
            AsyncWriter(rec, every_n=0)
    assert rec.calls == []
    with pytest.raises(RuntimeError, match="closed"):
        w.write_scalars(0, {"loss": 1.0})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_copied_without_blocking():
    rec = Recorder()
    with AsyncWriter(rec, every_n=4) as w:
        for step in range(10):
            x = torch.full((1000,), float(step), device="cuda")
            w.write_scalars(
                torch.tensor(step, device="cuda"),
                {"mean": x.mean(), "bf16": x.sum().bfloat16(), "host": 1.0},
            )
            w.write_histograms(step, {"x": x})
            x.add_(1000.0)  # later work on the stream must not leak into the logged values
    scalars = [c for c in rec.calls if c[0] == "scalars"]
    assert [c[1] for c in scalars] == list(range(10))
    assert [c[2]["mean"] for c in scalars] == [float(s) for s in range(10)]
    assert [c[2]["bf16"] for c in scalars] == [
        float(torch.tensor(1000.0 * s).bfloat16()) for s in range(10)
    ]
    hists = [c for c in rec.calls if c[0] == "histograms"]
    assert [h[2]["x"][0] for h in hists] == [float(s) for s in range(10)]


def test_every_step_path_rechecks_changed_names_and_keeps_types():
    rec = Recorder()
    with AsyncWriter(rec, every_n=3) as w:
        w.write_scalars(torch.tensor(0), {"a": torch.tensor(1.5), "n": torch.tensor(7)})
        w.write_scalars(1, {"a": torch.tensor(2.5), "n": torch.tensor(8)})
        with pytest.raises(TypeError, match="names must be non-empty strings"):
            w.write_scalars(2, {"a": torch.tensor(1.0), "": torch.tensor(1.0)})
        with pytest.raises(ValueError, match=r"'a'.*shape \(2,\)"):
            w.write_scalars(2, {"a": torch.ones(2), "n": 1})
        # Values the every-step path does not take (NumPy, subclasses) go the general way.
        w.write_scalars(2, {"a": np.float32(0.5), "n": torch.nn.Parameter(torch.tensor(3.0))})
    assert rec.calls == [
        ("scalars", 0, {"a": 1.5, "n": 7}),
        ("scalars", 1, {"a": 2.5, "n": 8}),
        ("scalars", 2, {"a": 0.5, "n": 3.0}),
    ]
    assert [type(v) for v in rec.calls[0][2].values()] == [float, int]
