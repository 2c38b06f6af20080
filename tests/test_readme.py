"""The README's commands and its first script are what CI and users actually run."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import functrain as ft

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(b.strip() for b in _blocks("bash") if "pytest" in b)
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_command in ci_lines
    # The torch pin comes first so pip never resolves a CUDA build of several GB.
    assert test_command.startswith("pip install torch==2.13.0 ")


def test_main_job_command_names_an_existing_example():
    main_job = next(b.strip() for b in _blocks("bash") if "examples/" in b)
    script = re.search(r"python (examples/\S+\.py)", main_job)
    assert script and (ROOT / script.group(1)).is_file()


def test_first_script_trains(tmp_path, monkeypatch):
    (code,) = [b for b in _blocks("python") if "TensorBoardWriter" in b]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x = torch.randn(512, 64)
    y = (x[:, :10].argmax(-1)).long()  # a learnable rule
    batches = [{"x": x[i : i + 64], "y": y[i : i + 64]} for i in range(0, 512, 64)] * 8
    namespace: dict = {"batches": batches}
    exec(compile(code, "README.md", "exec"), namespace)
    state, metrics = namespace["state"], namespace["metrics"]
    assert int(state.step) == len(batches)
    first = ft.make_eval_step(namespace["loss_fn"])(namespace["state"], batches[0])["loss"]
    assert float(metrics["loss"]) < 2.0 and float(first) < 2.0  # cross-entropy of 10 classes: 2.3
    assert "lr" in metrics and "grad_norm" in metrics
    assert list((tmp_path / "runs" / "first").glob("events.out.tfevents.*"))
