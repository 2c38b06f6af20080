import os
import sys
import time

import numpy as np
import pytest
import torch
from tb_helpers import load_run, scalars
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.hparams.metadata import (
    EXPERIMENT_TAG,
    SESSION_END_INFO_TAG,
    SESSION_START_INFO_TAG,
)

from functrain.logging import TensorBoardWriter


def f32(x):
    return float(np.float32(x))


def test_scalars_read_back_with_tags_steps_values(tmp_path):
    losses = [2.5, 1.25, 0.7, 0.31]
    with TensorBoardWriter(tmp_path) as w:
        for step, loss in enumerate(losses):
            w.write_scalars(
                torch.tensor(step * 10),  # tensor steps, as TrainState.step
                {
                    "train/loss": torch.tensor(loss, dtype=torch.bfloat16),
                    "train/lr": 1e-3 * (step + 1),
                    "train/count": torch.tensor([step], dtype=torch.int64),
                    "np": np.float32(loss),
                },
            )
    acc = load_run(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == ["np", "train/count", "train/loss", "train/lr"]
    bf16 = [float(torch.tensor(v, dtype=torch.bfloat16)) for v in losses]
    assert scalars(acc, "train/loss") == [(10 * i, f32(v)) for i, v in enumerate(bf16)]
    assert scalars(acc, "train/lr") == [(10 * i, f32(1e-3 * (i + 1))) for i in range(4)]
    assert scalars(acc, "train/count") == [(10 * i, float(i)) for i in range(4)]
    assert scalars(acc, "np") == [(10 * i, f32(v)) for i, v in enumerate(losses)]
    # One run: one directory, no sub-runs.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_histograms_read_back(tmp_path):
    gen = torch.Generator().manual_seed(0)
    w_values = torch.randn(1000, generator=gen, dtype=torch.float64)
    with_nan = torch.tensor([1.0, float("nan"), 3.0, float("inf"), 2.0])
    with TensorBoardWriter(tmp_path, histogram_bins=10) as w:
        w.write_histograms(3, {"params/w": w_values.reshape(10, 100), "nan": with_nan})
        w.write_histograms(4, {"const": torch.full((7,), 2.0, dtype=torch.bfloat16)})
        w.write_histograms(5, {"empty": torch.zeros(0), "ints": np.arange(6)})
    acc = load_run(tmp_path)
    assert sorted(acc.Tags()["histograms"]) == ["const", "ints", "nan", "params/w"]

    (event,) = acc.Histograms("params/w")
    h = event.histogram_value
    x = w_values.numpy()
    assert event.step == 3
    assert (h.min, h.max, h.num) == (x.min(), x.max(), 1000)
    assert h.sum == pytest.approx(x.sum(), rel=1e-12)
    assert h.sum_squares == pytest.approx((x**2).sum(), rel=1e-12)
    assert len(h.bucket) == len(h.bucket_limit) == 10
    assert h.bucket_limit[-1] == x.max()
    # Naive reference: equal-width buckets between min and max; bucket i ends at limit[i].
    width = (x.max() - x.min()) / 10
    expected = [0] * 10
    for v in x:
        expected[min(int((v - x.min()) / width), 9)] += 1
    assert list(h.bucket) == expected
    assert np.allclose(h.bucket_limit, [x.min() + width * (i + 1) for i in range(10)])

    (nan_event,) = acc.Histograms("nan")  # non-finite values are left out
    assert (nan_event.histogram_value.num, nan_event.histogram_value.sum) == (3, 6.0)
    (const,) = acc.Histograms("const")
    assert const.step == 4
    assert list(const.histogram_value.bucket) == [7]
    assert const.histogram_value.min == const.histogram_value.max == 2.0
    (ints,) = acc.Histograms("ints")
    assert (ints.histogram_value.num, ints.histogram_value.sum) == (6, 15.0)


def test_text_keeps_exact_tag(tmp_path):
    with TensorBoardWriter(tmp_path) as w:
        w.write_text(0, {"notes": "first", "config": "| a | b |\n|---|---|\n| 1 | 2 |"})
        w.write_text(torch.tensor(7), {"notes": "ünïcode ✓"})
    acc = load_run(tmp_path)
    assert sorted(acc.Tags()["tensors"]) == ["config", "notes"]
    notes = [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors("notes")]
    assert notes == [(0, "first"), (7, "ünïcode ✓")]
    assert acc.SummaryMetadata("notes").plugin_data.plugin_name == "text"


def test_hparams_in_the_same_run(tmp_path):
    with TensorBoardWriter(tmp_path) as w:
        for step in range(5):
            w.write_scalars(step, {"train/loss": 1.0 / (step + 1)})
        w.write_hparams(
            {
                "lr": 3e-4,
                "optimizer": "adamw",
                "batch_size": 64,
                "betas": (0.9, 0.999),
                "clip": torch.tensor(1.5),
                "unused": None,
            },
            {"eval/accuracy": torch.tensor(0.96), "train/loss": None},
        )
    # No sub-run directory (SummaryWriter.add_hparams would create one).
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []
    assert len(list(tmp_path.iterdir())) == 1

    acc = load_run(tmp_path)
    content = acc.PluginTagToContent("hparams")
    assert set(content) == {EXPERIMENT_TAG, SESSION_START_INFO_TAG, SESSION_END_INFO_TAG}

    start = plugin_data_pb2.HParamsPluginData.FromString(content[SESSION_START_INFO_TAG])
    hp = start.session_start_info.hparams
    assert hp["lr"].number_value == 3e-4
    assert hp["optimizer"].string_value == "adamw"
    assert hp["batch_size"].number_value == 64
    assert hp["betas"].string_value == "(0.9, 0.999)"
    assert hp["clip"].number_value == 1.5
    assert "unused" not in hp

    experiment = plugin_data_pb2.HParamsPluginData.FromString(content[EXPERIMENT_TAG]).experiment
    assert sorted(m.name.tag for m in experiment.metric_infos) == ["eval/accuracy", "train/loss"]
    assert sorted(h.name for h in experiment.hparam_infos) == [
        "batch_size",
        "betas",
        "clip",
        "lr",
        "optimizer",
    ]
    # The final metric is written at the last step; the declared one keeps only its curve.
    assert scalars(acc, "eval/accuracy") == [(4, f32(0.96))]
    assert [s for s, _ in scalars(acc, "train/loss")] == [0, 1, 2, 3, 4]


def test_hparams_metric_at_explicit_step(tmp_path):
    with TensorBoardWriter(tmp_path) as w:
        w.write_hparams({"lr": 0.1}, {"final": 2.0}, step=123)
    assert scalars(load_run(tmp_path), "final") == [(123, 2.0)]


def test_resume_with_purge_step_leaves_no_duplicates(tmp_path):
    old = TensorBoardWriter(tmp_path)
    for step in range(10):
        old.write_scalars(step, {"loss": float(step)})
        old.write_histograms(step, {"w": torch.full((4,), float(step))})
    old.write_scalars(8, {"eval/acc": 0.5})  # a tag the resumed run writes later than step 8
    old.close()  # "crash" after step 9; the last checkpoint was at step 5

    # Event files are read in name order and their names hold the creation second.
    time.sleep(1.05)
    with TensorBoardWriter(tmp_path, purge_step=5) as new:
        for step in range(5, 15):
            new.write_scalars(step, {"loss": 100.0 + step})
            new.write_histograms(step, {"w": torch.full((4,), 100.0 + step)})
        new.write_scalars(12, {"eval/acc": 0.75})

    assert len([p for p in tmp_path.iterdir() if "tfevents" in p.name]) == 2
    acc = load_run(tmp_path)
    expected = [(s, float(s)) for s in range(5)] + [(s, 100.0 + s) for s in range(5, 15)]
    assert scalars(acc, "loss") == expected
    hist = [(e.step, e.histogram_value.max) for e in acc.Histograms("w")]
    assert hist == expected
    assert scalars(acc, "eval/acc") == [(12, 0.75)]


def test_missing_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install functrain\[tensorboard\]"):
        TensorBoardWriter(tmp_path)
    assert not os.listdir(tmp_path)


def test_bad_input_and_closed_writer(tmp_path):
    w = TensorBoardWriter(tmp_path)
    with pytest.raises(ValueError, match=r"'loss'.*shape \(2,\)"):
        w.write_scalars(0, {"loss": torch.ones(2)})
    with pytest.raises(TypeError, match="names must be non-empty strings"):
        w.write_scalars(0, {1: 1.0})
    with pytest.raises(TypeError, match="step must be an integer"):
        w.write_scalars(torch.tensor(1.5), {"loss": 1.0})
    with pytest.raises(TypeError, match="'notes' must be a str"):
        w.write_text(0, {"notes": 3})
    with pytest.raises(ValueError, match="histogram_bins"):
        TensorBoardWriter(tmp_path / "x", histogram_bins=0)
    w.close()
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write_scalars(0, {"loss": 1.0})
    assert len(os.listdir(tmp_path)) == 1  # writing after close did not open a new file
