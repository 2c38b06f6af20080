"""Second review of the examples: devices and seeds, reruns into a used directory, Ctrl-C in setup."""

import datetime
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from example_files import EXAMPLES, load_example

from functrain.logging import TensorBoardWriter, read_scalars

BAD_VALUES = [
    (["--device", "foo"], "--device: not a torch device: 'foo'"),
    (["--seed", str(2**64)], "--seed: must be an integer in [0, 2**63)"),
    (["--seed", "-1"], "--seed: must be an integer in [0, 2**63)"),
]
if not torch.cuda.is_available():
    BAD_VALUES.append((["--device", "cuda"], "--device: 'cuda': no cuda device on this machine"))


CASES = [
    (name, argv, message)
    for name in ("digits", "char_lm", "per_sample")
    for argv, message in BAD_VALUES
    if not (name == "per_sample" and argv[0] == "--device")  # it runs on the CPU only
]


@pytest.mark.parametrize(("name", "argv", "message"), CASES)
def test_bad_device_or_seed_is_a_usage_error(name, argv, message, capsys):
    # Used to pass argparse and end in a traceback from the data loading or torch.manual_seed.
    example = load_example(name)
    with pytest.raises(SystemExit) as err:
        example.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_a_good_device_and_seed_pass():
    args = load_example("digits").parse_args(["--device", "cpu", "--seed", str(2**63 - 1)])
    assert (args.device, args.seed) == ("cpu", 2**63 - 1)


def test_digits_rerun_with_other_settings_is_refused(tmp_path, capsys):
    digits = load_example("digits")
    argv = ["--fast", "--no-progress", "--logdir", str(tmp_path)]
    assert digits.main(argv) == 0
    # Used to resume the finished run's checkpoint under the new schedule and append its
    # steps to the old curves: one TensorBoard run made of two different trainings.
    with pytest.raises(SystemExit) as err:
        digits.main([*argv, "--lr", "0.01", "--epochs", "6"])
    message = str(err.value.code)
    assert message.startswith(f"error: {tmp_path} holds a run with other settings")
    assert "epochs: 3 -> 6" in message and "peak_lr: 0.003 -> 0.01" in message
    logged = read_scalars(tmp_path)["."]
    assert logged["train/loss"][0] == list(range(1, 34))  # the first run's curve, untouched
    # The same settings still resume (and train nothing more).
    assert digits.main(argv) == 0
    assert "resumed from the checkpoint at step 33" in capsys.readouterr().out


def test_default_run_dirs_of_the_same_second_do_not_collide(tmp_path, monkeypatch):
    common = load_example("_common")

    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(common.datetime, "datetime", FrozenClock)
    root = str(tmp_path / "runs")
    first, second = common.run_dir(root), common.run_dir(root)
    assert first == os.path.join(root, "20260102-030405")
    assert second == os.path.join(root, "20260102-030405-2")  # used to be `first` again
    assert os.path.isdir(first) and os.path.isdir(second)
    assert common.run_dir(root, "named") == os.path.join(root, "named")


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("char_lm", ["--steps", "1", "--no-progress"]),
        ("per_sample", ["--fast", "--steps", "1", "--no-dp"]),
    ],
)
def test_examples_without_resume_refuse_a_used_logdir(name, argv, tmp_path, capsys):
    # No checkpoints here: a second run used to write its steps 1, 2, ... into the same
    # directory, so TensorBoard drew both runs as one zigzagging curve.
    with TensorBoardWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"train/loss": 1.0})
    example = load_example(name)
    with pytest.raises(SystemExit) as err:
        example.main([*argv, "--logdir", str(tmp_path)])
    assert str(err.value.code) == f"error: {tmp_path} already holds a run; choose a new --logdir"
    assert read_scalars(tmp_path)["."]["train/loss"] == ([1], [1.0])


@pytest.mark.parametrize("name", ["digits", "per_sample", "accumulation_study"])
def test_ctrl_c_outside_the_training_loop_is_a_message_not_a_traceback(name, tmp_path):
    # A KeyboardInterrupt while the data loads (outside train_loop's own Ctrl-C handling, and
    # per_sample.py and accumulation_study.py have none), raised where a real SIGINT would land.
    script = textwrap.dedent(
        f"""
        import runpy, sys
        import sklearn.datasets

        def load_digits(*args, **kwargs):
            raise KeyboardInterrupt

        sklearn.datasets.load_digits = load_digits
        sys.argv = ["{name}.py", "--logdir", {str(tmp_path)!r}]
        runpy.run_path({os.path.join(EXAMPLES, name + ".py")!r}, run_name="__main__")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().endswith("interrupted; the curves logged so far are in TensorBoard")
