"""The main job of the README, in its normal mode: >= 95% test accuracy on digits (seconds)."""

import os
import re

from test_examples import load_run, run_example, values


def test_digits_normal_mode_reaches_95_percent(tmp_path):
    proc = run_example("digits.py", "--logdir", tmp_path, "--no-progress")
    match = re.search(r"test accuracy ([\d.]+)%", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) >= 95.0
    acc = load_run(tmp_path)
    assert values(acc, "eval/accuracy")[-1] >= 0.95
    assert os.listdir(tmp_path / "checkpoints")
