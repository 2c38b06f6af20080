"""A newcomer's first runs: bad --logdir values, two runs in one directory, matching numbers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from example_files import EXAMPLES, ROOT, load_example
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

WITH_PARSE_ARGS = ("digits", "char_lm", "per_sample", "accumulation_study")


def scalars(logdir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``tag -> (steps, values)`` read by TensorBoard's own reader, not by functrain's."""
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
        for tag in events.Tags()["scalars"]
    }


@pytest.mark.parametrize("name", WITH_PARSE_ARGS)
@pytest.mark.parametrize("below", ["", "run"])
def test_logdir_in_a_file_is_a_usage_error(name, below, tmp_path, capsys):
    # Used to pass argparse and end in a FileExistsError/NotADirectoryError traceback.
    (tmp_path / "notes.txt").write_text("")
    logdir = os.path.join(tmp_path / "notes.txt", below)
    with pytest.raises(SystemExit) as err:
        load_example(name).parse_args(["--logdir", logdir])
    assert err.value.code == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_missing_logdir_parents_are_fine(tmp_path):
    args = load_example("digits").parse_args(["--logdir", str(tmp_path / "a" / "b" / "c")])
    assert args.logdir == str(tmp_path / "a" / "b" / "c")
    assert not (tmp_path / "a").exists()  # checking creates nothing


@pytest.mark.parametrize("name", WITH_PARSE_ARGS)
def test_a_second_run_into_a_busy_logdir_is_refused(name, tmp_path):
    # Two copies started into one directory both ran, writing every step twice (and, for
    # digits, racing on the checkpoints). Here the test holds the lock a first run would hold.
    fcntl = pytest.importorskip("fcntl")  # no lock (and nothing to test) on Windows
    with open(tmp_path / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as err:
            load_example(name).main(["--fast", "--logdir", str(tmp_path)])
    assert str(err.value.code) == (
        f"error: another run is writing to {tmp_path}; wait for it to end or choose a new --logdir"
    )
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_accumulation_study_refuses_a_used_logdir(tmp_path):
    # It had no check at all: a rerun interleaved its curves with the first run's.
    (tmp_path / "sgd" / "B").mkdir(parents=True)
    (tmp_path / "sgd" / "B" / "events.out.tfevents.1.host").write_bytes(b"")
    with pytest.raises(SystemExit) as err:
        load_example("accumulation_study").main(["--fast", "--logdir", str(tmp_path)])
    assert "already holds a run" in str(err.value.code)


def test_accumulation_study_help_states_its_whole_question(capsys):
    # The description was cut after the first line: "... match a K× batch? How should".
    with pytest.raises(SystemExit):
        load_example("accumulation_study").parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "How should the learning rate scale with the batch?" in help_text


def test_digits_prints_the_numbers_it_logged(tmp_path, capsys):
    # The final line rounded to 3 decimals: a converged loss of 0.0004 printed as "0.000".
    torch.set_num_threads(1)
    assert load_example("digits").main(["--fast", "--no-progress", "--logdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    logged = scalars(tmp_path)
    loss = logged["train/loss"][1]
    assert f"train loss {loss[0]:.4g} -> {loss[-1]:.4g} (a batch's loss)" in out
    accuracy = logged["eval/accuracy"][1][-1]  # the final evaluation, at the last step
    assert f"test accuracy {accuracy:.2%} after 33 steps" in out
    assert logged["train/lr"][0] == list(range(1, 34))


def test_digits_ddp_prints_the_steps_tensorboard_shows(tmp_path):
    # The console said "step 0" and "step 39" for the points TensorBoard shows at 1 and 40.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, os.path.join(EXAMPLES, "digits_ddp.py"), "--fast"]
    cmd += ["--logdir", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {
        int(m[1]): float(m[2]) for m in re.finditer(r"^step +(\d+) +loss (\S+)", proc.stdout, re.M)
    }
    steps, losses = scalars(tmp_path)["train/loss"]
    assert sorted(printed) == [1, 21, 40]
    for step, loss in printed.items():
        assert loss == pytest.approx(losses[steps.index(step)], abs=1e-4)


def test_readme_script_logs_from_step_1_like_train_loop(tmp_path, monkeypatch):
    # It wrote at steps 0, 1, ... while ft.train_loop and the examples write at 1, 2, ...
    readme = (Path(ROOT) / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "Writer" in b]
    monkeypatch.chdir(tmp_path)
    batch = {"x": torch.randn(16, 64), "y": torch.randint(0, 10, (16,))}
    exec(compile(code, "README.md", "exec"), {"batches": [batch] * 3})
    assert scalars(tmp_path / "runs" / "first")["loss"][0] == [1, 2, 3]
