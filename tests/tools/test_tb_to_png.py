import importlib.util
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from functrain.logging import TensorBoardWriter

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "tb_to_png.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_tool():
    spec = importlib.util.spec_from_file_location("tb_to_png", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_runs(root):
    for name, scale in (("lr_small", 1.0), ("lr_large", 2.0)):
        with TensorBoardWriter(root / name) as w:
            for step in range(20):
                w.write_scalars(step, {"train/loss": scale / (step + 1), "train/lr": 0.1 * scale})
            w.write_scalars(19, {"eval/accuracy": 0.5 * scale})


def test_plots_several_runs_one_subplot_per_tag(tmp_path):
    tool = load_tool()
    make_runs(tmp_path / "runs")
    out = tmp_path / "curves.png"
    tags = tool.plot_runs(tmp_path / "runs", out, smoothing=0.5, logy=True, title="study")
    assert tags == ["eval/accuracy", "train/loss", "train/lr"]
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(out)
    # Three subplots side by side at 100 dpi: a 15 x 3.4 inch figure.
    assert image.shape[:2] == (340, 1500)
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_tag_patterns_and_single_run(tmp_path):
    tool = load_tool()
    make_runs(tmp_path)
    out = tmp_path / "loss.png"
    assert tool.plot_runs(tmp_path / "lr_small", out, ["train/l*"]) == ["train/loss", "train/lr"]
    assert matplotlib.image.imread(out).shape[:2] == (340, 1000)
    assert tool.main([str(tmp_path), "-o", str(out), "--tags", "nothing*"]) == 2
    assert tool.main([str(tmp_path / "missing"), "-o", str(out)]) == 2


def test_smoothing_matches_tensorboard_debiased_ema():
    tool = load_tool()
    values = [1.0, 2.0, 3.0]
    w = 0.5
    # TensorBoard: last = last * w + (1 - w) * v, divided by 1 - w**count.
    expected = [0.5 / 0.5, (0.25 + 1.0) / 0.75, (0.625 + 1.5) / 0.875]
    assert tool.smooth(values, w) == pytest.approx(expected)
    assert tool.smooth(values, 0.0) == values


def test_command_line(tmp_path):
    make_runs(tmp_path / "runs")
    out = tmp_path / "cli.png"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(tmp_path / "runs"),
            "-o",
            str(out),
            "--tags",
            "train/loss",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert out.read_bytes()[:8] == PNG_SIGNATURE and out.stat().st_size > 5000
