import pytest
import torch.distributed as dist

from functrain.logging import (
    MetricWriter,
    MultiWriter,
    NullWriter,
    TensorBoardWriter,
    is_rank_zero,
    rank_zero_only,
)


class Recorder(MetricWriter):
    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))
        if self.fail:
            raise ValueError("boom")

    def write_histograms(self, step, arrays):
        self.calls.append(("histograms", step, list(arrays)))

    def write_text(self, step, texts):
        self.calls.append(("text", step, dict(texts)))

    def write_hparams(self, hparams, metrics=None, *, step=None):
        self.calls.append(("hparams", dict(hparams), metrics, step))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_multi_writer_fans_out_in_order():
    a, b = Recorder(), Recorder()
    with MultiWriter([a, b]) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_histograms(1, {"w": [1.0]})
        w.write_text(1, {"t": "x"})
        w.write_hparams({"lr": 0.1}, {"acc": 0.5}, step=3)
        w.flush()
    expected = [
        ("scalars", 1, {"loss": 1.0}),
        ("histograms", 1, ["w"]),
        ("text", 1, {"t": "x"}),
        ("hparams", {"lr": 0.1}, {"acc": 0.5}, 3),
        ("flush",),
        ("close",),
    ]
    assert a.calls == expected and b.calls == expected


def test_multi_writer_calls_everyone_before_raising():
    bad, good = Recorder(fail=True), Recorder()
    w = MultiWriter([bad, good])
    with pytest.raises(ValueError, match="boom"):
        w.write_scalars(0, {"loss": 1.0})
    assert good.calls == [("scalars", 0, {"loss": 1.0})]
    with pytest.raises(TypeError, match="not a metric writer"):
        MultiWriter([object()])


def test_null_writer_ignores_everything():
    with NullWriter() as w:
        w.write_scalars(0, {"x": 1.0})
        w.write_histograms(0, {"x": [1.0]})
        w.write_text(0, {"x": "y"})
        w.write_hparams({"x": 1})


def fake_rank(monkeypatch, rank):
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)


def test_not_distributed_writes():
    assert is_rank_zero()
    rec = Recorder()
    with rank_zero_only(rec) as w:
        w.write_scalars(0, {"loss": 1.0})
    assert rec.calls == [("scalars", 0, {"loss": 1.0}), ("close",)]


def test_rank_zero_writes(monkeypatch):
    fake_rank(monkeypatch, 0)
    assert is_rank_zero()
    rec = Recorder()
    with rank_zero_only(rec) as w:
        w.write_scalars(0, {"loss": 1.0})
        w.flush()
    assert rec.calls == [("scalars", 0, {"loss": 1.0}), ("flush",), ("close",)]


def test_other_ranks_write_nothing(monkeypatch, tmp_path):
    rec = Recorder()
    w = rank_zero_only(rec)  # made before the process group exists
    fake_rank(monkeypatch, 3)
    assert not is_rank_zero()
    w.write_scalars(0, {"loss": 1.0})
    w.write_histograms(0, {"w": [1.0]})
    w.write_text(0, {"t": "x"})
    w.write_hparams({"lr": 0.1})
    w.flush()
    w.close()
    assert rec.calls == [("close",)]  # closed so nothing is left open, never written to

    # A factory is never called on other ranks: no run directory appears.
    with rank_zero_only(lambda: TensorBoardWriter(tmp_path / "run")) as lazy:
        lazy.write_scalars(0, {"loss": 1.0})
        assert lazy.writer is None
    assert not (tmp_path / "run").exists()


def test_factory_builds_once_on_rank_zero(monkeypatch, tmp_path):
    fake_rank(monkeypatch, 0)
    built = []

    def factory():
        built.append(Recorder())
        return built[-1]

    with rank_zero_only(factory) as w:
        w.write_scalars(0, {"loss": 1.0})
        w.write_scalars(1, {"loss": 0.5})
    assert len(built) == 1 and [c[0] for c in built[0].calls] == ["scalars", "scalars", "close"]
    with pytest.raises(TypeError, match="metric writer or a function"):
        rank_zero_only(3)
